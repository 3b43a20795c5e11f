/**
 * errno values told by name, for messages: the C library's text and the symbolic
 * name, never a bare number.
 *
 * @module
 */
import { getSystemErrorName } from "node:util";
import { loadLibc } from "./libc.ts";

const STRERROR = {
  strerror: { parameters: ["i32"], result: "pointer" },
} as const;

/**
 * errno `e` told by name: `No space left on device (ENOSPC)` — the C library's text
 * and the symbolic name, so a message never shows a bare number.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { errnoMessage } from "./errno.ts";
 *
 * assert.equal(errnoMessage(28), "No space left on device (ENOSPC)");
 * ```
 */
export function errnoMessage(e: number): string {
  let name: string | undefined;
  try {
    name = getSystemErrorName(-e);
  } catch {
    // unknown to Node's table: keep the number
  }
  name ??= `errno ${e}`;
  const c = loadLibc(STRERROR);
  const p = c?.strerror(e) ?? null;
  const text = p === null ? null : new Deno.UnsafePointerView(p).getCString();
  return text ? `${text} (${name})` : name;
}
