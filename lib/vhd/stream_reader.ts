/**
 * The one-pass VHD decoder: reads a VHD from a stream, front to back, without
 * seeking, and writes the guest's bytes to an {@link ImageTarget}.
 *
 * - Dynamic (and, with `delta`, differencing) disks: footer copy at 0, dynamic header,
 *   BAT, then blocks in any order, each a sector bitmap followed by its data, and the
 *   footer last. Set bitmap bits are data; clear bits read as zeros (dynamic) or come
 *   from the parent (differencing: left untouched).
 * - Fixed disks: the raw disk followed by a 512-byte footer. The last 512 bytes seen
 *   are held back until the stream ends, then checked to be that footer.
 *
 * @module
 */
import { viewOf } from "../bytes.ts";
import { CorruptImageError, LimitError, UnsupportedError } from "../errors.ts";
import type { StreamDecodeOptions, StreamImageInfo } from "../qcow2/stream_reader.ts";
import type { ImageTarget } from "../io/endpoint.ts";
import type { SeekableInput } from "../io/file_input.ts";
import { LOST_RANGE, sizeText, StreamBuffer, ZERO_RANGE } from "../io/stream_buffer.ts";
import {
  type ChunkStream,
  type Expected,
  Mode,
  type RecordRun,
  StreamWalker,
  walkChunks,
  type WalkerFormat,
} from "../io/stream_walker.ts";
import {
  BAT_UNUSED,
  DEFAULT_BLOCK_SIZE,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_FIXED,
  DYNAMIC_HEADER_SIZE,
  FOOTER_SIZE,
  SECTOR_SIZE,
} from "./constants.ts";
import {
  blockBitmapSize,
  checkVhdTables,
  parseVhdDynamicHeader,
  usedBatEntries,
  type VhdDynamicHeader,
} from "./dynamic_header.ts";
import { diskTypeName, isVhdFooter, parseVhdFooter, type VhdFooter } from "./footer.ts";

const HEADER = 0;
const BAT = 1;
const BITMAP = 2;
const BLOCK = 3;
/** The dynamic header or the BAT, read already by random access (aux: which). */
const TABLE = 4;

/** The bitmap of a block whose bitmap was not kept (see `LOST_RANGE`). */
const LOST_BITMAP = new Uint8Array(0);

/** Grain at which buffered bytes are kept. */
const GRAIN = 64 * 1024;

/**
 * Decodes a VHD stream; `open` gets the destination once the size is known (for a
 * fixed disk read from a pipe, at the start with an unknown size).
 */
export async function decodeVhdStream(
  input: ChunkStream,
  opts: StreamDecodeOptions,
  open: (info: StreamImageInfo, sizeKnown: boolean) => Promise<ImageTarget>,
): Promise<StreamImageInfo> {
  const head = await input.read(FOOTER_SIZE);
  input.unshift(head);
  // A file whose last sector is a fixed disk's footer is that fixed disk, whatever its
  // first sector looks like (it may hold another VHD).
  const fixed = input.seekable !== null && fixedFooterAtEnd(input.seekable);
  if (fixed || !isVhdFooter(head)) return await decodeFixed(input, opts, open);
  const footer = parseVhdFooter(head, 0);
  if (footer.diskType === DISK_TYPE_FIXED) {
    throw new CorruptImageError(
      "the stream starts with a VHD footer of a fixed disk; a fixed VHD has its footer only " +
        "at the end",
      0,
    );
  }
  if (footer.diskType === DISK_TYPE_DIFFERENCING && !opts.delta) {
    throw new UnsupportedError(
      "the VHD is a differencing disk, so its unallocated sectors are not in the stream; " +
        "apply it onto a copy of its parent with --delta",
    );
  }
  if (footer.dataOffset === null || footer.dataOffset < FOOTER_SIZE) {
    throw new CorruptImageError(
      `the VHD dynamic header offset ${footer.dataOffset} overlaps the footer copy`,
      16,
    );
  }
  const info: StreamImageInfo = {
    format: "vhd",
    virtualSize: footer.currentSize,
    unit: DEFAULT_BLOCK_SIZE,
  };
  if (input.seekable) {
    // A file: header and BAT by random access, then the blocks in file order.
    const reader = new VhdStreamReader(footer, opts, input.seekable);
    info.unit = reader.blockSize;
    await input.read(FOOTER_SIZE); // the footer copy, read already
    reader.target = await open(info, true);
    await walkChunks(input, reader.walker, reader.target, () => {
      opts.onProgress?.(reader.walker.pos, reader.expectedEnd());
    });
    const tail = new Uint8Array(Math.min(FOOTER_SIZE, input.seekable.size));
    input.seekable.readInto(input.seekable.size - tail.length, tail, "the VHD footer");
    reader.checkEnd(tail);
    return info;
  }
  const headerEnd = footer.dataOffset + DYNAMIC_HEADER_SIZE;
  if (headerEnd > Math.max(opts.maxBuffer, 1024 * 1024)) {
    // Everything up to the header is held in memory: bound it like any read-ahead.
    throw new LimitError(
      `the VHD dynamic header is at byte ${footer.dataOffset}, and reading that far ahead ` +
        `would hold ${headerEnd} bytes in memory, more than --max-buffer ${opts.maxBuffer}; ` +
        `if the image is genuine, import it with --max-buffer ${sizeText(headerEnd)}`,
    );
  }
  const reader = new VhdStreamReader(footer, opts, null);
  // The block size (the destination's grain) is in the header.
  const headerBytes = await input.read(footer.dataOffset + DYNAMIC_HEADER_SIZE);
  input.unshift(headerBytes.subarray(FOOTER_SIZE)); // the walk starts after the footer copy
  if (headerBytes.length === footer.dataOffset + DYNAMIC_HEADER_SIZE) {
    const h = parseVhdDynamicHeader(headerBytes.subarray(footer.dataOffset), footer.dataOffset);
    checkVhdTables(h, footer.currentSize, footer.dataOffset); // before a destination is made
    info.unit = h.blockSize;
  }
  const target = await open(info, true);
  reader.target = target;
  let tail: Uint8Array = new Uint8Array(0);
  await walkChunks(input, reader.walker, target, (chunk) => {
    // An empty chunk: block data went by spliced, so the footer is still to come.
    tail = chunk.length === 0 ? chunk : lastBytes(tail, chunk, FOOTER_SIZE);
    opts.onProgress?.(reader.walker.pos, reader.expectedEnd());
  });
  reader.checkEnd(tail);
  return info;
}

/**
 * True when the last 512 bytes of `file` are a valid footer of a fixed VHD whose size
 * is everything before it.
 */
export function fixedFooterAtEnd(file: SeekableInput): boolean {
  const at = file.size - FOOTER_SIZE;
  if (at < 0) return false;
  const tail = new Uint8Array(FOOTER_SIZE);
  file.readInto(at, tail, "the VHD footer");
  if (!isVhdFooter(tail)) return false;
  try {
    const f = parseVhdFooter(tail, at);
    return f.diskType === DISK_TYPE_FIXED && f.currentSize === at;
  } catch {
    return false; // not a footer after all: read as the start says
  }
}

/** The last `n` bytes of `tail` followed by `chunk`. */
function lastBytes(tail: Uint8Array, chunk: Uint8Array, n: number): Uint8Array {
  if (chunk.length >= n) return chunk.slice(chunk.length - n); // chunks get reused
  const out = new Uint8Array(Math.min(n, tail.length + chunk.length));
  const fromTail = out.length - chunk.length;
  out.set(tail.subarray(tail.length - fromTail));
  out.set(chunk, fromTail);
  return out;
}

/** The VHD side of the walk: header, BAT, bitmaps and blocks. */
class VhdStreamReader implements WalkerFormat {
  readonly modes = [Mode.Assemble, Mode.Assemble, Mode.Assemble, Mode.Stream, Mode.Skip];
  readonly sharesTail = [false, false, false, false, false];
  readonly partialOk = [false, false, false, false, false];
  readonly walker: StreamWalker;
  target!: ImageTarget;
  readonly #footer: VhdFooter;
  readonly #size: number;
  readonly #differencing: boolean;
  #header: VhdDynamicHeader | null = null;
  #blockSize = 0;
  #bitmapSize = 0;
  #bitmaps = new Map<number, Uint8Array>();
  #expectedEnd: number;
  #batEnd = 0;

  /**
   * With `tables` (a file or device), the dynamic header and the BAT are read from it
   * by random access: the walk then only meets blocks, in file order, and holds nothing.
   */
  constructor(footer: VhdFooter, opts: StreamDecodeOptions, tables: SeekableInput | null) {
    this.#footer = footer;
    this.#size = footer.currentSize;
    this.#differencing = footer.diskType === DISK_TYPE_DIFFERENCING;
    this.walker = new StreamWalker(
      this,
      FOOTER_SIZE,
      new StreamBuffer(opts.maxBuffer, GRAIN, opts.spool ?? null),
    );
    const at = footer.dataOffset!;
    this.#expectedEnd = at + DYNAMIC_HEADER_SIZE;
    const run = this.walker.newRun(2);
    if (!tables) {
      run.add(HEADER, at, DYNAMIC_HEADER_SIZE, 0);
      this.walker.add(run);
      return;
    }
    const header = new Uint8Array(DYNAMIC_HEADER_SIZE);
    tables.readInto(at, header, "the VHD dynamic header");
    this.#expect(run, TABLE, at, DYNAMIC_HEADER_SIZE, HEADER);
    const h = this.#useHeader(header, at);
    const bat = new Uint8Array(usedBatEntries(this.#size, h.blockSize) * 4);
    // Two ranges per allocated block at most: memory follows the BAT in the file.
    this.walker.allowMetadata(16 * bat.length);
    tables.readInto(h.tableOffset, bat, "the VHD block allocation table (BAT)");
    if (bat.length > 0) this.#expect(run, TABLE, h.tableOffset, bat.length, BAT);
    this.walker.add(run);
    this.#readBat(bat, h.tableOffset);
  }

  /** The block size (known once the dynamic header is read). */
  get blockSize(): number {
    return this.#blockSize;
  }

  expectedEnd(): number {
    return Math.max(this.#expectedEnd + FOOTER_SIZE, this.walker.pos);
  }

  onRange(kind: number, start: number, aux: number, bytes: Uint8Array): void {
    if (kind === HEADER) this.#readHeader(bytes, start);
    else if (kind === BAT) this.#readBat(bytes, start);
    else if (kind === BITMAP) this.#bitmaps.set(aux, bytes.slice());
  }

  #readHeader(bytes: Uint8Array, start: number) {
    const h = this.#useHeader(bytes, start);
    const length = usedBatEntries(this.#size, h.blockSize) * 4;
    const run = this.walker.newRun(1);
    this.#expect(run, BAT, h.tableOffset, length, 0);
    this.walker.add(run);
    if (length === 0) this.walker.stopBuffering();
  }

  /** Parses and checks the dynamic header at `start`. */
  #useHeader(bytes: Uint8Array, start: number): VhdDynamicHeader {
    const h = parseVhdDynamicHeader(bytes, start);
    checkVhdTables(h, this.#size, start);
    this.#header = h;
    this.#blockSize = h.blockSize;
    this.#bitmapSize = blockBitmapSize(h.blockSize);
    return h;
  }

  #readBat(bytes: Uint8Array, start: number) {
    const v = viewOf(bytes);
    const n = bytes.length / 4;
    this.#batEnd = start + bytes.length;
    const run = this.walker.newRun(64); // grows with the allocated blocks, not the BAT
    for (let i = 0; i < n; i++) {
      const sector = v.getUint32(i * 4);
      if (sector === BAT_UNUSED) continue;
      const at = sector * SECTOR_SIZE;
      this.#expect(run, BITMAP, at, this.#bitmapSize, i);
      this.#expect(run, BLOCK, at + this.#bitmapSize, this.#blockSize, i);
    }
    this.walker.add(run);
    this.walker.stopBuffering();
  }

  /** Queues a future range, or claims a past one from the buffer right away. */
  #expect(run: RecordRun, kind: number, start: number, length: number, aux: number) {
    const end = start + length;
    if (end > this.#expectedEnd) this.#expectedEnd = end;
    if (start >= this.walker.pos) {
      run.add(kind, start, length, aux);
      return;
    }
    const got = this.walker.buffer?.take(start, length);
    if (got === LOST_RANGE) {
      // Not kept: the import fails once every table is known; write nothing of it.
      if (kind === BITMAP) this.#bitmaps.set(aux, LOST_BITMAP);
      return;
    }
    if (got === undefined) throw this.#missing(kind, aux, start);
    const bytes = got === ZERO_RANGE ? new Uint8Array(length) : got;
    if (kind === BLOCK) {
      this.onBytes(kind, aux, 0, bytes, 0, bytes.length);
      this.onEnd(kind, aux);
    } else {
      this.onRange(kind, start, aux, bytes);
    }
  }

  /** Block data as it streams by: set bitmap bits are data, clear bits zeros or parent. */
  onBytes(_kind: number, block: number, at: number, chunk: Uint8Array, from: number, to: number) {
    const bitmap = this.#bitmaps.get(block)!;
    if (bitmap === LOST_BITMAP) return;
    const base = block * this.#blockSize;
    const end = at + (to - from);
    let p = at;
    while (p < end) {
      const s = Math.floor(p / SECTOR_SIZE);
      const set = (bitmap[s >> 3] & (0x80 >> (s & 7))) !== 0;
      let q = (s + 1) * SECTOR_SIZE;
      while (q < end) {
        const t = q / SECTOR_SIZE;
        const byte = bitmap[t >> 3];
        if ((t & 7) === 0 && byte === (set ? 0xff : 0)) {
          q += 8 * SECTOR_SIZE;
        } else if (((byte & (0x80 >> (t & 7))) !== 0) === set) {
          q += SECTOR_SIZE;
        } else break;
      }
      q = Math.min(q, end);
      const g = base + p;
      const gEnd = Math.min(base + q, this.#size);
      if (gEnd > g) {
        if (set) this.target.write(g, chunk, from + (p - at), from + (gEnd - base - at));
        else if (!this.#differencing) this.target.zero(g, gEnd - g);
      }
      p = q;
    }
  }

  /** Block bytes whose sectors are all marked as data may be spliced. */
  directOffset(kind: number, block: number, at: number, length: number): number {
    const guest = block * this.#blockSize + at;
    if (kind !== BLOCK || guest + length > this.#size) return -1;
    const bitmap = this.#bitmaps.get(block);
    if (!bitmap) return -1;
    const last = Math.ceil((at + length) / SECTOR_SIZE);
    for (let s = Math.floor(at / SECTOR_SIZE); s < last;) {
      if ((s & 7) === 0 && s + 8 <= last) {
        if (bitmap[s >> 3] !== 0xff) return -1;
        s += 8;
      } else {
        if ((bitmap[s >> 3] & (0x80 >> (s & 7))) === 0) return -1;
        s++;
      }
    }
    return guest;
  }

  onEnd(_kind: number, block: number) {
    this.#bitmaps.delete(block);
  }

  /** The stream ended: its last 512 bytes must be the footer, after every block. */
  checkEnd(tail: Uint8Array) {
    const pos = this.walker.pos;
    if (tail.length < FOOTER_SIZE || !isVhdFooter(tail) || pos - FOOTER_SIZE < this.#batEnd) {
      throw new CorruptImageError(
        `the stream ends at byte ${pos} without the VHD footer that closes a dynamic disk: ` +
          "the stream is truncated",
        pos,
      );
    }
    const f = parseVhdFooter(tail, pos - FOOTER_SIZE);
    if (f.currentSize !== this.#footer.currentSize || f.diskType !== this.#footer.diskType) {
      throw new CorruptImageError(
        `the VHD footer at the end (${diskTypeName(f.diskType)}, ${f.currentSize} bytes) ` +
          `differs from its copy at the start (${diskTypeName(this.#footer.diskType)}, ` +
          `${this.#footer.currentSize} bytes)`,
        pos - FOOTER_SIZE,
      );
    }
  }

  describe(kind: number, aux: number): string {
    switch (kind) {
      case HEADER:
        return "the VHD dynamic header";
      case BAT:
        return "the VHD block allocation table (BAT)";
      case BITMAP:
        return `the sector bitmap of block ${aux}`;
      case TABLE:
        return this.describe(aux, 0);
      default:
        return `the data of block ${aux} (guest offset ${aux * this.#blockSize})`;
    }
  }

  overlap(a: Expected, b: Expected): Error {
    const meta = (k: number) => k === HEADER || k === BAT || k === TABLE;
    const da = this.describe(a.kind, a.aux);
    const db = this.describe(b.kind, b.aux);
    const what = meta(a.kind) || meta(b.kind)
      ? `the BAT places ${meta(a.kind) ? db : da} inside metadata: ${meta(a.kind) ? da : db}`
      : `two BAT entries claim the same sectors at byte ${b.start}: ${da} and ${db}`;
    return new CorruptImageError(what, b.start);
  }

  #missing(kind: number, aux: number, at: number): CorruptImageError {
    const h = this.#header;
    const what = this.describe(kind, aux);
    if (at < FOOTER_SIZE) {
      return new CorruptImageError(`${what} is placed inside the footer copy`, at);
    }
    const hs = this.#footer.dataOffset!;
    if (at >= hs && at < hs + DYNAMIC_HEADER_SIZE) {
      return new CorruptImageError(`${what} is placed inside the dynamic header`, at);
    }
    if (h && at >= h.tableOffset && at < this.#batEnd) {
      return new CorruptImageError(`${what} is placed inside the BAT`, at);
    }
    return new CorruptImageError(
      `${what} is placed at byte ${at}, which another BAT entry already claims`,
      at,
    );
  }
}

/** A fixed disk: every byte but the last 512 is the disk. */
async function decodeFixed(
  input: ChunkStream,
  opts: StreamDecodeOptions,
  open: (info: StreamImageInfo, sizeKnown: boolean) => Promise<ImageTarget>,
): Promise<StreamImageInfo> {
  const length = opts.streamLength;
  const known = length !== undefined && length >= FOOTER_SIZE;
  const info: StreamImageInfo = {
    format: "vhd",
    virtualSize: known ? length - FOOTER_SIZE : 0,
    unit: DEFAULT_BLOCK_SIZE,
  };
  const fixed = new FixedVhdReader(await open(info, known));
  await walkChunks(input, fixed, fixed.target, () => {
    opts.onProgress?.(fixed.pos, known ? length : 0);
  });
  info.virtualSize = fixed.pos;
  return info;
}

/** Hands over a fixed disk's bytes, holding back the last 512 (the footer-to-be). */
class FixedVhdReader {
  readonly target: ImageTarget;
  /** Bytes of disk handed over. */
  pos = 0;
  #tail: Uint8Array = new Uint8Array(0);

  constructor(target: ImageTarget) {
    this.target = target;
  }

  push(chunk: Uint8Array) {
    if (chunk.length >= FOOTER_SIZE) {
      this.#put(this.#tail, 0, this.#tail.length);
      this.#put(chunk, 0, chunk.length - FOOTER_SIZE);
      this.#tail = chunk.slice(chunk.length - FOOTER_SIZE); // chunks get reused
      return;
    }
    const all = new Uint8Array(this.#tail.length + chunk.length);
    all.set(this.#tail);
    all.set(chunk, this.#tail.length);
    const keep = Math.max(0, all.length - FOOTER_SIZE);
    this.#put(all, 0, keep);
    this.#tail = all.subarray(keep);
  }

  #put(bytes: Uint8Array, from: number, to: number) {
    this.target.write(this.pos, bytes, from, to);
    this.pos += to - from;
  }

  end() {
    const tail = this.#tail;
    const pos = this.pos;
    if (tail.length < FOOTER_SIZE || !isVhdFooter(tail)) {
      throw new CorruptImageError(
        `the stream (${pos + tail.length} bytes) does not end with a VHD footer: not a fixed ` +
          "VHD, or truncated",
        pos + tail.length,
      );
    }
    const footer = parseVhdFooter(tail, pos);
    if (footer.diskType !== DISK_TYPE_FIXED || footer.currentSize !== pos) {
      throw new CorruptImageError(
        `the VHD footer at the end describes a ${diskTypeName(footer.diskType)} disk of ` +
          `${footer.currentSize} bytes, but ${pos} bytes of fixed disk came before it`,
        pos,
      );
    }
  }
}
