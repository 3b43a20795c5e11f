/**
 * The one table of wire formats and their HTTP content types (XAPI's, where XAPI has
 * one). The client, the server and the CLI all read it here, so a new format (tar,
 * chunked, …) plugs in by adding a row.
 *
 * @module
 */

/**
 * Content type of each wire format, as XAPI sends and expects them.
 *
 * @example
 * ```ts
 * import { FORMAT_CONTENT_TYPES } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(FORMAT_CONTENT_TYPES.raw, "application/octet-stream");
 * ```
 */
export const FORMAT_CONTENT_TYPES: Readonly<Record<string, string>> = {
  qcow2: "application/x-qemu-disk",
  vhd: "application/vhd",
  raw: "application/octet-stream",
  tar: "application/x-tar",
};

/** Types that say "some bytes", not which format: the stream's first bytes decide. */
const GENERIC_TYPES = new Set(["application/octet-stream", "binary/octet-stream"]);

/**
 * The content type to send for `format` (`application/octet-stream` for a format
 * without one of its own).
 *
 * @example
 * ```ts
 * import { contentTypeOf } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(contentTypeOf("qcow2"), "application/x-qemu-disk");
 * assert.equal(contentTypeOf("vhd"), "application/vhd");
 * ```
 */
export function contentTypeOf(format: string): string {
  return FORMAT_CONTENT_TYPES[format] ?? "application/octet-stream";
}

/**
 * The wire format a `Content-Type` header names, or undefined when it names none of
 * ours. `application/octet-stream` names none: static web servers send it for any
 * file, so the stream's first bytes decide (parameters such as `; charset=…` and
 * letter case are ignored).
 *
 * @example
 * ```ts
 * import { formatOfContentType } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(formatOfContentType("application/x-qemu-disk"), "qcow2");
 * assert.equal(formatOfContentType("Application/VHD; q=1"), "vhd");
 * assert.equal(formatOfContentType("text/html"), undefined);
 * assert.equal(formatOfContentType("application/octet-stream"), undefined);
 * ```
 */
export function formatOfContentType(contentType: string | null | undefined): string | undefined {
  if (!contentType) return undefined;
  const type = contentType.split(";")[0].trim().toLowerCase();
  if (GENERIC_TYPES.has(type)) return undefined;
  return Object.entries(FORMAT_CONTENT_TYPES).find(([, t]) => t === type)?.[0];
}
