/**
 * Decompressing one qcow2 compressed cluster: raw deflate (no zlib header) or zstd,
 * through `node:zlib`. The byte range a compressed L2 entry names is rounded up to
 * whole 512-byte sectors, so it usually ends with the start of the next compressed
 * cluster; decompression stops when one full cluster has been produced and reports
 * how many input bytes the compressed data really used.
 *
 * The work itself is {@link makeDecompressor}, a self-contained function: worker
 * threads run its source text (see decompress_pool.ts), since a bundled or compiled
 * diskstream has no module file next to it that a worker could load.
 *
 * @module
 */
import * as zlib from "node:zlib";
import { CorruptImageError } from "../errors.ts";
import { makeNativeCodecs, type NativeCodecs } from "../io/native_codecs.ts";

/** A decompressed cluster and the number of input bytes its compressed form used. */
export interface DecompressedCluster {
  /** Exactly one cluster of bytes. */
  data: Uint8Array;
  /** Input bytes the compressed data occupied (≤ the input length). */
  used: number;
}

/** Why compressed data was refused, and where (an offset into the input). */
export interface DecompressFailure {
  /** What is wrong, as a predicate: "is not valid deflate data: …". */
  error: string;
  at: number;
}

/** What a decompressor returns: the cluster, or why not. */
export type DecompressResult = DecompressedCluster | DecompressFailure;

/**
 * The decompression function {@link makeDecompressor} returns. With `out` (one
 * cluster long), the cluster is made there and the result's `data` is `out`.
 */
export type Decompressor = (
  input: Uint8Array,
  clusterSize: number,
  compressionType: number,
  out?: Uint8Array,
) => DecompressResult;

/**
 * Returns the decompression function over `native` (the system's libraries, see
 * io/native_codecs.ts), falling back on `z` (`node:zlib`) wherever a native decoder
 * is missing or declines the input. It refers to nothing outside its own body, so
 * that its source text can run in a worker.
 *
 * Deflate: data that fills the cluster without an end-of-stream marker is accepted
 * and bytes after the marker ignored, as QEMU does; data inflating past the cluster
 * keeps the first cluster (QEMU's behaviour), within a bounded allowance (a deflate
 * bomb is refused). zstd: one or more frames (QEMU writes one), read until a cluster
 * is complete, with the same bound.
 *
 * @example
 * ```ts
 * import * as zlib from "node:zlib";
 * import assert from "node:assert/strict";
 * import { makeDecompressor } from "./decompress.ts";
 * import { makeNativeCodecs } from "../io/native_codecs.ts";
 *
 * const decompress = makeDecompressor(zlib, makeNativeCodecs());
 * const cluster = new Uint8Array(512).fill(7);
 * const into = new Uint8Array(512);
 * const out = decompress(zlib.deflateRawSync(cluster), 512, 0, into);
 * assert.ok("data" in out);
 * assert.equal(out.data, into); // made in place
 * assert.deepEqual(into, cluster);
 * ```
 */
export function makeDecompressor(
  z: typeof zlib,
  native: Pick<NativeCodecs, "inflateRaw" | "zstd"> = { inflateRaw: null, zstd: null },
): Decompressor {
  const COMPRESSION_ZSTD = 1;
  /** Extra output accepted (and dropped) when compressed data overflows its cluster. */
  const OVERFLOW_ALLOWANCE = 1024 * 1024;
  const ZSTD_MAGIC = 0xfd2fb528;
  const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
  const ZSTD_SKIPPABLE = 0x184d2a50;

  const message = (err: unknown) => err instanceof Error ? err.message : String(err);
  const invalid = (kind: string, err: unknown, at: number): DecompressFailure => ({
    error: `is not valid ${kind} data: ${message(err)}`,
    at,
  });

  function inflate(input: Uint8Array, clusterSize: number, limit: number): DecompressedCluster {
    // Z_SYNC_FLUSH: data that fills the cluster without an end-of-stream marker is
    // accepted, as QEMU does; trailing bytes after the end marker are ignored.
    const r = z.inflateRawSync(
      input,
      {
        finishFlush: z.constants.Z_SYNC_FLUSH,
        maxOutputLength: limit,
        chunkSize: clusterSize, // one output buffer in the common case: no growing and joining
        info: true,
      } as Parameters<typeof z.inflateRawSync>[1],
    ) as unknown as { buffer: Uint8Array; engine: { bytesWritten: number } };
    const out = r.buffer;
    return {
      data: new Uint8Array(out.buffer, out.byteOffset, Math.min(out.length, clusterSize)),
      used: Math.min(input.length, r.engine.bytesWritten),
    };
  }

  function deflateCluster(input: Uint8Array, clusterSize: number): DecompressResult {
    try {
      return inflate(input, clusterSize, clusterSize);
    } catch (err) {
      if ((err as { code?: string }).code !== "ERR_BUFFER_TOO_LARGE") {
        return invalid("deflate", err, 0);
      }
    }
    // Data that inflates past one cluster: QEMU keeps the first cluster.
    try {
      return inflate(input, clusterSize, 2 * clusterSize + OVERFLOW_ALLOWANCE);
    } catch (err) {
      return invalid("deflate", err, 0);
    }
  }

  /**
   * End of the zstd frame starting at `at` (walking the frame header and block
   * headers), null when the input ends before the frame does, or why it is not zstd.
   */
  function zstdFrameEnd(input: Uint8Array, at: number): number | null | DecompressFailure {
    const v = new DataView(input.buffer, input.byteOffset, input.byteLength);
    if (at + 4 > input.length) return null;
    const magic = v.getUint32(at, true);
    if ((magic & ZSTD_SKIPPABLE_MASK) >>> 0 === ZSTD_SKIPPABLE) {
      if (at + 8 > input.length) return null;
      const end = at + 8 + v.getUint32(at + 4, true);
      return end <= input.length ? end : null;
    }
    if (magic !== ZSTD_MAGIC) {
      return { error: `is not zstd data (magic 0x${magic.toString(16)})`, at };
    }
    if (at + 5 > input.length) return null;
    const fhd = input[at + 4];
    const fcsFlag = fhd >> 6;
    const singleSegment = (fhd >> 5) & 1;
    const checksum = (fhd >> 2) & 1;
    const didFlag = fhd & 3;
    let p = at + 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][didFlag] +
      [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
    for (;;) {
      if (p + 3 > input.length) return null;
      const bh = input[p] | (input[p + 1] << 8) | (input[p + 2] << 16);
      const last = bh & 1;
      const type = (bh >> 1) & 3;
      const size = bh >>> 3;
      p += 3 + (type === 1 ? 1 : size);
      if (last) break;
    }
    p += checksum ? 4 : 0;
    return p <= input.length ? p : null;
  }

  function zstdCluster(input: Uint8Array, clusterSize: number): DecompressResult {
    // node:zlib refuses bytes after the last frame, so find where the frames end.
    // QEMU writes one frame per cluster; several are accepted, as QEMU's reader does.
    let data: Uint8Array | null = null; // made when a cluster takes several frames
    let produced = 0;
    let at = 0;
    while (produced < clusterSize && at < input.length) {
      const end = zstdFrameEnd(input, at);
      if (end === null) break;
      if (typeof end !== "number") return end;
      try {
        // Bounded: output past the cluster is dropped, and a bomb refused.
        const lacking = clusterSize - produced;
        const out = z.zstdDecompressSync(input.subarray(at, end), {
          maxOutputLength: lacking + OVERFLOW_ALLOWANCE,
          chunkSize: Math.max(64, lacking),
        });
        const keep = Math.min(out.length, lacking);
        if (produced === 0 && keep === clusterSize) {
          // One frame (as QEMU writes): its output is the cluster, no copy.
          return { data: new Uint8Array(out.buffer, out.byteOffset, keep), used: end };
        }
        data ??= new Uint8Array(clusterSize);
        data.set(out.subarray(0, keep), produced);
        produced += keep;
      } catch (err) {
        return invalid("zstd", err, at);
      }
      at = end;
    }
    return { data: (data ?? new Uint8Array(0)).subarray(0, produced), used: at };
  }

  return (input, clusterSize, compressionType, into) => {
    const zstd = compressionType === COMPRESSION_ZSTD;
    const fast = zstd ? native.zstd : native.inflateRaw;
    if (fast !== null) {
      // The plain case natively; the native decoder declines anything else.
      const out = into ?? new Uint8Array(clusterSize);
      const used = fast(input, out);
      if (used >= 0) return { data: out, used };
    }
    const out = zstd ? zstdCluster(input, clusterSize) : deflateCluster(input, clusterSize);
    if ("data" in out && out.data.length < clusterSize) {
      return {
        error: `decompresses to ${out.data.length} bytes (from ${input.length}), less than ` +
          `the ${clusterSize}-byte cluster: the data is corrupt or truncated`,
        at: 0,
      };
    }
    if ("data" in out && into !== undefined) {
      into.set(out.data);
      return { data: into, used: out.used };
    }
    return out;
  };
}

const decompress = makeDecompressor(zlib, makeNativeCodecs());

/**
 * The cluster of a {@link DecompressResult}, or its {@link CorruptImageError} thrown:
 * `offset` is the stream offset of the compressed data, `guest` the guest cluster it
 * holds (of `clusterSize` bytes), when known.
 */
export function clusterOrThrow(
  result: DecompressResult,
  offset: number,
  guest?: { cluster: number; clusterSize: number },
): DecompressedCluster {
  if (!("error" in result)) return result;
  const what = guest === undefined
    ? "compressed cluster"
    : `the compressed data of guest cluster ${guest.cluster} (guest offset ` +
      `${guest.cluster * guest.clusterSize})`;
  throw new CorruptImageError(`${what} ${result.error}`, offset + result.at);
}

/**
 * Decompresses `input` (the bytes an L2 entry's compressed descriptor names, maybe
 * cut short at the end of the stream) into exactly `clusterSize` bytes, on this
 * thread. `compressionType` is the header's (0 deflate, 1 zstd); `offset` is the
 * stream offset of `input`, for messages. Throws {@link CorruptImageError} when the
 * data is not valid or yields less than a cluster.
 *
 * @example
 * ```ts
 * import { deflateRawSync } from "node:zlib";
 * import assert from "node:assert/strict";
 * import { decompressCluster } from "./decompress.ts";
 *
 * const cluster = new Uint8Array(512).fill(7);
 * const packed = deflateRawSync(cluster);
 * const withTail = new Uint8Array(512);
 * withTail.set(packed);
 * const out = decompressCluster(withTail, 512, 0, 0);
 * assert.deepEqual(out.data, cluster);
 * assert.equal(out.used, packed.length);
 * ```
 */
export function decompressCluster(
  input: Uint8Array,
  clusterSize: number,
  compressionType: number,
  offset: number,
): DecompressedCluster {
  return clusterOrThrow(decompress(input, clusterSize, compressionType), offset);
}
