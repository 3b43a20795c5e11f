/**
 * Decompressing one qcow2 compressed cluster: raw deflate (no zlib header) or zstd,
 * through `node:zlib`. The byte range a compressed L2 entry names is rounded up to
 * whole 512-byte sectors, so it usually ends with the start of the next compressed
 * cluster; decompression stops when one full cluster has been produced and reports
 * how many input bytes the compressed data really used.
 *
 * @module
 */
import { constants, inflateRawSync, zstdDecompressSync } from "node:zlib";
import { CorruptImageError } from "../errors.ts";
import { COMPRESSION_ZSTD } from "./constants.ts";

/** A decompressed cluster and the number of input bytes its compressed form used. */
export interface DecompressedCluster {
  /** Exactly one cluster of bytes. */
  data: Uint8Array;
  /** Input bytes the compressed data occupied (≤ the input length). */
  used: number;
}

/**
 * Decompresses `input` (the bytes an L2 entry's compressed descriptor names, maybe
 * cut short at the end of the stream) into exactly `clusterSize` bytes.
 * `compressionType` is the header's (0 deflate, 1 zstd); `offset` is the stream
 * offset of `input`, for messages. Throws {@link CorruptImageError} when the data is
 * not valid or yields less than a cluster.
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
  const out = compressionType === COMPRESSION_ZSTD
    ? zstdCluster(input, clusterSize, offset)
    : deflateCluster(input, clusterSize, offset);
  if (out.data.length < clusterSize) {
    throw new CorruptImageError(
      `compressed cluster (${input.length} bytes) decompresses to ${out.data.length} bytes, ` +
        `less than the ${clusterSize}-byte cluster: the data is corrupt or truncated`,
      offset,
    );
  }
  return out;
}

function deflateCluster(input: Uint8Array, clusterSize: number, offset: number) {
  try {
    return inflateCluster(input, clusterSize, clusterSize);
  } catch (err) {
    if ((err as { code?: string }).code !== "ERR_BUFFER_TOO_LARGE") {
      throw corrupt("deflate", err, offset);
    }
  }
  // Data that inflates past one cluster: QEMU keeps the first cluster. Retry with a
  // bounded allowance (a deflate bomb is refused, not inflated).
  try {
    return inflateCluster(input, clusterSize, 2 * clusterSize + OVERFLOW_ALLOWANCE);
  } catch (err) {
    throw corrupt("deflate", err, offset);
  }
}

/** Extra output accepted beyond two clusters when compressed data overflows its cluster. */
const OVERFLOW_ALLOWANCE = 1024 * 1024;

function inflateCluster(input: Uint8Array, clusterSize: number, limit: number) {
  // Z_SYNC_FLUSH: data that fills the cluster without an end-of-stream marker is
  // accepted, as QEMU does; trailing bytes after the end marker are ignored.
  const r = inflateRawSync(
    input,
    {
      finishFlush: constants.Z_SYNC_FLUSH,
      maxOutputLength: limit,
      chunkSize: clusterSize, // one output buffer in the common case: no growing and joining
      info: true,
    } as Parameters<typeof inflateRawSync>[1],
  ) as unknown as {
    buffer: Uint8Array;
    engine: { bytesWritten: number };
  };
  const out = r.buffer;
  return {
    data: new Uint8Array(out.buffer, out.byteOffset, Math.min(out.length, clusterSize)),
    used: Math.min(input.length, r.engine.bytesWritten),
  };
}

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
const ZSTD_SKIPPABLE = 0x184d2a50;

function zstdCluster(input: Uint8Array, clusterSize: number, offset: number) {
  // node:zlib refuses bytes after the last frame, so find where the frames end.
  // QEMU writes one frame per cluster; several are accepted, as QEMU's reader does.
  const parts: Uint8Array[] = [];
  let produced = 0;
  let at = 0;
  while (produced < clusterSize && at < input.length) {
    const end = zstdFrameEnd(input, at, offset);
    if (end === null) break;
    try {
      const out = zstdDecompressSync(input.subarray(at, end));
      parts.push(out);
      produced += out.length;
    } catch (err) {
      throw corrupt("zstd", err, offset + at);
    }
    at = end;
  }
  const data = new Uint8Array(Math.max(produced, 0));
  let o = 0;
  for (const p of parts) {
    data.set(p, o);
    o += p.length;
  }
  return { data: data.subarray(0, clusterSize), used: at };
}

/**
 * End of the zstd frame starting at `at` (walking the frame header and block
 * headers), or null when the input ends before the frame does.
 */
function zstdFrameEnd(input: Uint8Array, at: number, offset: number): number | null {
  const v = new DataView(input.buffer, input.byteOffset, input.byteLength);
  if (at + 4 > input.length) return null;
  const magic = v.getUint32(at, true);
  if ((magic & ZSTD_SKIPPABLE_MASK) >>> 0 === ZSTD_SKIPPABLE) {
    if (at + 8 > input.length) return null;
    const end = at + 8 + v.getUint32(at + 4, true);
    return end <= input.length ? end : null;
  }
  if (magic !== ZSTD_MAGIC) {
    throw new CorruptImageError(
      `compressed cluster is not zstd data (magic 0x${magic.toString(16)})`,
      offset + at,
    );
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

function corrupt(kind: string, err: unknown, offset: number): CorruptImageError {
  const msg = err instanceof Error ? err.message : String(err);
  return new CorruptImageError(`compressed cluster is not valid ${kind} data: ${msg}`, offset, {
    cause: err,
  });
}
