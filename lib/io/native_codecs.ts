/**
 * The system's decompression libraries through FFI — libdeflate or zlib for raw
 * deflate, libzstd for zstd — decoding straight into a caller's buffer with one
 * decoder state reused for every call. `node:zlib` allocates a fresh state and output
 * buffer per call, which costs four to six times the decoding itself for 64 KiB
 * pieces (measured: raw deflate 0.5 ms of CPU per 64 KiB cluster through `node:zlib`,
 * 0.26 ms through zlib here, 0.1 ms through libdeflate; zstd 0.45 ms against 0.08 ms).
 *
 * Always optional: without `--allow-ffi`, off Linux on a 64-bit processor, or without
 * the libraries, {@link makeNativeCodecs} gives null decoders and callers use
 * `node:zlib`. A decoder accepts only the plain case — the data fills the buffer
 * exactly and ends cleanly — and answers -1 for anything else, so every unusual or
 * corrupt input is judged (and reported) by the portable path.
 *
 * {@link makeNativeCodecs} refers to nothing outside its own body, so that worker
 * threads can run its source text (see qcow2/decompress_pool.ts).
 *
 * @module
 */

/** Decodes `input` into all of `out`: the input bytes used, or -1 (see the module comment). */
export type NativeDecoder = (input: Uint8Array, out: Uint8Array) => number;

/** Decoders found on this system, and the library behind each (null: none). */
export interface NativeCodecs {
  /** Raw deflate (no zlib header), as qcow2 compressed clusters hold it. */
  inflateRaw: NativeDecoder | null;
  /** One zstd frame (bytes after it are ignored). */
  zstd: NativeDecoder | null;
  /** The library behind each decoder, e.g. `{ deflate: "libdeflate", zstd: "libzstd" }`. */
  names: { deflate: string | null; zstd: string | null };
}

/** Which libraries {@link makeNativeCodecs} may use, in order of preference. */
export interface NativeCodecChoice {
  /** Default `["libdeflate", "zlib"]`; `[]` for none. */
  deflate?: string[];
  /** Default `["libzstd"]`; `[]` for none. */
  zstd?: string[];
}

/**
 * Opens the decoders `choice` allows that this system has (see the module comment).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deflateRawSync } from "node:zlib";
 * import { makeNativeCodecs } from "./native_codecs.ts";
 *
 * const codecs = makeNativeCodecs();
 * const data = new Uint8Array(4096).fill(9);
 * const packed = deflateRawSync(data);
 * if (codecs.inflateRaw) { // null without --allow-ffi or without the libraries
 *   const out = new Uint8Array(4096);
 *   assert.equal(codecs.inflateRaw(packed, out), packed.length);
 *   assert.deepEqual(out, data);
 * }
 * ```
 */
export function makeNativeCodecs(choice: NativeCodecChoice = {}): NativeCodecs {
  const codecs: NativeCodecs = {
    inflateRaw: null,
    zstd: null,
    names: { deflate: null, zstd: null },
  };
  try {
    if (
      Deno.build.os !== "linux" ||
      (Deno.build.arch !== "x86_64" && Deno.build.arch !== "aarch64") || // LP64 structs below
      Deno.permissions.querySync({ name: "ffi" }).state !== "granted"
    ) {
      return codecs;
    }
  } catch {
    return codecs;
  }
  const open = <S extends Deno.ForeignLibraryInterface>(file: string, symbols: S) => {
    try {
      return Deno.dlopen(file, symbols).symbols;
    } catch {
      return null;
    }
  };
  /** A size_t result: a number, or -1 for an error code (size_t values near 2^64). */
  const size = (r: number | bigint) => r > Number.MAX_SAFE_INTEGER ? -1 : Number(r);

  function libdeflate(): NativeDecoder | null {
    const lib = open(
      "libdeflate.so.0",
      {
        libdeflate_alloc_decompressor: { parameters: [], result: "pointer" },
        libdeflate_deflate_decompress_ex: {
          parameters: ["pointer", "buffer", "usize", "buffer", "usize", "buffer", "buffer"],
          result: "i32",
        },
      } as const,
    );
    const d = lib?.libdeflate_alloc_decompressor();
    if (!lib || !d) return null;
    const inUsed = new BigUint64Array(new ArrayBuffer(8));
    const outMade = new BigUint64Array(new ArrayBuffer(8));
    return (input, out) => {
      const r = lib.libdeflate_deflate_decompress_ex(
        d,
        input,
        BigInt(input.length),
        out,
        BigInt(out.length),
        inUsed,
        outMade,
      );
      // 0: LIBDEFLATE_SUCCESS; the stream's end reached with the buffer full.
      return r === 0 && Number(outMade[0]) === out.length ? Number(inUsed[0]) : -1;
    };
  }

  function zlib(): NativeDecoder | null {
    const lib = open(
      "libz.so.1",
      {
        zlibVersion: { parameters: [], result: "pointer" },
        inflateInit2_: { parameters: ["buffer", "i32", "buffer", "i32"], result: "i32" },
        inflateReset: { parameters: ["buffer"], result: "i32" },
        inflate: { parameters: ["buffer", "i32"], result: "i32" },
      } as const,
    );
    const version = lib?.zlibVersion();
    if (!lib || !version) return null;
    // z_stream on LP64: next_in, avail_in, total_in, next_out, avail_out, total_out,
    // msg, state, zalloc, zfree, opaque, data_type, adler, reserved (8 bytes each).
    // zlib keeps its state pointing back at this memory: it must never move, and an
    // ArrayBuffer's memory does not.
    const STREAM_SIZE = 112;
    const stream = new Uint8Array(new ArrayBuffer(STREAM_SIZE));
    const fields = new BigUint64Array(stream.buffer);
    const name = new Deno.UnsafePointerView(version).getCString();
    const z = new TextEncoder().encode(`${name}\0`);
    if (lib.inflateInit2_(stream, -15, z, STREAM_SIZE) !== 0) return null; // -15: raw deflate
    const address = (bytes: Uint8Array) =>
      BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes)));
    const Z_FINISH = 4;
    const Z_STREAM_END = 1;
    return (input, out) => {
      if (input.length === 0 || lib.inflateReset(stream) !== 0) return -1;
      fields[0] = address(input);
      fields[1] = BigInt(input.length);
      fields[3] = address(out);
      fields[4] = BigInt(out.length);
      const r = lib.inflate(stream, Z_FINISH);
      fields[0] = fields[3] = 0n; // no pointer into JavaScript memory outlives the call
      const used = input.length - Number(fields[1] & 0xffffffffn);
      return r === Z_STREAM_END && (fields[4] & 0xffffffffn) === 0n ? used : -1;
    };
  }

  function libzstd(): NativeDecoder | null {
    const lib = open(
      "libzstd.so.1",
      {
        ZSTD_createDCtx: { parameters: [], result: "pointer" },
        ZSTD_findFrameCompressedSize: { parameters: ["buffer", "usize"], result: "usize" },
        ZSTD_decompressDCtx: {
          parameters: ["pointer", "buffer", "usize", "buffer", "usize"],
          result: "usize",
        },
      } as const,
    );
    const d = lib?.ZSTD_createDCtx();
    if (!lib || !d) return null;
    return (input, out) => {
      const frame = lib.ZSTD_findFrameCompressedSize(input, BigInt(input.length));
      if (size(frame) <= 0) return -1;
      const made = size(lib.ZSTD_decompressDCtx(d, out, BigInt(out.length), input, frame));
      return made === out.length ? Number(frame) : -1;
    };
  }

  const pick = (names: string[], makers: Record<string, () => NativeDecoder | null>) => {
    for (const name of names) {
      const decoder = Object.hasOwn(makers, name) ? makers[name]() : null;
      if (decoder) return { name, decoder };
    }
    return null;
  };
  const deflate = pick(choice.deflate ?? ["libdeflate", "zlib"], { libdeflate, zlib });
  const zstd = pick(choice.zstd ?? ["libzstd"], { libzstd });
  codecs.inflateRaw = deflate?.decoder ?? null;
  codecs.names.deflate = deflate?.name ?? null;
  codecs.zstd = zstd?.decoder ?? null;
  codecs.names.zstd = zstd?.name ?? null;
  return codecs;
}
