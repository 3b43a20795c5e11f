/**
 * Human sizes: parse `512`, `64K`, `2M`, `1G`, `1T` (binary units) and format bytes.
 *
 * @module
 */
import { UsageError } from "./errors.ts";

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
};

/**
 * Parses a size such as `512`, `64K`, `64KiB`, `2M`, `1G` (powers of 1024).
 * Throws {@link UsageError} naming `what` for anything else.
 *
 * @example
 * ```ts
 * import { parseSize } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 * assert.equal(parseSize("2M"), 2 * 1024 * 1024);
 * ```
 */
export function parseSize(text: string, what = "size"): number {
  const m = /^\s*(\d+)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) {
    throw new UsageError(`invalid ${what} '${text}': use a number with an optional K, M, G or T`);
  }
  const value = Number(m[1]) * UNITS[m[2].toLowerCase()];
  if (!Number.isSafeInteger(value)) throw new UsageError(`${what} '${text}' is too large`);
  return value;
}

/** Formats a byte count with a binary unit, e.g. `1.5 GiB`. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}
