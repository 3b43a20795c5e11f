/**
 * Writes the streaming qcow2 layout (see layout.ts) as a sequence of large chunks:
 * the header cluster with its feature name table, the refcount table, the refcount
 * blocks (any width from 1 to 64 bits), the L1 table, the non-empty L2 tables in L1
 * order, then the data clusters in ascending guest order, read straight into the
 * chunk that carries them. Tables are generated as the stream advances from the
 * cluster set, never held whole, so memory stays at a few chunks whatever the disk.
 *
 * @module
 */
import { viewOf, writeU64 } from "../bytes.ts";
import { setRuns } from "../alloc/runs.ts";
import type { ClusterSet } from "../alloc/cluster_set.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { EXT_FEATURE_TABLE, FEATURE_NAMES, QCOW2_MAGIC, V3_HEADER_LENGTH } from "./constants.ts";
import type { StreamLayout } from "./layout.ts";

/** Where the data clusters' bytes come from (a {@link DiskSource} fits). */
export interface ClusterReader {
  /** Fills `buf` with the bytes at `position`; bytes at or past `limit` read as zeros. */
  readAt(buf: Uint8Array, position: number, limit?: number): Promise<void>;
}

/** Options of {@link qcow2Chunks}. */
export interface WriterOptions {
  /** Bytes of the source that exist (beyond: zero padding); default the virtual size. */
  sourceSize?: number;
  /** Target chunk size in bytes (rounded to whole clusters); default 4 MiB. */
  chunkSize?: number;
  /** Called after each read of data with the number of bytes read. */
  onData?: (bytes: number) => void;
  /**
   * Recycle a small ring of chunk buffers instead of allocating each chunk (much
   * faster): a chunk then stays valid only until the consumer asks for the next one,
   * as a loop that writes each chunk before reading the next does.
   */
  reuseBuffers?: boolean;
}

const FEATURE_ENTRY_BYTES = 48;
const HI = 2 ** 32;
const COPIED_HI = 0x80000000;

/** Sets the big-endian u64 `value | COPIED` (bit 63) at `offset`. */
function setCopied(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, (Math.floor(value / HI) | COPIED_HI) >>> 0);
  view.setUint32(offset + 4, value >>> 0);
}

/** Fills cluster 0: the v3 header and the feature name table extension at 112. */
export function writeHeaderCluster(cluster: Uint8Array, layout: StreamLayout): void {
  const v = viewOf(cluster);
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, 3); // version
  // 8 backing_file_offset, 16 backing_file_size: 0
  v.setUint32(20, layout.clusterBits);
  writeU64(v, 24, layout.virtualSize);
  // 32 crypt_method: 0
  v.setUint32(36, layout.l1Size);
  writeU64(v, 40, layout.l1TableOffset);
  writeU64(v, 48, layout.refcountTableOffset);
  v.setUint32(56, layout.refcountTableClusters);
  // 60 nb_snapshots, 64 snapshots_offset, 72 incompatible, 80 compatible,
  // 88 autoclear: 0
  v.setUint32(96, layout.refcountOrder);
  v.setUint32(100, V3_HEADER_LENGTH);
  // 104..111: compression type 0 and padding
  let at = V3_HEADER_LENGTH;
  v.setUint32(at, EXT_FEATURE_TABLE);
  v.setUint32(at + 4, FEATURE_NAMES.length * FEATURE_ENTRY_BYTES);
  at += 8;
  const encoder = new TextEncoder();
  for (const [type, bit, name] of FEATURE_NAMES) {
    cluster[at] = type;
    cluster[at + 1] = bit;
    encoder.encodeInto(name, cluster.subarray(at + 2, at + FEATURE_ENTRY_BYTES));
    at += FEATURE_ENTRY_BYTES;
  }
  // The end-of-extensions marker is the zero padding that follows.
}

/**
 * Sets the first `count` refcounts of a refcount block to 1 for a width of `bits`
 * (1–64). Widths of 8 bits and more are big-endian; narrower entries sit least
 * significant first in each byte.
 */
export function fillRefcounts(block: Uint8Array, count: number, bits: number): void {
  if (bits >= 8) {
    const step = bits / 8;
    for (let n = 0, at = step - 1; n < count; n++, at += step) block[at] = 1;
    return;
  }
  const perByte = 8 / bits;
  const ones = (n: number) => {
    let byte = 0;
    for (let j = 0; j < n; j++) byte |= 1 << (j * bits);
    return byte;
  };
  const full = Math.floor(count / perByte);
  block.fill(ones(perByte), 0, full);
  if (count % perByte) block[full] = ones(count % perByte);
}

/** Chunk buffers in the ring when they are reused (see WriterOptions.reuseBuffers). */
const POOL_SIZE = 6;
/**
 * Filled chunks whose reads go on while the one before is handed out: with the chunk
 * being filled, the consumer's and a stream's queued ones, all fit in the ring.
 */
export const READS_AHEAD = 1;

/**
 * Hands out space in chunk buffers of about `chunkSize` bytes and queues each buffer
 * once it is full. Space is only taken after the previous space is completely
 * written, so a queued buffer is always finished. (Also used by the VHD writer.)
 */
export class ChunkSink {
  #chunkSize: number;
  #left: number;
  #buf: Uint8Array | null = null;
  #used = 0;
  #ready: { buf: Uint8Array; reads: Promise<void>[] }[] = [];
  #pool: Uint8Array[] | null;
  #turn = 0;
  /** Reads into the current buffer. */
  #reads: Promise<void>[] = [];

  constructor(total: number, chunkSize: number, reuse: boolean) {
    this.#left = total;
    this.#chunkSize = chunkSize;
    this.#pool = reuse ? [] : null;
  }

  /** Bytes left in the current buffer. */
  get free(): number {
    return this.#buf === null ? 0 : this.#buf.length - this.#used;
  }

  /**
   * `n` bytes (n ≤ chunk size), zeroed unless `zero` is false (the caller then
   * overwrites all of them); starts a new buffer when they do not fit.
   */
  take(n: number, zero = true): Uint8Array {
    if (n > this.free) this.#next();
    const space = this.#buf!.subarray(this.#used, this.#used + n);
    this.#used += n;
    if (zero && this.#pool !== null) space.fill(0);
    return space;
  }

  #next(): void {
    this.flush();
    const size = Math.min(this.#chunkSize, this.#left);
    if (this.#pool === null) {
      this.#buf = new Uint8Array(size);
    } else {
      const slot = this.#turn++ % POOL_SIZE;
      this.#pool[slot] ??= new Uint8Array(this.#chunkSize);
      this.#buf = this.#pool[slot].subarray(0, size);
    }
  }

  /** Queues the current buffer (what was taken of it) with the reads into it. */
  flush(): void {
    if (this.#buf !== null && this.#used > 0) {
      this.#ready.push({ buf: this.#buf.subarray(0, this.#used), reads: this.#reads });
      this.#reads = [];
      this.#left -= this.#used;
    }
    this.#buf = null;
    this.#used = 0;
  }

  /**
   * Registers a read into space taken from the current buffer: the reads of several
   * buffers run side by side (a remote source keeps many requests in flight), and a
   * buffer is handed out by {@link ChunkSink.drainRead} only once its reads are done.
   */
  reading(read: Promise<void>): void {
    read.catch(() => {}); // reported by drainRead
    this.#reads.push(read);
  }

  /** The finished buffers, in order (for buffers no read goes into). */
  *drain(): Generator<Uint8Array> {
    while (this.#ready.length > 0) {
      const { buf, reads } = this.#ready.shift()!;
      if (reads.length > 0) throw new Error("ChunkSink.drain: reads still running (use drainRead)");
      yield buf;
    }
  }

  /**
   * The finished buffers, in order, each once its reads are done; the last `keep`
   * stay queued with their reads running (so that reading goes on while the consumer
   * writes). Throws the first failed read.
   */
  async *drainRead(keep = 0): AsyncGenerator<Uint8Array> {
    while (this.#ready.length > keep) {
      const { buf, reads } = this.#ready.shift()!;
      await Promise.all(reads);
      yield buf;
    }
  }
}

/** The L1 indices (L2 tables) that map at least one cluster of `clusters`, ascending. */
function* l2TableIndices(clusters: ClusterSet, perTable: number): Generator<number> {
  let last = -1;
  for (const [first, end] of setRuns(clusters)) {
    for (let t = Math.max(last + 1, Math.floor(first / perTable)); t <= end / perTable; t++) {
      yield t;
      last = t;
    }
  }
}

/** Number of L2 tables needed to map `clusters` (for the layout). */
export function countL2Tables(clusters: ClusterSet, perTable: number): number {
  let n = 0;
  for (const _ of l2TableIndices(clusters, perTable)) n++;
  return n;
}

/** Whole clusters per chunk for a requested chunk size (at least one cluster). */
function chunkBytes(layout: StreamLayout, requested = CHUNK_SIZE): number {
  const cs = layout.clusterSize;
  return Math.max(cs, Math.floor(requested / cs) * cs);
}

/**
 * The metadata (header, refcount table and blocks, L1 and L2 tables) into `sink`,
 * yielding each chunk as it fills.
 */
function* metadataInto(
  sink: ChunkSink,
  layout: StreamLayout,
  clusters: ClusterSet,
): Generator<Uint8Array> {
  const cs = layout.clusterSize;
  const perTable = cs / 8;
  writeHeaderCluster(sink.take(cs), layout);

  // Refcount table: entry i points at refcount block i.
  for (let t = 0, entry = 0; t < layout.refcountTableClusters; t++) {
    const view = viewOf(sink.take(cs));
    for (let k = 0; k < perTable && entry < layout.refcountBlocks; k++, entry++) {
      writeU64(view, k * 8, layout.refcountBlockOffset + entry * cs);
    }
    yield* sink.drain();
  }

  // Refcount blocks: every cluster of the file has refcount 1, the rest 0.
  const perBlock = (cs * 8) / layout.refcountBits;
  for (let b = 0, left = layout.totalClusters; b < layout.refcountBlocks; b++) {
    const count = Math.min(left, perBlock);
    fillRefcounts(sink.take(cs), count, layout.refcountBits);
    left -= count;
    yield* sink.drain();
  }

  // L1 table: the n-th non-empty L2 table sits at l2TableOffset + n * cs.
  let l1Cluster = -1;
  let l1View: DataView | null = null;
  let n = 0;
  for (const t of l2TableIndices(clusters, perTable)) {
    while (l1Cluster < Math.floor(t / perTable)) {
      yield* sink.drain();
      l1View = viewOf(sink.take(cs));
      l1Cluster++;
    }
    setCopied(l1View!, (t % perTable) * 8, layout.l2TableOffset + n++ * cs);
  }
  while (++l1Cluster < layout.l1Clusters) {
    yield* sink.drain();
    sink.take(cs);
  }

  // L2 tables: the k-th data cluster sits at dataOffset + k * cs.
  let table = -1;
  let l2View: DataView | null = null;
  let k = 0;
  for (const [first, last] of setRuns(clusters)) {
    for (let i = first; i <= last; i++) {
      const t = Math.floor(i / perTable);
      if (t !== table) {
        yield* sink.drain();
        l2View = viewOf(sink.take(cs));
        table = t;
      }
      setCopied(l2View!, (i - t * perTable) * 8, layout.dataOffset + k++ * cs);
    }
  }
  yield* sink.drain();
}

/**
 * The image's bytes before the data clusters (`layout.dataOffset` of them), in chunks
 * of about `chunkSize`: for writers that move the data by other means.
 */
export function* qcow2MetadataChunks(
  layout: StreamLayout,
  clusters: ClusterSet,
  chunkSize = CHUNK_SIZE,
): Generator<Uint8Array> {
  const sink = new ChunkSink(layout.dataOffset, chunkBytes(layout, chunkSize), false);
  yield* metadataInto(sink, layout, clusters);
  sink.flush();
  yield* sink.drain();
}

/**
 * The bytes of the image, in chunks of about `chunkSize`, for `layout` with the data
 * clusters `clusters` (guest indices) read from `source`.
 */
export async function* qcow2Chunks(
  layout: StreamLayout,
  clusters: ClusterSet,
  source: ClusterReader,
  options: WriterOptions = {},
): AsyncGenerator<Uint8Array> {
  const cs = layout.clusterSize;
  const chunkSize = chunkBytes(layout, options.chunkSize);
  const sink = new ChunkSink(layout.fileSize, chunkSize, options.reuseBuffers === true);
  const limit = options.sourceSize ?? layout.virtualSize;
  yield* metadataInto(sink, layout, clusters);

  // Data clusters, ascending, read in runs straight into the chunk buffers (the reads
  // of this chunk and the next side by side).
  for (const [first, last] of setRuns(clusters)) {
    for (let i = first; i <= last;) {
      let fit = Math.floor(sink.free / cs);
      if (fit === 0) {
        sink.flush();
        yield* sink.drainRead(READS_AHEAD);
        fit = chunkSize / cs;
      }
      const count = Math.min(last - i + 1, fit);
      const space = sink.take(count * cs, false);
      sink.reading(source.readAt(space, i * cs, limit).then(() => options.onData?.(space.length)));
      i += count;
    }
  }
  sink.flush();
  yield* sink.drainRead();
}
