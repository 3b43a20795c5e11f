/**
 * The checksums of XVA disk members: `<member>.xxhash` holds XXH64 (seed 0) of the
 * member as 16 upper-case hex digits (XAPI's default since 2023), `<member>.checksum`
 * holds SHA-1 as 40 lower-case hex digits (older XAPI, vhd-tool). SHA-1 comes from
 * `node:crypto`. XXH64 comes, in this order of preference, from:
 * - the system's xxHash library (`libxxhash.so.0`, Debian's libxxhash0: the reference
 *   implementation) through FFI, when FFI is permitted: it loads in about a millisecond,
 *   hashes the caller's bytes in place, and can hash on one of Deno's blocking threads
 *   ({@link loadThreadedXxh64}: an import hashes each member there while it reads the
 *   next ones);
 * - `@node-rs/xxhash` (native code through Node-API, about 10 GB/s, in place) on Linux
 *   x86-64 when FFI is permitted (loading it takes Node's module loader, 5-15 ms);
 * - the `xxhash-wasm` package (WebAssembly: each piece is first copied into its memory,
 *   and the code starts in V8's baseline tier).
 *
 * @module
 */
import { createRequire } from "node:module";

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
let sha1: Promise<Checksum> | null = null;

/** What `@node-rs/xxhash`'s Node-API module offers (the part used here). */
interface NativeXxhash {
  xxh64(input: Uint8Array, seed: bigint): bigint;
  Xxh64: new (seed: bigint) => { update(input: Uint8Array): unknown; digest(): bigint };
}

/**
 * The native XXH64 (`@node-rs/xxhash`'s binary for Linux x86-64 with glibc, loaded
 * straight from its platform package), or null where it cannot be loaded: another
 * platform, no FFI permission (Node-API modules need it; never asked for), a bundle
 * or binary without it.
 */
function nativeXxhash(): NativeXxhash | null {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return null;
  try {
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
    const m = createRequire(import.meta.url)("@node-rs/xxhash-linux-x64-gnu");
    return typeof m?.xxh64 === "function" && typeof m?.Xxh64 === "function" ? m : null;
  } catch {
    return null;
  }
}

const XXHASH_SYMBOLS = {
  XXH64: { parameters: ["buffer", "usize", "u64"], result: "u64" },
  XXH64_threaded: {
    name: "XXH64",
    parameters: ["buffer", "usize", "u64"],
    result: "u64",
    nonblocking: true,
  },
  XXH64_createState: { parameters: [], result: "pointer" },
  XXH64_freeState: { parameters: ["pointer"], result: "i32" },
  XXH64_reset: { parameters: ["pointer", "u64"], result: "i32" },
  XXH64_update: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  XXH64_update_threaded: {
    name: "XXH64_update",
    parameters: ["pointer", "buffer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  XXH64_digest: { parameters: ["pointer"], result: "u64" },
} as const;

type LibXxhash = Deno.DynamicLibrary<typeof XXHASH_SYMBOLS>["symbols"];
let libxxhashLoaded: LibXxhash | null | undefined;

/** The system's xxHash library through FFI, or null (no FFI permission, not Linux, missing). */
function libxxhash(): LibXxhash | null {
  if (libxxhashLoaded !== undefined) return libxxhashLoaded;
  libxxhashLoaded = null;
  try {
    if (Deno.build.os !== "linux") return null;
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
    libxxhashLoaded = Deno.dlopen("libxxhash.so.0", XXHASH_SYMBOLS).symbols;
  } catch {
    libxxhashLoaded = null;
  }
  return libxxhashLoaded;
}

/** A libxxhash state (seed 0), freed after `use` (for hashes of several pieces). */
function withState(x: LibXxhash, use: (state: Deno.PointerObject) => void): bigint {
  const state = x.XXH64_createState();
  if (state === null) throw new Error("XXH64_createState: out of memory");
  try {
    x.XXH64_reset(state, 0n);
    use(state);
    return BigInt(x.XXH64_digest(state));
  } finally {
    x.XXH64_freeState(state);
  }
}

/** The XXH64 implementations (see the module comment). */
export type Xxh64Implementation = "libxxhash" | "native" | "wasm";

/**
 * XXH64 (seed 0) as a {@link Checksum}: the first implementation that loads in the
 * module comment's order, or `only` that one (null where it does not load). For tests
 * and measurements; {@link loadChecksum} picks.
 *
 * @example
 * ```ts
 * import { loadXxh64 } from "./checksum.ts";
 * import assert from "node:assert/strict";
 *
 * const wasm = (await loadXxh64("wasm"))!;
 * assert.equal(wasm.checksum(new TextEncoder().encode("abc")), "44BC2CF5AD770999");
 * const best = (await loadXxh64())!;
 * assert.equal(best.checksum(new TextEncoder().encode("abc")), "44BC2CF5AD770999");
 * ```
 */
export async function loadXxh64(
  only?: Xxh64Implementation,
): Promise<{ implementation: Xxh64Implementation; checksum: Checksum } | null> {
  const x = only === undefined || only === "libxxhash" ? libxxhash() : null;
  if (x !== null) {
    return {
      implementation: "libxxhash",
      checksum: (...pieces) =>
        hex16(
          pieces.length === 1
            ? BigInt(x.XXH64(pieces[0], BigInt(pieces[0].length), 0n))
            : withState(x, (st) => {
              for (const p of pieces) x.XXH64_update(st, p, BigInt(p.length));
            }),
        ),
    };
  }
  if (only === "libxxhash") return null;
  const native = only === "wasm" ? null : nativeXxhash();
  if (native !== null) {
    return {
      implementation: "native",
      checksum: (...pieces) => {
        if (pieces.length === 1) return hex16(native.xxh64(pieces[0], 0n));
        const h = new native.Xxh64(0n);
        for (const p of pieces) h.update(p);
        return hex16(h.digest());
      },
    };
  }
  if (only === "native") return null;
  const { default: xxhash } = await import("xxhash-wasm"); // loaded only when needed
  const { h64Raw, create64 } = await xxhash();
  return {
    implementation: "wasm",
    checksum: (...pieces) => {
      if (pieces.length === 1) return hex16(h64Raw(pieces[0], 0n));
      const h = create64(0n);
      for (const p of pieces) h.update(p);
      return hex16(h.digest());
    },
  };
}

/** XXH64 of pieces computed on another thread; see {@link loadThreadedXxh64}. */
export type ThreadedChecksum = (...pieces: Uint8Array[]) => Promise<string>;

/**
 * XXH64 (seed 0, as 16 upper-case hex digits) computed on one of Deno's blocking
 * threads by the system's xxHash library (`libxxhash.so.0`), so that the caller goes
 * on meanwhile; null without FFI permission or the library. The pieces must not
 * change until the promise settles.
 *
 * @example
 * ```ts
 * import { loadChecksum, loadThreadedXxh64 } from "./checksum.ts";
 * import assert from "node:assert/strict";
 *
 * const threaded = loadThreadedXxh64(); // null without --allow-ffi or libxxhash.so.0
 * const abc = new TextEncoder().encode("abc");
 * if (threaded !== null) {
 *   assert.equal(await threaded(abc), (await loadChecksum("xxhash"))(abc));
 *   assert.equal(await threaded(abc.subarray(0, 1), abc.subarray(1)), "44BC2CF5AD770999");
 * }
 * ```
 */
export function loadThreadedXxh64(): ThreadedChecksum | null {
  const x = libxxhash();
  if (x === null) return null;
  return async (...pieces) => {
    if (pieces.length === 1) {
      return hex16(BigInt(await x.XXH64_threaded(pieces[0], BigInt(pieces[0].length), 0n)));
    }
    // Several pieces (a member across two input buffers): one after another, in a state.
    const state = x.XXH64_createState();
    if (state === null) throw new Error("XXH64_createState: out of memory");
    try {
      x.XXH64_reset(state, 0n);
      for (const p of pieces) await x.XXH64_update_threaded(state, p, BigInt(p.length));
      return hex16(BigInt(x.XXH64_digest(state)));
    } finally {
      x.XXH64_freeState(state);
    }
  };
}

async function loadSha1(): Promise<Checksum> {
  const { createHash } = await import("node:crypto"); // loaded only when needed
  return (...pieces) => {
    const h = createHash("sha1");
    for (const p of pieces) h.update(p);
    return h.digest("hex");
  };
}

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
  if (kind === "sha1") return sha1 ??= loadSha1();
  xxh64 ??= loadXxh64().then((x) => x!.checksum);
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
