/**
 * The checksums of XVA disk members: `<member>.xxhash` holds XXH64 (seed 0) of the
 * member as 16 upper-case hex digits (XAPI's default since 2023), `<member>.checksum`
 * holds SHA-1 as 40 lower-case hex digits (older XAPI, vhd-tool). XXH64 comes from
 * the `xxhash-wasm` package (WebAssembly, about 5 GB/s), SHA-1 from `node:crypto`.
 *
 * @module
 */
import { createHash } from "node:crypto";
import xxhash from "xxhash-wasm";

/** The two checksum kinds: `xxhash` (XXH64) and `sha1`. */
export type ChecksumKind = "xxhash" | "sha1";

/** The name extension of each kind's checksum member. */
export const CHECKSUM_EXTENSIONS: Readonly<Record<ChecksumKind, string>> = {
  xxhash: ".xxhash",
  sha1: ".checksum",
};

/**
 * A checksum function: the member's bytes (in one or more consecutive pieces) → the
 * text its checksum member holds.
 */
export type Checksum = (...pieces: Uint8Array[]) => string;

let xxh64: Promise<Checksum> | null = null;

const sha1: Checksum = (...pieces) => {
  const h = createHash("sha1");
  for (const p of pieces) h.update(p);
  return h.digest("hex");
};

const hex16 = (h: bigint) => h.toString(16).toUpperCase().padStart(16, "0");

/**
 * The checksum function of `kind` (XXH64 needs its WebAssembly module loaded once).
 *
 * @example
 * ```ts
 * import { loadChecksum } from "./checksum.ts";
 * import assert from "node:assert/strict";
 *
 * const xxh = await loadChecksum("xxhash");
 * assert.equal(xxh(new Uint8Array(0)), "EF46DB3751D8E999");
 * const abc = new TextEncoder().encode("abc");
 * assert.equal(xxh(abc.subarray(0, 1), abc.subarray(1)), xxh(abc)); // in pieces
 * const sha = await loadChecksum("sha1");
 * assert.equal(sha(new Uint8Array(0)), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
 * ```
 */
export function loadChecksum(kind: ChecksumKind): Promise<Checksum> {
  if (kind === "sha1") return Promise.resolve(sha1);
  xxh64 ??= xxhash().then(({ h64Raw, create64 }) => (...pieces: Uint8Array[]) => {
    if (pieces.length === 1) return hex16(h64Raw(pieces[0], 0n));
    const h = create64(0n);
    for (const p of pieces) h.update(p);
    return hex16(h.digest());
  });
  return xxh64;
}

/**
 * The kind of the checksum member named `name` (by its extension), or null.
 *
 * @example
 * ```ts
 * import { checksumKindOf } from "./checksum.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(checksumKindOf("Ref:3/00000007.xxhash"), "xxhash");
 * assert.equal(checksumKindOf("Ref:3/00000007.checksum"), "sha1");
 * assert.equal(checksumKindOf("Ref:3/00000007"), null);
 * ```
 */
export function checksumKindOf(name: string): ChecksumKind | null {
  for (const kind of ["xxhash", "sha1"] as const) {
    if (name.endsWith(CHECKSUM_EXTENSIONS[kind])) return kind;
  }
  return null;
}
