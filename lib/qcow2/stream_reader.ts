/**
 * The one-pass qcow2 decoder: reads a qcow2 image from a stream (a pipe, a socket),
 * front to back, without seeking, and writes the guest's bytes to an
 * {@link ImageTarget}. It copes with any layout: metadata first (QEMU's
 * qcow2-to-stdout.py, `diskstream export`) or L2 tables interleaved with data
 * (`qemu-img convert`), compressed clusters (deflate, zstd), ZERO entries, v2 and v3,
 * extended L2 entries (32 subclusters per cluster, each allocated, zero or neither).
 *
 * How: the header gives the L1 table's place; the L1 table gives the L2 tables'
 * places; each L2 table gives the places of its data and compressed clusters. Those
 * ranges form an agenda (see {@link StreamWalker}); data is written as it streams by.
 * Bytes that arrive before the table that maps them are held in a bounded buffer
 * and claimed later; once every L2 table is known the rest of the stream is skipped.
 * Memory is proportional to the metadata plus that buffer, not to the disk.
 *
 * @module
 */
import { ClusterSet, lowerBound } from "../alloc/cluster_set.ts";
import { viewOf } from "../bytes.ts";
import { CorruptImageError, UnsupportedError } from "../errors.ts";
import type { ImageTarget } from "../io/endpoint.ts";
import { LOST_RANGE, StreamBuffer, ZERO_RANGE } from "../io/stream_buffer.ts";
import type { SeekableInput } from "../io/file_input.ts";
import type { Spool } from "../io/spool.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import {
  type ChunkStream,
  type Expected,
  Mode,
  RecordRun,
  StreamWalker,
  walkChunks,
  type WalkerFormat,
} from "../io/stream_walker.ts";
import {
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
} from "./constants.ts";
import { DecompressPool, DeferredWrites } from "./decompress_pool.ts";
import { HEADER_PROBE_BYTES, parseQcow2Header, type Qcow2Header } from "./header.ts";

/** What a decoder learned from the image's header, before any data is written. */
export interface StreamImageInfo {
  format: "qcow2" | "vhd";
  /** Virtual size in bytes. */
  virtualSize: number;
  /** Grain of the allocation: the cluster size (qcow2) or block size (VHD). */
  unit: number;
}

/** Options of the stream decoders. */
export interface StreamDecodeOptions {
  /** Most memory for bytes that arrive before the metadata mapping them. */
  maxBuffer: number;
  /**
   * The stream is a diff to apply onto its base: a backing file (qcow2) or parent
   * (VHD) is allowed, and unallocated ranges are left alone.
   */
  delta?: boolean;
  /** Called after every chunk with the bytes read and the expected total (0 if unknown). */
  onProgress?: (done: number, total: number) => void;
  /** The stream's length, when known (a regular file). */
  streamLength?: number;
  /** Where bytes go that do not fit in `maxBuffer`; none: they are refused. */
  spool?: Spool | null;
  /**
   * Worker threads that decompress compressed clusters (default: one per processor
   * but one, at least 1, at most 4; 0: all on the main thread).
   */
  workers?: number;
}

const DATA = 0;
const COMPRESSED = 1;
const L2 = 2;
const L1 = 3;
const REFCOUNT_TABLE = 4;
/** A table already read by random access, or metadata the import never needs. */
const UNNEEDED = 5;
/** The fixed part (40 bytes) of a snapshot table entry. */
const SNAPSHOT = 6;
/** A snapshot's L1 table: its L2 tables that the active L1 does not share are unneeded. */
const SNAPSHOT_L1 = 7;
/** A refcount block (read only to tell a snapshot's own data clusters, see #track). */
const REFCOUNT_BLOCK = 8;
/** An L2 table only snapshots use: its clusters that nothing else uses are unneeded. */
const SNAPSHOT_L2 = 9;
/** The bitmap directory: its bitmap tables and their data clusters are unneeded. */
const BITMAP_DIR = 10;
/** A bitmap table: its data clusters are unneeded. */
const BITMAP_TABLE = 11;
/** The `aux` of {@link UNNEEDED} ranges, for messages. */
const UNNEEDED_L1 = -1;
const UNNEEDED_REFCOUNTS = -2;
const UNNEEDED_SNAPSHOTS = -3;
const UNNEEDED_BITMAPS = -4;
/** Per kind: true for compressed data only. */
const ONLY_COMPRESSED: readonly boolean[] = Array.from({ length: 12 }, (_, k) => k === COMPRESSED);
/** Bytes of a snapshot table entry before its variable part. */
const SNAPSHOT_ENTRY = 40;
/** Bytes of a bitmap directory entry before its variable part. */
const BITMAP_ENTRY = 24;
/** Most refcount block bytes read to tell the clusters only a snapshot uses. */
const MAX_REFCOUNT_READ = 64 * 1024 * 1024;
/** Most snapshot L2 tables remembered while the active L1 table is not known yet. */
const MAX_WAITING_L2S = 1024 * 1024;
/** Host offset bits of an L1/L2/bitmap table entry. */
const OFFSET_HI_MASK = 0x00ffffff;
/** Subclusters per cluster with extended L2 entries. */
const SUBCLUSTERS = 32;
/** QEMU's smallest cluster_bits with extended L2 entries (16 KiB clusters). */
const MIN_EXTL2_BITS = 14;

/**
 * Decompressed bytes that may wait to be written (with the compressed bytes on their
 * way to the workers, a few MiB more): a stream of tiny compressed clusters must not
 * fill memory.
 */
const MAX_PENDING = 16 * 1024 * 1024;

/** Decodes a qcow2 stream; `open` gets the destination once the header is read. */
export async function decodeQcow2Stream(
  input: ChunkStream,
  opts: StreamDecodeOptions,
  open: (info: StreamImageInfo) => Promise<ImageTarget>,
): Promise<StreamImageInfo> {
  const header = await readHeader(input, !!opts.delta);
  const info: StreamImageInfo = {
    format: "qcow2",
    virtualSize: header.size,
    unit: header.clusterSize,
  };
  const pool = new DecompressPool(header.clusterSize, header.compressionType, opts.workers);
  const target = new DeferredWrites(await open(info), header.clusterSize, {
    beforeWait: () => pool.send(),
    written: (bytes) => pool.release(bytes),
  });
  try {
    const reader = new Qcow2StreamReader(header, target, opts, input.seekable, pool);
    await walkChunks(input, reader.walker, target, () => {
      opts.onProgress?.(reader.walker.pos, reader.expectedEnd());
    });
  } finally {
    pool.close();
  }
  return info;
}

/** Reads cluster 0 and checks that the image can be imported on its own. */
async function readHeader(input: ChunkStream, delta: boolean): Promise<Qcow2Header> {
  const probe = await input.read(HEADER_PROBE_BYTES);
  if (probe.length >= 4 && viewOf(probe).getUint32(0) !== QCOW2_MAGIC) {
    const magic = viewOf(probe).getUint32(0).toString(16).padStart(8, "0");
    throw new CorruptImageError(`not a qcow2 image: bad magic 0x${magic}`, 0);
  }
  if (probe.length < 24) parseQcow2Header(probe); // throws the precise error
  const bits = viewOf(probe).getUint32(20);
  if (bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) parseQcow2Header(probe);
  input.unshift(probe);
  const cluster0 = await input.read(2 ** bits);
  if (cluster0.length < 2 ** bits) {
    parseQcow2Header(cluster0); // a clear message if the header itself is cut
    throw new CorruptImageError(
      `the stream ends at byte ${cluster0.length}, inside the qcow2 header cluster ` +
        `(${2 ** bits} bytes): the stream is truncated`,
      cluster0.length,
    );
  }
  const h = parseQcow2Header(cluster0);
  if (h.cryptMethod !== 0) {
    throw new UnsupportedError(
      `the qcow2 image is encrypted (${
        h.cryptMethod === 1 ? "AES" : h.cryptMethod === 2 ? "LUKS" : `method ${h.cryptMethod}`
      }); decrypt it first (qemu-img convert with --object secret,...)`,
    );
  }
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n || h.dataFile !== undefined) {
    throw new UnsupportedError(
      `the qcow2 image keeps its data in an external data file${
        h.dataFile ? ` (${h.dataFile})` : ""
      }, which a stream cannot carry; import that raw file instead`,
    );
  }
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n && h.clusterBits < MIN_EXTL2_BITS) {
    // QEMU refuses to open these: a subcluster would be smaller than 512 bytes.
    throw new CorruptImageError(
      `the qcow2 image uses extended L2 entries with ${h.clusterSize}-byte clusters; ` +
        `extended L2 needs clusters of at least ${2 ** MIN_EXTL2_BITS} bytes`,
      20,
    );
  }
  if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
    throw new CorruptImageError(
      "the qcow2 image is marked corrupt; repair it with qemu-img check -r all",
      72,
    );
  }
  if (h.backingFileOffset !== 0 && h.backingFileSize > 0 && !delta) {
    throw new UnsupportedError(
      `the qcow2 image has a backing file${
        h.backingFile ? ` (${h.backingFile})` : ""
      }, so its unallocated clusters are not in the stream; apply it onto a copy of the base ` +
        "with --delta, or flatten it first (qemu-img convert)",
    );
  }
  return h;
}

/** The qcow2 side of the walk: what tables, data and compressed ranges mean. */
class Qcow2StreamReader implements WalkerFormat {
  readonly modes = [
    Mode.Stream,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Skip,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
    Mode.Assemble,
  ];
  /** Compressed data may share its first and last sectors, and may stop short at the end. */
  readonly sharesTail = ONLY_COMPRESSED;
  readonly partialOk = ONLY_COMPRESSED;
  /** Compressed data is copied or decoded before onRange returns. */
  readonly transient = ONLY_COMPRESSED;

  /** Decompressed clusters waiting to be written bound the memory: stop reading for them. */
  full(): boolean {
    return this.#target.pending >= MAX_PENDING;
  }
  readonly walker: StreamWalker;
  readonly #h: Qcow2Header;
  readonly #target: DeferredWrites;
  readonly #pool: DecompressPool;
  readonly #cs: number;
  readonly #size: number;
  readonly #l2Entries: number;
  /** Extended L2 entries: 16 bytes each, the second word a subcluster bitmap. */
  readonly #extL2: boolean;
  /** Bytes of one L2 entry (8, or 16 with extended L2). */
  readonly #entryBytes: number;
  /**
   * Grain of a DATA range's `aux` (the guest offset / unit): the cluster size, or the
   * subcluster size with extended L2.
   */
  readonly #unit: number;
  readonly #clusters: number;
  /** A diff onto its base: unallocated subclusters are left alone, not zeroed. */
  readonly #delta: boolean;
  readonly #l1Used: number;
  readonly #csizeShift: number;
  #l1Read = false;
  #pendingL2 = 0;
  /**
   * With snapshots (and a clean image: refcounts up to date), the refcount blocks are
   * read: a data cluster that a snapshot's own L2 table maps and whose refcount is 1 is
   * used by nothing else, so it is unneeded — the old data of a snapshotted and then
   * rewritten image is let go (and its spool space given back) as soon as the snapshot's
   * tables are known, not kept until the last active L2 table.
   */
  readonly #track: boolean;
  /** Host clusters whose refcount is exactly 1 (from the refcount blocks read). */
  #single: ClusterSet | null = null;
  /** Snapshot L2 tables seen before the active L1 table (which says which are shared). */
  #snapshotL2s: number[] = [];
  /** Start of every optional range queued (see #optional). */
  readonly #optionalSeen = new Set<number>();
  readonly #maxBuffer: number;
  /** Host offsets of the L2 tables, ascending, for messages. */
  #l2Offsets = new Float64Array(0);
  /** The size of the file the tables were read from (see {@link #readTables}). */
  #fileSize = Infinity;
  #expectedEnd: number;

  /**
   * With `tables` (a file or device), the L1 and L2 tables are read from it by random
   * access first: the walk then only meets data, in file order, and holds nothing.
   */
  constructor(
    h: Qcow2Header,
    target: DeferredWrites,
    opts: StreamDecodeOptions,
    tables: SeekableInput | null,
    pool: DecompressPool,
  ) {
    this.#h = h;
    this.#target = target;
    this.#pool = pool;
    this.#cs = h.clusterSize;
    this.#size = h.size;
    this.#extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.#entryBytes = this.#extL2 ? 16 : 8;
    this.#l2Entries = h.clusterSize / this.#entryBytes;
    this.#unit = this.#extL2 ? h.clusterSize / SUBCLUSTERS : h.clusterSize;
    this.#clusters = Math.ceil(h.size / h.clusterSize);
    this.#delta = !!opts.delta;
    this.#l1Used = Math.min(h.l1Size, Math.ceil(this.#clusters / this.#l2Entries));
    this.#csizeShift = 62 - (h.clusterBits - 8);
    this.#maxBuffer = opts.maxBuffer;
    this.#track = h.nbSnapshots > 0 && (h.incompatibleFeatures & INCOMPAT_DIRTY) === 0n &&
      !tables;
    // Held pieces never cross a unit, so that claiming a subcluster frees its memory.
    const buffer = new StreamBuffer(opts.maxBuffer, this.#unit, opts.spool ?? null);
    this.walker = new StreamWalker(this, h.clusterSize, buffer);
    this.#expectedEnd = h.clusterSize;
    const run = this.walker.newRun(4);
    if (h.refcountTableClusters > 0) {
      const length = h.refcountTableClusters * this.#cs;
      if (tables) this.#expect(run, UNNEEDED, h.refcountTableOffset, length, UNNEEDED_REFCOUNTS);
      else this.#expect(run, REFCOUNT_TABLE, h.refcountTableOffset, length, 0);
    }
    if (this.#l1Used === 0) {
      this.#l1Read = true;
      this.walker.stopBuffering();
    } else if (tables) {
      this.#readTables(tables, run);
    } else {
      this.#expect(run, L1, h.l1TableOffset, this.#l1Used * 8, 0);
      this.#expectUnneeded(run);
    }
    this.walker.add(run);
  }

  /** The stream offset up to which the metadata known so far reaches. */
  expectedEnd(): number {
    return Math.max(this.#expectedEnd, this.walker.pos);
  }

  /** Reads the L1 table and every L2 table from `file`, adjacent tables in one read. */
  #readTables(file: SeekableInput, meta: RecordRun) {
    const h = this.#h;
    const cs = this.#cs;
    this.#expect(meta, UNNEEDED, h.l1TableOffset, this.#l1Used * 8, UNNEEDED_L1);
    const l1 = new Uint8Array(this.#l1Used * 8);
    file.readInto(h.l1TableOffset, l1, "the qcow2 L1 table");
    // The ranges the tables name take memory that follows the L2 tables the file holds:
    // one range per entry, and with extended L2 up to 15 more (its allocated subclusters
    // in runs), each of those a subcluster or more of the file (a range past its end is
    // refused as it is named, see #expect; overlapping ones are refused later);
    // RecordRun.SLOT_BYTES (25) each, in a run that grows by doubling.
    this.#fileSize = file.size;
    const entries = Math.min(this.#l1Used * cs, file.size) / this.#entryBytes;
    const more = this.#extL2
      ? Math.min(entries * (SUBCLUSTERS / 2 - 1), file.size / this.#unit)
      : 0;
    this.walker.allowMetadata(2 * RecordRun.SLOT_BYTES * (entries + more));
    const refs = this.#l2Refs(l1);
    refs.sort();
    this.#l2Offsets = refs.start.slice(0, refs.count); // sorted above
    const data = this.walker.newRun(64);
    const most = Math.max(1, Math.floor(CHUNK_SIZE / cs));
    const buf = new Uint8Array(Math.min(refs.count, most) * cs);
    for (let i = 0; i < refs.count;) {
      let j = i + 1;
      while (j < refs.count && j - i < most && refs.start[j] === refs.start[j - 1] + cs) j++;
      if (j < refs.count && refs.start[j] === refs.start[j - 1]) {
        throw new CorruptImageError(
          `L1 entries ${refs.aux[j - 1]} and ${refs.aux[j]} point to the same L2 table at ` +
            `${refs.start[j]}`,
          h.l1TableOffset + refs.aux[j] * 8,
        );
      }
      const bytes = buf.subarray(0, (j - i) * cs);
      file.readInto(refs.start[i], bytes, `the qcow2 L2 tables at ${refs.start[i]}`);
      for (let k = i; k < j; k++) {
        this.#expect(meta, UNNEEDED, refs.start[k], cs, refs.aux[k]);
        this.#readL2(
          bytes.subarray((k - i) * cs, (k - i + 1) * cs),
          refs.aux[k],
          refs.start[k],
          data,
        );
      }
      i = j;
    }
    this.walker.add(data);
    this.#l1Read = true;
    this.walker.stopBuffering();
  }

  /** Snapshot table and bitmap directory: found later, dropped from the buffer. */
  #expectUnneeded(run: RecordRun) {
    const h = this.#h;
    if (h.nbSnapshots > 0) this.#expect(run, SNAPSHOT, h.snapshotsOffset, SNAPSHOT_ENTRY, 0);
    const dir = h.bitmapDirectory;
    if (dir && dir.size > 0 && dir.size <= MAX_L1_BYTES && dir.offset % this.#cs === 0) {
      this.#optional(run, BITMAP_DIR, dir.offset, dir.size, 0);
    }
  }

  /**
   * Stream range `[start, start + length)` holds metadata the import never needs: it is
   * passed over when it comes, or let go if it is held already.
   */
  #unneeded(run: RecordRun, start: number, length: number, aux: number) {
    const pos = this.walker.pos;
    const end = start + length;
    if (start < pos) this.walker.buffer?.drop(start, Math.min(end, pos) - start);
    if (end > pos) run.add(UNNEEDED, Math.max(start, pos), end - Math.max(start, pos), aux);
  }

  /**
   * A data range that the file read by {@link #readTables} does not hold whole: the
   * image is truncated, refused as the range is named (before anything is written, and
   * before the ranges of a hostile table take memory).
   */
  #pastFile(start: number, aux: number): CorruptImageError {
    // The first cluster (subcluster) of the range that the file does not hold whole.
    const unit = this.#unit;
    const k = Math.floor(Math.max(0, this.#fileSize - start) / unit);
    const at = start + k * unit;
    return new CorruptImageError(
      `${this.describe(DATA, aux + k)} lies at bytes ${at}–${at + unit - 1}, past ` +
        `the end of the ${this.#fileSize}-byte file: the image is truncated`,
      this.#fileSize,
    );
  }

  /** Queues a future range, or claims a past one from the buffer right away. */
  #expect(run: RecordRun, kind: number, start: number, length: number, aux: number) {
    const end = start + length;
    if (kind === DATA && end > this.#fileSize) throw this.#pastFile(start, aux);
    if (end > this.#expectedEnd && kind !== UNNEEDED) this.#expectedEnd = end;
    if (start >= this.walker.pos) {
      const last = run.count - 1;
      if (
        kind === DATA && last >= 0 && run.kind[last] === DATA &&
        aux * this.#unit + length <= this.#size && // the cluster cut by the end stays apart
        run.start[last] + run.length[last] === start &&
        run.aux[last] + run.length[last] / this.#unit === aux
      ) {
        // The next guest cluster in the next host cluster: one longer range (an image
        // whose data follows its tables in order costs one range per table, not per cluster).
        run.length[last] += length;
        return;
      }
      run.add(kind, start, length, aux);
      if (kind === L2) this.#pendingL2++;
      return;
    }
    const buffer = this.walker.buffer;
    if (kind === COMPRESSED) {
      const bytes = buffer?.read(start, length);
      if (bytes === LOST_RANGE) return; // the import fails once every table is known
      if (!bytes) throw this.#missing(kind, aux, start);
      try {
        this.onRange(kind, start, aux, bytes);
      } catch (err) {
        if (bytes.length < length) throw this.#missing(kind, aux, start + bytes.length);
        throw err;
      }
      return;
    }
    const optional = kind === SNAPSHOT || kind === SNAPSHOT_L1 || kind === SNAPSHOT_L2 ||
      kind === REFCOUNT_BLOCK || kind === BITMAP_DIR || kind === BITMAP_TABLE;
    const got = buffer?.take(start, length, optional);
    if (got === LOST_RANGE) return;
    if (optional) {
      // Optional knowledge: read it when held, else never mind.
      if (got !== undefined) {
        this.onRange(kind, start, aux, got === ZERO_RANGE ? new Uint8Array(length) : got);
      }
      return;
    }
    if (got === undefined) throw this.#missing(kind, aux, start);
    if (kind === DATA) {
      if (got === ZERO_RANGE) this.#zeroAt(aux * this.#unit, length);
      else this.onBytes(DATA, aux, 0, got, 0, got.length);
    } else if (kind === L2 && got !== ZERO_RANGE) {
      this.#readL2(got, aux, start);
    } else if (kind === REFCOUNT_TABLE && got !== ZERO_RANGE) {
      this.#readRefcountTable(got);
    }
  }

  /** Stream-mode bytes: data clusters go straight to the destination. */
  onBytes(_kind: number, aux: number, at: number, chunk: Uint8Array, from: number, to: number) {
    const guest = aux * this.#unit + at;
    const end = Math.min(guest + (to - from), this.#size);
    if (end > guest) this.#target.write(guest, chunk, from, from + (end - guest));
  }

  /** Data clusters (not the one cut by the end of the disk) may be spliced. */
  directOffset(kind: number, aux: number, at: number, length: number): number {
    const guest = aux * this.#unit + at;
    return kind === DATA && guest + length <= this.#size ? guest : -1;
  }

  onRange(kind: number, start: number, aux: number, bytes: Uint8Array): number | void {
    switch (kind) {
      case L2:
        this.#pendingL2--;
        return this.#readL2(bytes, aux, start);
      case L1:
        return this.#readL1(bytes);
      case COMPRESSED: {
        const guest = aux * this.#cs;
        const write = (data: Uint8Array) => {
          const end = Math.min(guest + data.length, this.#size);
          if (end > guest) this.#target.write(guest, data, 0, end - guest);
        };
        if (this.walker.buffer === null) {
          // Every table is known, so no byte after the compressed data can belong to a
          // range still unknown: the length it used does not matter, and a worker may
          // decompress it (the pool copies `bytes`, which may be a view of an input
          // chunk reused later).
          this.#target.defer(this.#pool.decompress(bytes, start, aux), write);
          return;
        }
        const { data, used } = this.#pool.decompressHere(bytes, start, aux);
        this.#target.defer(Promise.resolve(data), write); // its buffer is recycled once written
        return used;
      }
      case REFCOUNT_TABLE:
        return this.#readRefcountTable(bytes);
      case SNAPSHOT:
        return this.#readSnapshot(bytes, start, aux);
      case SNAPSHOT_L1:
        return this.#readSnapshotL1(bytes);
      case SNAPSHOT_L2:
        return this.#readSnapshotL2(bytes);
      case REFCOUNT_BLOCK:
        return this.#readRefcountBlock(bytes, aux);
      case BITMAP_DIR:
        return this.#readBitmapDirectory(bytes);
      case BITMAP_TABLE:
        return this.#readBitmapTable(bytes);
    }
  }

  /** Guest bytes `[guest, guest + length)` read as zeros (clipped to the virtual size). */
  #zeroAt(guest: number, length: number) {
    const n = Math.min(length, this.#size - guest);
    if (n > 0) this.#target.zero(guest, n);
  }

  /** The L2 tables the L1 table in `bytes` points to (aux: the L1 index), checked. */
  #l2Refs(bytes: Uint8Array): RecordRun {
    const v = viewOf(bytes);
    const run = this.walker.newRun(64);
    const base = this.#h.l1TableOffset;
    for (let i = 0; i < this.#l1Used; i++) {
      const hi = v.getUint32(i * 8);
      const lo = v.getUint32(i * 8 + 4);
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        throw new CorruptImageError(
          `L1 entry ${i} has reserved bits set (0x${hex(hi, lo)})`,
          base + i * 8,
        );
      }
      const off = (hi & 0x00ffffff) * 2 ** 32 + lo;
      if (off === 0) continue;
      if (off % this.#cs !== 0) {
        throw new CorruptImageError(
          `L1 entry ${i} points to an L2 table at ${off}, which is not cluster aligned`,
          base + i * 8,
        );
      }
      run.add(L2, off, this.#cs, i);
    }
    return run;
  }

  #readL1(bytes: Uint8Array) {
    const run = this.#l2Refs(bytes);
    this.#l2Offsets = run.start.slice(0, run.count).sort();
    const future = this.walker.newRun(run.count);
    for (let i = 0; i < run.count; i++) {
      this.#expect(future, L2, run.start[i], this.#cs, run.aux[i]);
    }
    this.walker.add(future);
    this.#l1Read = true; // only now: L2 tables read above from the buffer need it
    if (this.#snapshotL2s.length > 0) this.#snapshotTablesKnown();
    this.#checkAllKnown();
  }

  /**
   * Reads one L2 table: its data and compressed clusters (or subclusters) join the
   * agenda (`into`, or a run of their own added at once), its ZERO ones are zeroed.
   */
  #readL2(bytes: Uint8Array, l1Index: number, start: number, into?: RecordRun) {
    const v = viewOf(bytes);
    const cs = this.#cs;
    const ext = this.#extL2;
    const eb = this.#entryBytes;
    const first = l1Index * this.#l2Entries;
    const n = Math.min(this.#l2Entries, this.#clusters - first);
    const run = into ?? this.walker.newRun(64);
    const shift = this.#csizeShift - 32;
    const offMask = 2 ** shift - 1;
    for (let j = 0; j < n; j++) {
      const hi = v.getUint32(j * eb);
      const lo = v.getUint32(j * eb + 4);
      // Extended L2: bitmap bits 32–63 "reads as zeros", bits 0–31 "allocated".
      const zeros = ext ? v.getUint32(j * eb + 8) : 0;
      const alloc = ext ? v.getUint32(j * eb + 12) : 0;
      if ((hi | lo | zeros | alloc) === 0) continue;
      const cluster = first + j;
      if ((hi & 0x40000000) !== 0) {
        // Compressed: host byte offset in bits 0..x-1, extra sectors in bits x..61. With
        // extended L2 the whole cluster: its bitmap has no meaning (QEMU reads it so).
        const offHi = hi & offMask;
        const sectors = (hi & 0x3fffffff) >>> shift;
        if (offHi >= 2 ** 21) {
          throw this.#badEntry(start, j, cluster, hi, lo, "a compressed offset beyond 2^53");
        }
        const off = offHi * 2 ** 32 + lo;
        this.#expect(run, COMPRESSED, off, (sectors + 1) * 512 - (off % 512), cluster);
        continue;
      }
      if ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0) {
        throw this.#badEntry(start, j, cluster, hi, lo, "reserved bits set");
      }
      if ((lo & 1) !== 0 && !ext) {
        // ZERO (or ZERO_ALLOC: the host cluster's stale bytes must not be read). With
        // extended L2 bit 0 is "always 0" (qcow2.rst) and QEMU ignores it: the bitmap says.
        this.#zeroAt(cluster * cs, cs);
        continue;
      }
      const host = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
      if (host === 0 && !ext) continue;
      if (host % cs !== 0) {
        throw this.#badEntry(
          start,
          j,
          cluster,
          hi,
          lo,
          "a host offset that is not cluster aligned",
        );
      }
      if (ext) this.#readSubclusters(run, start + j * eb, cluster, host, zeros, alloc);
      else this.#expect(run, DATA, host, cs, cluster);
    }
    if (into) return;
    this.walker.add(run);
    this.#checkAllKnown();
  }

  /**
   * The subclusters of an extended L2 entry (at stream offset `at`) for a standard
   * cluster at `host` (0: none): runs of allocated ones join the agenda, their bytes
   * at the same place in the host cluster; "reads as zeros" ones are zeroed. Those
   * neither allocated nor zero read from the backing file: left alone with `delta`,
   * else zeroed as well when the entry has any other subcluster, so that every
   * subcluster of a cluster written is written (the destination fills whole clusters).
   * Allocated subclusters past the disk's end are not read (their bits still count
   * when the bitmap is checked, as QEMU counts them).
   */
  #readSubclusters(
    run: RecordRun,
    at: number,
    cluster: number,
    host: number,
    zeros: number,
    alloc: number,
  ) {
    const unit = this.#unit;
    // QEMU finds the whole cluster invalid when any of its subclusters, even past the
    // disk's end, is both allocated and zero, or allocated with no host cluster.
    const both = (zeros & alloc) >>> 0;
    if (both !== 0) {
      throw new CorruptImageError(
        `the extended L2 entry for guest cluster ${cluster} (subcluster bitmap ` +
          `0x${hex(zeros, alloc)}) marks subcluster ${lowestBit(both)} both allocated and ` +
          "reading as zeros; the image is corrupt (qemu-img check)",
        at,
      );
    }
    if (alloc !== 0 && host === 0) {
      throw new CorruptImageError(
        `the extended L2 entry for guest cluster ${cluster} (subcluster bitmap ` +
          `0x${hex(zeros, alloc)}) marks subcluster ${lowestBit(alloc)} allocated but gives ` +
          "no host offset; the image is corrupt (qemu-img check)",
        at,
      );
    }
    // Allocated subclusters past the disk's end are never read (nor by QEMU): their bytes
    // need not be in the stream.
    const inside = Math.ceil((this.#size - cluster * this.#cs) / unit);
    const used = inside < SUBCLUSTERS ? (alloc & (2 ** inside - 1)) >>> 0 : alloc;
    const base = cluster * SUBCLUSTERS;
    for (const [i, k] of bitRuns(used)) {
      this.#expect(run, DATA, host + i * unit, (k - i) * unit, base + i);
    }
    const zero = this.#delta ? zeros : (used | zeros) === 0 ? 0 : ~used >>> 0;
    for (const [i, k] of bitRuns(zero)) {
      this.#zeroAt(cluster * this.#cs + i * unit, (k - i) * unit);
    }
  }

  /**
   * The refcount blocks the refcount table points to are never needed to import: they
   * are dropped, or read (see {@link #track}) when they are few enough.
   */
  #readRefcountTable(bytes: Uint8Array) {
    const v = viewOf(bytes);
    const cs = this.#cs;
    const run = this.walker.newRun(16);
    let blocks = 0;
    for (let i = 0; i + 8 <= bytes.length; i += 8) {
      if (v.getUint32(i) | v.getUint32(i + 4)) blocks++;
    }
    const read = this.#track && blocks * cs <= MAX_REFCOUNT_READ;
    if (read) {
      const perBlock = (cs * 8) / this.#h.refcountBits;
      this.#single = new ClusterSet(bytes.length / 8 * perBlock, cs);
    }
    const offsets: number[] = [];
    for (let i = 0; i + 8 <= bytes.length; i += 8) {
      const hi = v.getUint32(i);
      const off = hi * 2 ** 32 + ((v.getUint32(i + 4) & 0xfffffe00) >>> 0);
      // Refcounts are not checked: an odd entry is left to qemu-img check.
      if (off === 0 || hi >= 2 ** 21 || off % cs !== 0) continue;
      if (read) this.#optional(run, REFCOUNT_BLOCK, off, cs, i / 8);
      else offsets.push(off);
    }
    this.walker.add(run);
    this.#unneededClusters(offsets, UNNEEDED_REFCOUNTS);
  }

  /**
   * The host clusters at `offsets` (any order, repeats allowed) are unneeded: passed
   * over when they come, let go if held; adjacent ones as one range.
   */
  #unneededClusters(offsets: number[], aux: number) {
    const cs = this.#cs;
    offsets.sort((a, b) => a - b);
    const run = this.walker.newRun(16);
    let from = -1;
    let to = -1;
    for (const off of offsets) {
      if (off < to) continue;
      if (off !== to) {
        if (from >= 0) this.#unneeded(run, from, to - from, aux);
        from = off;
      }
      to = off + cs;
    }
    if (from >= 0) this.#unneeded(run, from, to - from, aux);
    this.walker.add(run);
  }

  /**
   * The fixed part of snapshot entry `index`: the rest of the entry and the snapshot's
   * L1 table are unneeded, and the next entry follows.
   */
  #readSnapshot(bytes: Uint8Array, start: number, index: number) {
    const v = viewOf(bytes);
    const run = this.walker.newRun(4);
    const l1Offset = v.getUint32(0) * 2 ** 32 + v.getUint32(4);
    const l1Bytes = v.getUint32(8) * 8;
    const variable = v.getUint16(12) + v.getUint16(14) + v.getUint32(36);
    const end = start + Math.ceil((SNAPSHOT_ENTRY + variable) / 8) * 8;
    this.#unneeded(run, start + SNAPSHOT_ENTRY, end - start - SNAPSHOT_ENTRY, UNNEEDED_SNAPSHOTS);
    if (index + 1 < this.#h.nbSnapshots) {
      this.#expect(run, SNAPSHOT, end, SNAPSHOT_ENTRY, index + 1);
    }
    if (l1Bytes > 0 && l1Bytes <= MAX_L1_BYTES && l1Offset % this.#cs === 0 && l1Offset > 0) {
      this.#expect(run, SNAPSHOT_L1, l1Offset, l1Bytes, index);
    }
    this.walker.add(run);
  }

  /**
   * A snapshot's L1 table: its L2 tables that the active L1 table does not use are
   * unneeded (and read, with refcounts, for the data clusters only they map). Before
   * the active L1 table is known they wait for it.
   */
  #readSnapshotL1(bytes: Uint8Array) {
    const v = viewOf(bytes);
    const cs = this.#cs;
    const offsets = this.#snapshotL2s;
    for (let i = 0; i + 8 <= bytes.length; i += 8) {
      const off = (v.getUint32(i) & OFFSET_HI_MASK) * 2 ** 32 +
        ((v.getUint32(i + 4) & 0xfffffe00) >>> 0);
      if (off !== 0 && off % cs === 0 && offsets.length < MAX_WAITING_L2S) offsets.push(off);
    }
    if (this.#l1Read) this.#snapshotTablesKnown();
  }

  /** The snapshot L2 tables seen so far, now that the active ones are known. */
  #snapshotTablesKnown() {
    const offsets = this.#snapshotL2s.filter((off) => !this.#isL2Table(off));
    this.#snapshotL2s = [];
    if (!this.#single) {
      this.#unneededClusters(offsets, UNNEEDED_SNAPSHOTS);
      return;
    }
    offsets.sort((a, b) => a - b);
    const run = this.walker.newRun(offsets.length);
    for (const off of offsets) this.#optional(run, SNAPSHOT_L2, off, this.#cs, 0);
    this.walker.add(run);
  }

  /**
   * An L2 table only snapshots use: the clusters it maps whose refcount is 1 are used
   * by nothing else (a clean image's refcounts are exact), so they are unneeded. Should
   * an active L2 entry name one all the same, the import fails naming it: never a
   * wrong byte.
   */
  #readSnapshotL2(bytes: Uint8Array) {
    const single = this.#single!;
    const v = viewOf(bytes);
    const cs = this.#cs;
    const offsets: number[] = [];
    for (let i = 0; i + 8 <= bytes.length; i += this.#entryBytes) {
      const hi = v.getUint32(i);
      if ((hi & 0x40000000) !== 0) continue; // compressed: host clusters may be shared
      const off = (hi & OFFSET_HI_MASK) * 2 ** 32 + ((v.getUint32(i + 4) & 0xfffffe00) >>> 0);
      if (off === 0 || off % cs !== 0 || off / cs >= single.length) continue;
      if (single.has(off / cs)) offsets.push(off);
    }
    this.#unneededClusters(offsets, UNNEEDED_SNAPSHOTS);
  }

  /** Refcount block `index`: which host clusters it counts once. */
  #readRefcountBlock(bytes: Uint8Array, index: number) {
    const single = this.#single!;
    const bits = this.#h.refcountBits;
    const perBlock = (bytes.length * 8) / bits;
    const first = index * perBlock;
    const v = viewOf(bytes);
    for (let i = 0; i < perBlock; i++) {
      let one: boolean;
      if (bits === 16) one = v.getUint16(i * 2) === 1;
      else if (bits === 8) one = bytes[i] === 1;
      else if (bits === 32) one = v.getUint32(i * 4) === 1;
      else if (bits === 64) one = v.getUint32(i * 8) === 0 && v.getUint32(i * 8 + 4) === 1;
      else one = ((bytes[Math.floor(i * bits / 8)] >> ((i * bits) % 8)) & ((1 << bits) - 1)) === 1;
      if (one && first + i < single.length) single.add(first + i);
    }
  }

  /** The bitmap directory: each bitmap's table is unneeded, and read for its data clusters. */
  #readBitmapDirectory(bytes: Uint8Array) {
    const v = viewOf(bytes);
    const run = this.walker.newRun(4);
    for (let at = 0; at + BITMAP_ENTRY <= bytes.length;) {
      const offset = v.getUint32(at) * 2 ** 32 + v.getUint32(at + 4);
      const entries = v.getUint32(at + 8);
      const variable = v.getUint16(at + 18) + v.getUint32(at + 20);
      if (offset > 0 && offset % this.#cs === 0 && entries > 0 && entries * 8 <= MAX_L1_BYTES) {
        this.#optional(run, BITMAP_TABLE, offset, entries * 8, 0);
      }
      at += Math.ceil((BITMAP_ENTRY + variable) / 8) * 8;
    }
    this.walker.add(run);
  }

  /** A bitmap table: its data clusters are unneeded. */
  #readBitmapTable(bytes: Uint8Array) {
    const v = viewOf(bytes);
    const cs = this.#cs;
    const offsets: number[] = [];
    for (let i = 0; i + 8 <= bytes.length; i += 8) {
      const off = (v.getUint32(i) & OFFSET_HI_MASK) * 2 ** 32 +
        ((v.getUint32(i + 4) & 0xfffffe00) >>> 0);
      if (off !== 0 && off % cs === 0) offsets.push(off);
    }
    this.#unneededClusters(offsets, UNNEEDED_BITMAPS);
  }

  /**
   * Metadata the import may read to find more it never needs (each range once: tables
   * may be shared): queued, read from the buffer when held, else never mind.
   */
  #optional(run: RecordRun, kind: number, start: number, length: number, aux: number) {
    // Once every table is known nothing is kept to be let go; and never a large table.
    if (this.walker.buffer === null || length > this.#maxBuffer / 4) return;
    if (this.#optionalSeen.has(start)) return;
    this.#optionalSeen.add(start);
    this.#expect(run, kind, start, length, aux);
  }

  /** Called when an L2 table (or the L1 table) has been read. */
  #checkAllKnown() {
    if (!this.#l1Read || this.walker.buffer === null) return;
    if (this.#pendingL2 === 0) this.walker.stopBuffering();
  }

  /**
   * Once the L1 table is read: each L2 table still to come (and the one being read)
   * names at most one range per entry, in runs that grow by doubling.
   */
  metadataAhead(): number {
    if (!this.#l1Read) return Infinity;
    // An extended entry names up to 16 ranges: its allocated subclusters in runs. Entries
    // past the disk's end name none (a small disk's one table maps a few clusters).
    const perEntry = this.#extL2 ? SUBCLUSTERS / 2 : 1;
    const entries = Math.min((this.#pendingL2 + 1) * this.#l2Entries, this.#clusters);
    return entries * perEntry * RecordRun.SLOT_BYTES * 2;
  }

  describe(kind: number, aux: number): string {
    const cs = this.#cs;
    switch (kind) {
      case DATA:
        return this.#extL2
          ? `the data of guest cluster ${Math.floor(aux / SUBCLUSTERS)} subcluster ` +
            `${aux % SUBCLUSTERS} (guest offset ${aux * this.#unit})`
          : `the data of guest cluster ${aux} (guest offset ${aux * cs})`;
      case COMPRESSED:
        return `the compressed data of guest cluster ${aux} (guest offset ${aux * cs})`;
      case L2: {
        const from = aux * this.#l2Entries * cs;
        const to = Math.min(this.#size, from + this.#l2Entries * cs) - 1;
        return `the L2 table for guest offsets ${from}–${to} (L1 entry ${aux})`;
      }
      case L1:
        return `the L1 table (${this.#h.l1Size} entries)`;
      case REFCOUNT_TABLE:
        return "the refcount table";
      case SNAPSHOT:
        return `the snapshot table entry ${aux}`;
      case SNAPSHOT_L1:
        return `the L1 table of snapshot ${aux}`;
      case SNAPSHOT_L2:
        return "an L2 table only snapshots use";
      case REFCOUNT_BLOCK:
        return `refcount block ${aux}`;
      case BITMAP_DIR:
        return "the bitmap directory";
      case BITMAP_TABLE:
        return "a bitmap table";
      default:
        return aux === UNNEEDED_L1
          ? "the L1 table"
          : aux === UNNEEDED_REFCOUNTS
          ? "the refcount table or a refcount block"
          : aux === UNNEEDED_SNAPSHOTS
          ? "a snapshot's tables"
          : aux === UNNEEDED_BITMAPS
          ? "a bitmap's table or data"
          : `the L2 table of L1 entry ${aux}`;
    }
  }

  overlap(a: Expected, b: Expected): Error {
    const meta = (k: number) => k !== DATA && k !== COMPRESSED;
    const da = this.describe(a.kind, a.aux);
    const db = this.describe(b.kind, b.aux);
    let what: string;
    if (meta(a.kind) && !meta(b.kind)) what = `an L2 entry places ${db} inside metadata: ${da}`;
    else if (!meta(a.kind) && meta(b.kind)) {
      what = `an L2 entry places ${da} inside metadata: ${db}`;
    } else if (!meta(a.kind)) {
      what = `two L2 entries claim the same host bytes at ${b.start}: ${da} and ${db}`;
    } else what = `${da} and ${db} overlap in the stream`;
    return new CorruptImageError(what, b.start);
  }

  /** True when an L2 table starts at host offset `offset`. */
  #isL2Table(offset: number): boolean {
    return this.#l2Offsets[lowerBound(this.#l2Offsets, offset)] === offset;
  }

  /** The error for a claim on bytes that went by and are not held. */
  #missing(kind: number, aux: number, at: number): CorruptImageError {
    const what = this.describe(kind, aux);
    const h = this.#h;
    const cs = this.#cs;
    let where: string;
    if (at < cs) where = "the qcow2 header";
    else if (at >= h.l1TableOffset && at < h.l1TableOffset + h.l1Size * 8) where = "the L1 table";
    else if (
      at >= h.refcountTableOffset && at < h.refcountTableOffset + h.refcountTableClusters * cs
    ) where = "the refcount table";
    else if (this.#isL2Table(at - (at % cs))) where = "an L2 table";
    else if (this.walker.buffer?.dropped(at)) {
      where = "a refcount block, a snapshot's table or data cluster (refcount 1), or a bitmap";
    } else {
      return new CorruptImageError(
        `${what} is placed at byte ${at}, which another L2 entry already claims`,
        at,
      );
    }
    return new CorruptImageError(`${what} is placed inside metadata: ${where}`, at);
  }

  #badEntry(
    l2Start: number,
    j: number,
    cluster: number,
    hi: number,
    lo: number,
    what: string,
  ): CorruptImageError {
    return new CorruptImageError(
      `the L2 entry for guest cluster ${cluster} (0x${hex(hi, lo)}) has ${what}`,
      l2Start + j * this.#entryBytes,
    );
  }
}

/** Index of the lowest set bit of the 32-bit `x` (not 0). */
/** The runs `[first, end)` of set bits in the 32-bit word `bits`, lowest first. */
function* bitRuns(bits: number): Generator<[number, number]> {
  for (let i = 0; i < 32;) {
    if (((bits >>> i) & 1) === 0) {
      i++;
      continue;
    }
    let k = i + 1;
    while (k < 32 && ((bits >>> k) & 1) !== 0) k++;
    yield [i, k];
    i = k;
  }
}

function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

function hex(hi: number, lo: number): string {
  return hi.toString(16).padStart(8, "0") + lo.toString(16).padStart(8, "0");
}
