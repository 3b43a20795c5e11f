/**
 * The one-pass engine under `import`: walks an image stream chunk by chunk, never
 * seeking, against an agenda of byte ranges the metadata read so far says are coming
 * (tables, data clusters, compressed clusters, blocks). Bytes no known range covers
 * are kept in a bounded {@link StreamBuffer} until the metadata that claims them
 * arrives, or forgotten once the format says every table is known. The format
 * decoders (qcow2, VHD) supply what each kind of range means.
 *
 * @module
 */
import { CorruptImageError, LimitError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { sizeText, type StreamBuffer } from "./stream_buffer.ts";
import { type Expected, Mode, RecordQueue, RecordRun } from "./agenda.ts";
import type { ChunkConsumer } from "./chunk_loop.ts";

export { type Expected, Mode, RecordRun } from "./agenda.ts";
export { ChunkStream } from "./chunk_stream.ts";
export { type ChunkConsumer, walkChunks } from "./chunk_loop.ts";

/** Most bytes moved into the spool at once. */
const MAX_SPOOL_MOVE = 64 * 1024 * 1024;
/** Most bytes asked of one move (contiguous ranges are moved together). */
const MAX_DIRECT = 64 * 1024 * 1024;

export interface WalkerFormat {
  /** Consumption mode per kind (index = kind). */
  readonly modes: readonly Mode[];
  /**
   * Per kind: ranges of such kinds may begin inside the last 512-byte sector of the
   * previous one (qcow2 compressed clusters share sectors).
   */
  readonly sharesTail: readonly boolean[];
  /** Per kind: at the end of the stream a partly received range may still be usable. */
  readonly partialOk: readonly boolean[];
  /**
   * Per kind: {@link WalkerFormat.onRange} keeps nothing of its `bytes` once it
   * returns, so such ranges may be assembled in one reused buffer (compressed data:
   * no fresh buffer per cluster).
   */
  readonly transient?: readonly boolean[];
  /** Stream-mode bytes: `chunk[from, to)` are the bytes at `at` within the range. */
  onBytes(kind: number, aux: number, at: number, chunk: Uint8Array, from: number, to: number): void;
  /**
   * A whole assemble-mode range (`bytes` may be a view into the input, or shorter
   * than the range at the end of the stream when `partialOk`). Returns how many of
   * its bytes the range really used when fewer (the rest may belong to others).
   */
  onRange(kind: number, start: number, aux: number, bytes: Uint8Array): number | void;
  /** A stream-mode range ended. */
  onEnd?(kind: number, aux: number): void;
  /**
   * Enough decoded bytes wait to be written (decompressed clusters): the walker stops
   * taking bytes until they are (see {@link StreamWalker.push}).
   */
  full?(): boolean;
  /**
   * Where the `length` stream-mode bytes at `at` within a range go, when they are
   * plain data for one contiguous guest range (guest offset), else -1: such bytes
   * may be moved to the destination without passing through JavaScript.
   */
  directOffset?(kind: number, aux: number, at: number, length: number): number;
  /** Words for messages: "the L2 table for guest offsets …". */
  describe(kind: number, aux: number): string;
  /**
   * The most agenda memory (bytes) the tables still to come may add, when the format
   * can bound it (for messages: a `--max-buffer` that is enough), else Infinity.
   */
  metadataAhead?(): number;
  /** The error for range `b` starting inside range `a`. */
  overlap(a: Expected, b: Expected): Error;
}

interface Current extends Expected {
  end: number;
  bytes: Uint8Array | null;
  filled: number;
}

/** Walks the stream from `pos` on against the agenda; see the module comment. */
export class StreamWalker implements ChunkConsumer {
  /** Stream offset of the next byte to come. */
  pos: number;
  /** Kept bytes that no range claimed yet; null once every table is known. */
  buffer: StreamBuffer | null;
  readonly #fmt: WalkerFormat;
  readonly #queue = new RecordQueue();
  readonly #rec: Expected = { kind: 0, start: 0, length: 0, aux: 0 };
  #cur: Current | null = null;
  /** The last range, with a copy of its last sector when ranges may share it. */
  #prev: Expected & { end: number; tail: Uint8Array | null; tailStart: number } = {
    kind: -1,
    start: 0,
    length: 0,
    aux: 0,
    end: 0,
    tail: null,
    tailStart: 0,
  };

  /** The memory limit shared by the kept bytes and the metadata (the agenda, a table). */
  #limit: number;
  /** Where {@link WalkerFormat.transient} ranges are assembled, and the previous tail kept. */
  #scratch = new Uint8Array(0);
  readonly #tailBytes = new Uint8Array(512);

  constructor(format: WalkerFormat, pos: number, buffer: StreamBuffer) {
    this.#fmt = format;
    this.pos = pos;
    this.buffer = buffer;
    this.#limit = buffer.limit;
    buffer.shareLimit(() => this.metadataBytes);
  }

  /**
   * Memory the metadata read so far holds: the ranges still expected and the table
   * being assembled. It counts against `--max-buffer` with the kept bytes, so that a
   * stream of tables naming far-away clusters cannot grow memory without bound.
   */
  get metadataBytes(): number {
    return this.#queue.bytes + (this.#cur?.bytes?.length ?? 0);
  }

  /** The error for assembling `rec` (a table) past the limit. */
  #tooLarge(rec: Expected, held: number): never {
    throw new LimitError(
      `${this.#fmt.describe(rec.kind, rec.aux)} (${formatBytes(rec.length)} at byte ` +
        `${rec.start}) does not fit in --max-buffer ${formatBytes(this.#limit)} with the ` +
        `${formatBytes(held)} already held; ${this.#enough(held + rec.length)} (or give the ` +
        "image as a file: -i FILE)",
    );
  }

  /**
   * Words naming the `--max-buffer` the image needs, `now` bytes being needed at this
   * point: one that is enough for every table still to come when the format can bound
   * them, else `now` as a least.
   */
  #enough(now: number): string {
    const ahead = this.#fmt.metadataAhead?.() ?? Infinity;
    return Number.isFinite(ahead)
      ? `this image needs --max-buffer ${sizeText(now + ahead)} (enough for every table ` +
        "still to come)"
      : `this image needs --max-buffer ${sizeText(now)} at least`;
  }

  /**
   * Lets the metadata use up to `bytes` (when more than the limit): for tables read
   * whole from a file, whose memory follows the tables the file really holds.
   */
  allowMetadata(bytes: number): void {
    this.#limit = Math.max(this.#limit, bytes);
  }

  /**
   * A run to fill and {@link add}: its growth is checked against the memory limit as
   * it fills, so that a table naming many ranges is refused before it takes the memory.
   */
  newRun(capacity = 64): RecordRun {
    this.#checkMemory(capacity * RecordRun.SLOT_BYTES);
    const run = new RecordRun(capacity);
    run.onGrow = (bytes) => this.#checkMemory(bytes);
    return run;
  }

  /**
   * Throws {@link LimitError} when the metadata and the kept bytes, with `extra` bytes
   * more, pass the limit.
   */
  #checkMemory(extra = 0): void {
    const meta = this.metadataBytes + extra;
    let held = this.buffer?.used ?? 0;
    if (meta + held <= this.#limit) return;
    // Data held in memory can wait in the spool instead: the metadata needs the room.
    if (held > 0 && this.buffer!.spill() > 0) held = this.buffer!.used;
    if (meta + held <= this.#limit) return;
    throw new LimitError(
      `the image's tables name ${this.#queue.size} ranges still to come in the stream ` +
        `(${formatBytes(meta)} of metadata${
          held > 0 ? `, besides ${formatBytes(held)} of data held` : ""
        }), more than --max-buffer ${formatBytes(this.#limit)} allows (at byte offset ` +
        `${this.pos}); ${this.#enough(meta + held)} (or give the image as a file: -i FILE)`,
    );
  }

  /**
   * The length of the next range when it starts at `pos` and is assembled (a table, a
   * bitmap) or passed over (a refcount block), else 0: the bytes to read before data
   * may be moved by the kernel again (into the destination or the spool).
   */
  nextAssembled(): number {
    if (this.#cur !== null || this.#queue.peekStart() !== this.pos) return 0;
    this.#queue.peek(this.#rec);
    return this.#fmt.modes[this.#rec.kind] === Mode.Stream ? 0 : this.#rec.length;
  }

  /** Number of ranges still expected. */
  get pending(): number {
    return this.#queue.size + (this.#cur ? 1 : 0);
  }

  /** Adds sorted future ranges (every start ≥ pos) to the agenda. */
  add(run: RecordRun): void {
    run.sort();
    this.#queue.push(run);
    this.#checkMemory();
  }

  /** Every table is known: forget the kept bytes and keep no more. */
  stopBuffering(): void {
    const buffer = this.buffer;
    buffer?.clear();
    this.buffer = null;
    if (buffer?.overflowed) throw buffer.overflowError();
  }

  /**
   * Passes over the stream up to `limit` (never beyond) without its bytes, for as
   * long as no range needs them: only once nothing is kept (every table known), over
   * gaps and {@link Mode.Skip} ranges. Returns the offset reached: a seekable input
   * skips there instead of reading.
   */
  advance(limit: number): number {
    if (this.buffer !== null) return this.pos;
    const rec = this.#rec;
    while (this.pos < limit) {
      const cur = this.#cur;
      if (cur) {
        if (this.#fmt.modes[cur.kind] !== Mode.Skip) break;
        this.pos = Math.min(cur.end, limit);
        if (this.pos === cur.end) {
          this.#cur = null;
          this.#finish(cur, null);
        }
        continue;
      }
      const next = this.#queue.peekStart();
      if (next > this.pos) {
        this.pos = Math.min(next, limit);
        continue;
      }
      this.#queue.peek(rec);
      // A range starting inside the previous one: push() says what it means.
      if (rec.start < this.pos || this.#fmt.modes[rec.kind] !== Mode.Skip) break;
      this.#queue.pop(rec);
      this.#cur = { ...rec, end: rec.start + rec.length, bytes: null, filled: 0 };
    }
    return this.pos;
  }

  /**
   * When no range is under way and the bytes up to the next range are to be kept in
   * the spool (memory is full), has `move` put them there without reading them (see
   * {@link StreamBuffer.spoolDirect}). Returns how many bytes went by.
   */
  spoolAhead(move: (fd: number, offset: number, length: number) => number): number {
    if (this.#cur !== null || this.buffer === null) return 0;
    const gap = Math.min(this.#queue.peekStart() - this.pos, MAX_SPOOL_MOVE);
    if (gap <= 0) return 0;
    const n = this.buffer.spoolDirect(this.pos, gap, move);
    this.pos += n;
    return n;
  }

  /**
   * Feeds the next chunk of the stream. Returns the bytes taken: all of them, unless
   * the format became {@link WalkerFormat.full} (push the rest once its writes ran).
   */
  push(chunk: Uint8Array): number {
    const fmt = this.#fmt;
    const n = chunk.length;
    const base = this.pos;
    const rec = this.#rec;
    let i = 0;
    while (i < n) {
      if (fmt.full?.()) return i;
      const cur = this.#cur;
      if (cur) {
        const take = Math.min(cur.end - (base + i), n - i);
        const mode = fmt.modes[cur.kind];
        if (mode === Mode.Stream) {
          fmt.onBytes(cur.kind, cur.aux, base + i - cur.start, chunk, i, i + take);
        } else if (mode === Mode.Assemble) {
          cur.bytes!.set(chunk.subarray(i, i + take), cur.filled);
          cur.filled += take;
        }
        i += take;
        this.pos = base + i;
        if (this.pos === cur.end) {
          this.#cur = null;
          this.#finish(cur, cur.bytes);
        }
        continue;
      }
      const at = base + i;
      const next = this.#queue.peekStart();
      if (next > at) {
        const stop = Math.min(next, base + n);
        this.buffer?.add(at, chunk, i, stop - base);
        i = stop - base;
        this.pos = stop;
        continue;
      }
      this.#queue.pop(rec);
      if (rec.start < at) {
        this.#startInsidePrevious(rec);
        continue;
      }
      const end = rec.start + rec.length;
      const mode = fmt.modes[rec.kind];
      if (end <= base + n) {
        // The whole range is in this chunk: no copy.
        if (mode === Mode.Stream) fmt.onBytes(rec.kind, rec.aux, 0, chunk, i, i + rec.length);
        i += rec.length;
        this.pos = end;
        this.#finish(rec, mode === Mode.Assemble ? chunk.subarray(i - rec.length, i) : null);
      } else {
        // Check before allocating: a table's length comes from the image.
        let held = this.metadataBytes + (this.buffer?.used ?? 0);
        if (mode === Mode.Assemble && held + rec.length > this.#limit && this.buffer?.spill()) {
          held = this.metadataBytes + this.buffer.used; // the data waits in the spool
        }
        if (mode === Mode.Assemble && held + rec.length > this.#limit) this.#tooLarge(rec, held);
        this.#cur = {
          ...rec,
          end,
          bytes: mode === Mode.Assemble ? this.#assembly(rec) : null,
          filled: 0,
        };
      }
    }
    return n;
  }

  /**
   * Hands the stream-mode ranges that follow `pos` without a gap, for as long as
   * {@link WalkerFormat.directOffset} maps them, to `move(guest, length)`, which moves
   * up to `length` input bytes to that guest offset itself and says how many (0: the
   * input ended or refused; the rest is then read as usual). Returns the bytes moved.
   */
  moveDirect(move: (guest: number, length: number) => number): number {
    const fmt = this.#fmt;
    if (!fmt.directOffset) return 0;
    const rec = this.#rec;
    let moved = 0;
    for (;;) {
      let cur = this.#cur;
      if (cur === null) {
        if (this.#queue.peekStart() !== this.pos) break;
        this.#queue.peek(rec);
        if (fmt.modes[rec.kind] !== Mode.Stream) break;
        if (fmt.directOffset(rec.kind, rec.aux, 0, rec.length) < 0) break;
        this.#queue.pop(rec);
        cur = this.#cur = { ...rec, end: rec.start + rec.length, bytes: null, filled: 0 };
      } else if (fmt.modes[cur.kind] !== Mode.Stream) break;
      let length = cur.end - this.pos;
      const guest = fmt.directOffset(cur.kind, cur.aux, this.pos - cur.start, length);
      if (guest < 0) break;
      // The ranges that follow without a gap, in the stream and in the guest.
      const { run, others } = this.#queue.top();
      for (let i = run?.next ?? 0; run && i < run.count && length < MAX_DIRECT; i++) {
        const start = run.start[i];
        if (start !== this.pos + length || start >= others) break;
        const kind = run.kind[i];
        if (fmt.modes[kind] !== Mode.Stream) break;
        if (fmt.directOffset(kind, run.aux[i], 0, run.length[i]) !== guest + length) break;
        length += run.length[i];
      }
      const n = move(guest, length);
      if (n <= 0) break;
      moved += n;
      for (let left = n; left > 0;) {
        if (cur === null) {
          this.#queue.pop(rec);
          cur = this.#cur = { ...rec, end: rec.start + rec.length, bytes: null, filled: 0 };
        }
        const take = Math.min(cur.end - this.pos, left);
        this.pos += take;
        left -= take;
        if (this.pos === cur.end) {
          this.#cur = null;
          this.#finish(cur, null);
          cur = null;
        }
      }
    }
    return moved;
  }

  #finish(r: Expected, bytes: Uint8Array | null) {
    const fmt = this.#fmt;
    const end = r.start + r.length;
    const p = this.#prev;
    p.kind = r.kind;
    p.start = r.start;
    p.length = r.length;
    p.aux = r.aux;
    p.end = end;
    p.tail = null;
    if (fmt.modes[r.kind] === Mode.Stream) {
      fmt.onEnd?.(r.kind, r.aux);
      return;
    }
    if (fmt.modes[r.kind] !== Mode.Assemble) return;
    const used = fmt.onRange(r.kind, r.start, r.aux, bytes!);
    if (fmt.sharesTail[r.kind]) {
      // A copy: `bytes` may be a view of an input chunk that gets reused.
      const keep = Math.max(0, r.length - 512);
      p.tail = this.#tailBytes.subarray(0, bytes!.length - keep);
      p.tail.set(bytes!.subarray(keep));
      p.tailStart = r.start + keep;
      // Bytes between the real end and the next known range may belong to a range
      // not known yet (compressed data of an L2 table still to come): keep them.
      if (typeof used === "number" && used < r.length && this.buffer) {
        const gapEnd = Math.min(r.length, this.#queue.peekStart() - r.start);
        if (gapEnd > used) this.buffer.add(r.start + used, bytes!, used, gapEnd);
      }
    }
  }

  /** A buffer to assemble `r` in: the reused one for transient kinds, else a new one. */
  #assembly(r: Expected): Uint8Array {
    if (!this.#fmt.transient?.[r.kind]) return new Uint8Array(r.length);
    if (this.#scratch.length < r.length) {
      this.#scratch = new Uint8Array(Math.max(r.length, 2 * this.#scratch.length));
    }
    return this.#scratch.subarray(0, r.length);
  }

  /** A range starting before `pos`: only a sector shared with the previous range is allowed. */
  #startInsidePrevious(r: Expected) {
    const p = this.#prev;
    const fmt = this.#fmt;
    const end = r.start + r.length;
    if (fmt.modes[r.kind] === Mode.Skip && fmt.modes[p.kind] === Mode.Skip && r.start >= p.start) {
      // Two pieces of unneeded metadata that overlap (a table shared by snapshots).
      if (end > this.pos) this.#cur = { ...r, end, bytes: null, filled: 0 };
      return;
    }
    if (
      !(fmt.sharesTail[r.kind] && fmt.sharesTail[p.kind] && p.tail &&
        r.start > p.start && r.start >= p.end - 512 && r.start < p.end)
    ) {
      throw fmt.overlap(p, r);
    }
    const bytes = this.#assembly(r);
    const have = Math.min(p.end, end) - r.start;
    bytes.set(p.tail.subarray(r.start - p.tailStart, r.start - p.tailStart + have));
    if (end <= this.pos) {
      this.#finish(r, bytes);
    } else {
      this.#cur = { ...r, end, bytes, filled: have };
    }
  }

  /**
   * The stream ended: a range still expected means the stream was cut short (or the
   * metadata points past its end). Throws {@link CorruptImageError} naming the offset.
   */
  end(): void {
    const fmt = this.#fmt;
    if (this.buffer?.overflowed) throw this.buffer.overflowError();
    for (;;) {
      const cur = this.#cur;
      if (cur) {
        // Compressed data may stop short of its sector-rounded end at the end of the file.
        if (!(fmt.partialOk[cur.kind] && cur.bytes && cur.filled > 0)) {
          throw this.#truncatedInside(cur);
        }
        this.#cur = null;
        try {
          this.#finish({ ...cur, length: cur.filled }, cur.bytes.subarray(0, cur.filled));
        } catch (err) {
          throw this.#truncatedInside(cur, err);
        }
        continue;
      }
      if (this.#queue.size === 0) return;
      const r = this.#rec;
      this.#queue.pop(r);
      if (r.start < this.pos) {
        this.#startInsidePrevious(r);
        continue;
      }
      throw new CorruptImageError(
        `the stream ends at byte ${this.pos}, but ${fmt.describe(r.kind, r.aux)} was expected ` +
          `at byte ${r.start}: the stream is truncated or the image refers past its end` +
          (this.#queue.size > 0 ? ` (${this.#queue.size} more ranges missing)` : ""),
        this.pos,
      );
    }
  }

  #truncatedInside(cur: Current, cause?: unknown): CorruptImageError {
    return new CorruptImageError(
      `the stream ends at byte ${this.pos}, inside ${
        this.#fmt.describe(cur.kind, cur.aux)
      } (bytes ${cur.start}–${cur.end - 1}): the stream is truncated`,
      this.pos,
      { cause },
    );
  }
}

/** Something that consumes a stream chunk by chunk ({@link StreamWalker} is one). */
