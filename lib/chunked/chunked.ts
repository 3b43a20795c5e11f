/**
 * vhd-tool's chunked protocol (`--source-protocol chunked`, XAPI's
 * `import_raw_vdi?chunked=true`): before each piece of data a 12-byte little-endian
 * header `{u64 byte offset, u32 length}`, and a header of 0/0 at the end. The pieces
 * may come in any order; what no piece covers is left as it is, so a chunked stream
 * of the changed clusters applies a diff.
 *
 * @module
 */
import { CorruptImageError } from "../errors.ts";
import { type ChunkStream, DECODE_FLUSH_BYTES } from "../io/chunk_stream.ts";
import type { ImageTarget } from "../io/endpoint.ts";

/** Bytes of a chunk header. */
export const CHUNK_HEADER_BYTES = 12;

/** Pieces written (queued) between two flushes of the target at most. */
const MAX_HELD_PIECES = 4096;

/** The largest length a header can carry. */
export const MAX_CHUNK_LENGTH = 0xffffffff;

/**
 * The 12-byte header announcing `length` bytes for byte `offset` of the disk
 * (`encodeChunkHeader(0, 0)` ends the stream).
 *
 * @example
 * ```ts
 * import { encodeChunkHeader } from "./chunked.ts";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(
 *   [...encodeChunkHeader(0x10000, 512)],
 *   [0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0],
 * );
 * ```
 */
export function encodeChunkHeader(offset: number, length: number): Uint8Array {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`bad offset ${offset}`);
  if (!Number.isInteger(length) || length < 0 || length > MAX_CHUNK_LENGTH) {
    throw new RangeError(`bad chunk length ${length}`);
  }
  const out = new Uint8Array(CHUNK_HEADER_BYTES);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(offset), true);
  view.setUint32(8, length, true);
  return out;
}

/** Options of {@link decodeChunkedStream}. */
export interface ChunkedDecodeOptions {
  /** The disk's size: a piece reaching past it is refused before it is written. */
  size: number;
  /** Called with the stream bytes consumed so far. */
  onProgress?: (done: number) => void;
}

/** What {@link decodeChunkedStream} read. */
export interface ChunkedResult {
  /** Data bytes written. */
  dataBytes: number;
  /** Pieces of data. */
  pieces: number;
  /** Stream bytes read, the end header included. */
  streamBytes: number;
}

/**
 * Reads a chunked stream from `input` into `target` until its end header. Refuses a
 * stream that ends without the end header, a piece past `size`, and an offset that
 * does not fit in a JavaScript number, naming the stream offset. The target is
 * flushed before this returns.
 *
 * @example
 * ```ts
 * import { decodeChunkedStream, encodeChunkHeader } from "./chunked.ts";
 * import { ChunkStream } from "../io/chunk_stream.ts";
 * import assert from "node:assert/strict";
 *
 * const disk = new Uint8Array(8);
 * const target = {
 *   queued: 0,
 *   write: (at: number, b: Uint8Array, from: number, to: number) =>
 *     disk.set(b.subarray(from, to), at),
 *   zero: () => {},
 *   flush: () => Promise.resolve(),
 * };
 * const stream = ReadableStream.from([
 *   encodeChunkHeader(2, 3), new Uint8Array([7, 8, 9]), encodeChunkHeader(0, 0),
 * ]);
 * const r = await decodeChunkedStream(new ChunkStream(stream), target, { size: 8 });
 * assert.equal(r.dataBytes, 3);
 * assert.deepEqual([...disk], [0, 0, 7, 8, 9, 0, 0, 0]);
 * ```
 */
export async function decodeChunkedStream(
  input: ChunkStream,
  target: ImageTarget,
  options: ChunkedDecodeOptions,
): Promise<ChunkedResult> {
  let pos = 0;
  let dataBytes = 0;
  let pieces = 0;
  let held: Uint8Array[] = [];
  const flush = async () => {
    await target.flush();
    for (const c of held) input.release(c);
    held = [];
  };
  for (;;) {
    const head = await input.readCopy(CHUNK_HEADER_BYTES);
    if (head.length < CHUNK_HEADER_BYTES) {
      throw new CorruptImageError(
        head.length === 0
          ? "the chunked stream ended without its end header (offset 0, length 0): it was cut short"
          : `the chunked stream ended inside a chunk header (${head.length} of 12 bytes)`,
        pos,
      );
    }
    const view = new DataView(head.buffer, head.byteOffset, CHUNK_HEADER_BYTES);
    const offset = view.getBigUint64(0, true);
    const length = view.getUint32(8, true);
    pos += CHUNK_HEADER_BYTES;
    if (offset === 0n && length === 0) {
      // Bytes after the end (two streams joined, or a stream written over another) would
      // be dropped unseen; a peer that keeps its connection open sends none.
      const extra = input.idle() ? null : await input.next();
      if (extra !== null) {
        throw new CorruptImageError(
          `bytes follow the chunked stream's end header (offset 0, length 0): this is not ` +
            `one chunked stream (two joined, or trailing garbage)`,
          pos,
        );
      }
      break;
    }
    if (offset + BigInt(length) > BigInt(options.size)) {
      throw new CorruptImageError(
        `a chunk writes ${length} bytes at disk offset ${offset}, past the disk's size of ` +
          `${options.size} bytes (give the right --size, or this stream is for another disk)`,
        pos - CHUNK_HEADER_BYTES,
      );
    }
    let at = Number(offset);
    let left = length;
    while (left > 0) {
      const chunk = await input.next();
      if (chunk === null) {
        throw new CorruptImageError(
          `the chunked stream ended inside a chunk: ${left} of its ${length} bytes ` +
            `(for disk offset ${offset}) are missing`,
          pos,
        );
      }
      const take = Math.min(left, chunk.length);
      target.write(at, chunk, 0, take);
      input.unshift(chunk.subarray(take));
      held.push(chunk);
      at += take;
      left -= take;
      pos += take;
      // Tiny pieces: their count bounds the memory held, not their bytes.
      if (target.queued >= DECODE_FLUSH_BYTES || held.length >= MAX_HELD_PIECES) await flush();
    }
    dataBytes += length;
    pieces++;
    options.onProgress?.(pos);
  }
  await flush();
  options.onProgress?.(pos);
  return { dataBytes, pieces, streamBytes: pos };
}
