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
import { CorruptImageError } from "./errors.ts";
import { CHUNK_SIZE } from "./io.ts";
import type { PipeInput } from "./pipe_input.ts";
import type { ImageTarget } from "./raw_destination.ts";
import type { StreamBuffer } from "./stream_buffer.ts";

/** How the bytes of a kind of range are consumed. */
export const Mode = {
  /** Handed over piece by piece as they arrive (data written straight through). */
  Stream: 0,
  /** Collected into one buffer and handed over whole (tables, compressed data). */
  Assemble: 1,
  /** Passed over (tables the import does not need). */
  Skip: 2,
} as const;
/** One of {@link Mode}'s values. */
export type Mode = typeof Mode[keyof typeof Mode];

/** A range of the stream that the metadata says is coming. */
export interface Expected {
  kind: number;
  start: number;
  length: number;
  /** What the format attaches: a guest cluster, a table index… */
  aux: number;
}

/**
 * A batch of expected ranges (for example the entries of one L2 table), sorted by
 * stream offset before it joins the agenda.
 */
export class RecordRun {
  start: Float64Array;
  length: Float64Array;
  aux: Float64Array;
  kind: Uint8Array;
  count = 0;
  /** Read position while the run is on the agenda. */
  next = 0;

  constructor(capacity: number) {
    this.start = new Float64Array(capacity);
    this.length = new Float64Array(capacity);
    this.aux = new Float64Array(capacity);
    this.kind = new Uint8Array(capacity);
  }

  /** Appends a range (the run grows as needed). */
  add(kind: number, start: number, length: number, aux: number): void {
    if (this.count === this.start.length) this.#grow();
    const i = this.count++;
    this.start[i] = start;
    this.length[i] = length;
    this.aux[i] = aux;
    this.kind[i] = kind;
  }

  #grow() {
    const cap = Math.max(16, this.start.length * 2);
    const grow = <T extends Float64Array | Uint8Array>(a: T, b: T) => (b.set(a), b);
    this.start = grow(this.start, new Float64Array(cap));
    this.length = grow(this.length, new Float64Array(cap));
    this.aux = grow(this.aux, new Float64Array(cap));
    this.kind = grow(this.kind, new Uint8Array(cap));
  }

  /** Sorts by start (stable); a run that is already in order costs one scan. */
  sort(): void {
    const n = this.count;
    let sorted = true;
    for (let i = 1; i < n && sorted; i++) sorted = this.start[i - 1] <= this.start[i];
    if (sorted) return;
    const order = Array.from({ length: n }, (_, i) => i);
    const s = this.start;
    order.sort((a, b) => s[a] - s[b] || a - b);
    const pick = <T extends Float64Array | Uint8Array>(a: T, b: T) => {
      for (let i = 0; i < n; i++) b[i] = a[order[i]];
      return b;
    };
    this.start = pick(this.start, new Float64Array(n));
    this.length = pick(this.length, new Float64Array(n));
    this.aux = pick(this.aux, new Float64Array(n));
    this.kind = pick(this.kind, new Uint8Array(n));
  }
}

/** The agenda: sorted runs merged by a min-heap on each run's next start. */
class RecordQueue {
  #heap: RecordRun[] = [];
  #size = 0;

  get size(): number {
    return this.#size;
  }

  push(run: RecordRun) {
    if (run.count === 0) return;
    run.next = 0;
    this.#size += run.count;
    const h = this.#heap;
    h.push(run);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (h[p].start[h[p].next] <= run.start[0]) break;
      h[i] = h[p];
      i = p;
    }
    h[i] = run;
  }

  peekStart(): number {
    const top = this.#heap[0];
    return top === undefined ? Infinity : top.start[top.next];
  }

  /**
   * The run holding the next range, and the start of the first range of any other
   * run: the top run's ranges before it are the next ones in order.
   */
  top(): { run: RecordRun | undefined; others: number } {
    const h = this.#heap;
    const key = (r: RecordRun | undefined) => r === undefined ? Infinity : r.start[r.next];
    return { run: h[0], others: Math.min(key(h[1]), key(h[2])) };
  }

  /** The next range, left on the agenda. */
  peek(out: Expected) {
    const top = this.#heap[0];
    const i = top.next;
    out.kind = top.kind[i];
    out.start = top.start[i];
    out.length = top.length[i];
    out.aux = top.aux[i];
  }

  pop(out: Expected) {
    const h = this.#heap;
    const top = h[0];
    const i = top.next++;
    out.kind = top.kind[i];
    out.start = top.start[i];
    out.length = top.length[i];
    out.aux = top.aux[i];
    this.#size--;
    if (top.next === top.count) {
      const last = h.pop()!;
      if (h.length === 0) return;
      h[0] = last;
    }
    if (h.length > 1) this.#siftDown();
  }

  #siftDown() {
    const h = this.#heap;
    const item = h[0];
    const key = item.start[item.next];
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= h.length) break;
      const r = l + 1;
      let c = l;
      if (r < h.length && h[r].start[h[r].next] < h[l].start[h[l].next]) c = r;
      if (h[c].start[h[c].next] >= key) break;
      h[i] = h[c];
      i = c;
    }
    h[i] = item;
  }
}

/** What a format decoder tells the walker. */
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
   * Where the `length` stream-mode bytes at `at` within a range go, when they are
   * plain data for one contiguous guest range (guest offset), else -1: such bytes
   * may be moved to the destination without passing through JavaScript.
   */
  directOffset?(kind: number, aux: number, at: number, length: number): number;
  /** Words for messages: "the L2 table for guest offsets …". */
  describe(kind: number, aux: number): string;
  /** The error for range `b` starting inside range `a`. */
  overlap(a: Expected, b: Expected): Error;
}

/**
 * The input of a decoder: chunks with a push-back. A byte stream is read with a BYOB
 * reader into a few recycled buffers ({@link ChunkStream.release} hands one back once
 * nothing refers to it), so memory stays at a few chunks however long the stream.
 */
export class ChunkStream {
  readonly #it: AsyncIterator<Uint8Array> | null = null;
  readonly #byob: ReadableStreamBYOBReader | null = null;
  /** The input read through its descriptor, whose data may be spliced (see walkChunks). */
  readonly pipe: PipeInput | null = null;
  readonly #back: Uint8Array[] = [];
  readonly #pool: ArrayBuffer[] = [];
  /** Buffers handed out, with the number of their pieces not released yet. */
  readonly #lent = new Map<ArrayBufferLike, number>();
  #ended = false;

  constructor(source: ReadableStream<Uint8Array> | AsyncIterator<Uint8Array> | PipeInput) {
    if ("splice" in source) {
      this.pipe = source;
      return;
    }
    if (!(source instanceof ReadableStream)) {
      this.#it = source;
      return;
    }
    try {
      this.#byob = source.getReader({ mode: "byob" });
    } catch {
      this.#it = source[Symbol.asyncIterator](); // not a byte stream
    }
  }

  /**
   * The next non-empty chunk, or null at the end. `limit` (a pipe read through its
   * descriptor only) caps a new chunk's length.
   */
  async next(limit = 0): Promise<Uint8Array | null> {
    const back = this.#back.pop();
    if (back) return back;
    for (;;) {
      const chunk = await this.#pull(limit);
      if (chunk === null) return null;
      if (chunk.length > 0) return chunk;
    }
  }

  async #pull(limit: number): Promise<Uint8Array | null> {
    if (this.#it) {
      const r = await this.#it.next();
      return r.done ? null : r.value;
    }
    if (this.#ended) return null;
    const buf = this.#pool.pop() ?? new ArrayBuffer(CHUNK_SIZE);
    if (this.pipe) {
      return this.#fill(new Uint8Array(buf, 0, Math.min(limit || Infinity, CHUNK_SIZE)));
    }
    const r = await this.#byob!.read(new Uint8Array(buf));
    if (r.done) {
      this.#ended = true;
      return null;
    }
    this.#lent.set(r.value.buffer, 1);
    return r.value;
  }

  /** Fills `buf` from the pipe (blocking reads: no thread hop per pipe-full). */
  #fill(buf: Uint8Array): Uint8Array | null {
    let filled = 0;
    while (filled < buf.length) {
      const n = this.pipe!.read(buf.subarray(filled));
      if (n === 0) break;
      filled += n;
    }
    if (filled === 0) {
      this.#ended = true;
      return null;
    }
    this.#lent.set(buf.buffer, 1);
    return buf.subarray(0, filled);
  }

  /** True when no byte read from the input waits in front (the next byte is the input's). */
  get drained(): boolean {
    return this.#back.length === 0 && !this.#ended;
  }

  /**
   * `chunk` (from {@link ChunkStream.next}) is no longer referred to: once every
   * piece of its buffer is released, the buffer is reused. Pieces returned by
   * {@link ChunkStream.read} are never released, so their buffers are not reused.
   */
  release(chunk: Uint8Array): void {
    const buf = chunk.buffer;
    const pieces = this.#lent.get(buf);
    if (pieces === undefined) return;
    if (pieces > 1) {
      this.#lent.set(buf, pieces - 1);
      return;
    }
    this.#lent.delete(buf);
    if (this.#pool.length < 4 && buf instanceof ArrayBuffer) this.#pool.push(buf);
  }

  /** Puts `chunk` back in front (one more piece of its buffer to release). */
  unshift(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    const pieces = this.#lent.get(chunk.buffer);
    if (pieces !== undefined) this.#lent.set(chunk.buffer, pieces + 1);
    this.#back.push(chunk);
  }

  /**
   * The next `n` bytes (fewer only at the end of the stream); the rest of the last
   * chunk is put back.
   */
  async read(n: number): Promise<Uint8Array> {
    const first = await this.next();
    if (!first) return new Uint8Array(0);
    if (first.length >= n) {
      this.unshift(first.subarray(n));
      return first.subarray(0, n);
    }
    const out = new Uint8Array(n);
    out.set(first);
    let have = first.length;
    while (have < n) {
      const c = await this.next();
      if (!c) return out.subarray(0, have);
      const take = Math.min(c.length, n - have);
      out.set(c.subarray(0, take), have);
      have += take;
      this.unshift(c.subarray(take));
    }
    return out;
  }

  /** Stops reading (releases the source; a pipe's descriptor is left to its owner). */
  async cancel(): Promise<void> {
    if (this.#byob) await this.#byob.cancel();
    else await this.#it?.return?.();
  }
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

  constructor(format: WalkerFormat, pos: number, buffer: StreamBuffer) {
    this.#fmt = format;
    this.pos = pos;
    this.buffer = buffer;
  }

  /**
   * The length of the next range when it starts at `pos` and is assembled (a table, a
   * bitmap), else 0: the bytes to read before data may be moved directly again.
   */
  nextAssembled(): number {
    if (this.#cur !== null || this.#queue.peekStart() !== this.pos) return 0;
    this.#queue.peek(this.#rec);
    return this.#fmt.modes[this.#rec.kind] === Mode.Assemble ? this.#rec.length : 0;
  }

  /** Number of ranges still expected. */
  get pending(): number {
    return this.#queue.size + (this.#cur ? 1 : 0);
  }

  /** Adds sorted future ranges (every start ≥ pos) to the agenda. */
  add(run: RecordRun): void {
    run.sort();
    this.#queue.push(run);
  }

  /** Every table is known: forget the kept bytes and keep no more. */
  stopBuffering(): void {
    this.buffer?.clear();
    this.buffer = null;
  }

  /** Feeds the next chunk of the stream. */
  push(chunk: Uint8Array): void {
    const fmt = this.#fmt;
    const n = chunk.length;
    const base = this.pos;
    const rec = this.#rec;
    let i = 0;
    while (i < n) {
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
        this.#cur = {
          ...rec,
          end,
          bytes: mode === Mode.Assemble ? new Uint8Array(rec.length) : null,
          filled: 0,
        };
      }
    }
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
      p.tail = bytes!.slice(keep);
      p.tailStart = r.start + keep;
      // Bytes between the real end and the next known range may belong to a range
      // not known yet (compressed data of an L2 table still to come): keep them.
      if (typeof used === "number" && used < r.length && this.buffer) {
        const gapEnd = Math.min(r.length, this.#queue.peekStart() - r.start);
        if (gapEnd > used) this.buffer.add(r.start + used, bytes!, used, gapEnd);
      }
    }
  }

  /** A range starting before `pos`: only a sector shared with the previous range is allowed. */
  #startInsidePrevious(r: Expected) {
    const p = this.#prev;
    const fmt = this.#fmt;
    if (
      !(fmt.sharesTail[r.kind] && fmt.sharesTail[p.kind] && p.tail &&
        r.start > p.start && r.start >= p.end - 512 && r.start < p.end)
    ) {
      throw fmt.overlap(p, r);
    }
    const end = r.start + r.length;
    const bytes = new Uint8Array(r.length);
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
export interface ChunkConsumer {
  /** Decodes one chunk, queueing writes. */
  push(chunk: Uint8Array): void;
  /** See {@link StreamWalker.moveDirect}. */
  moveDirect?(move: (guest: number, length: number) => number): number;
  /** See {@link StreamWalker.nextAssembled}. */
  nextAssembled?(): number;
  /** The stream ended; throws if it ended too early. */
  end(): void;
}

/** Chunks are decoded in slices of this size, so that writes can start in between. */
const SLICE = 1024 * 1024;
/** Queued bytes (decompressed data, buffered clusters) that make the loop write first. */
const HIGH_WATER = 8 * 1024 * 1024;

/**
 * Runs the read–decode–write loop: each chunk is decoded (queueing writes on
 * `target`), and its writes run while the next chunk is read. A chunk that queues
 * much more than itself (compressed clusters) is written out as it is decoded.
 *
 * When the input is a pipe read through its descriptor and the target can take data
 * that way, the data ranges that follow a chunk are spliced from the pipe into the
 * destination by the kernel ({@link StreamWalker.moveDirect}); `onChunk` then gets an
 * empty chunk. The bytes after them are read as usual.
 */
export async function walkChunks(
  input: ChunkStream,
  walker: ChunkConsumer,
  target: ImageTarget,
  onChunk: (chunk: Uint8Array) => void,
): Promise<void> {
  const direct = openDirect(input, walker, target);
  let writing: Promise<void> = Promise.resolve();
  let held: Uint8Array | null = null; // the chunk the running writes may still read
  const write = async (chunk: Uint8Array) => {
    await writing;
    if (held !== null && held !== chunk) input.release(held);
    held = chunk;
    writing = target.flush();
  };
  // After data went by spliced, read only the table that comes next (when one does),
  // so that the data after it is spliced too.
  let limit = 0;
  try {
    for (;;) {
      const chunk = await input.next(limit);
      limit = 0;
      if (!chunk) break;
      for (let at = 0; at < chunk.length;) {
        const end = Math.min(chunk.length, at + SLICE);
        walker.push(at === 0 && end === chunk.length ? chunk : chunk.subarray(at, end));
        at = end;
        if (at < chunk.length && target.queued >= HIGH_WATER) await write(chunk);
      }
      onChunk(chunk);
      await write(chunk);
      if (direct?.move()) {
        onChunk(EMPTY);
        limit = walker.nextAssembled?.() ?? 0;
      }
    }
  } finally {
    direct?.close();
    await writing.catch(() => {});
  }
  await writing;
  walker.end();
  await target.flush();
}

const EMPTY = new Uint8Array(0);
/** Most bytes asked of one move (contiguous ranges are moved together). */
const MAX_DIRECT = 64 * 1024 * 1024;
/** Spliced bytes after which their writeback to the device is started. */
const WRITEBACK_STRIDE = 16 * 1024 * 1024;

/** The splice path of {@link walkChunks}, when input, decoder and target allow it. */
function openDirect(input: ChunkStream, walker: ChunkConsumer, target: ImageTarget) {
  const pipe = input.pipe;
  if (!pipe || !walker.moveDirect || !target.wroteDirect || target.path === undefined) return null;
  const path = target.path;
  let fd = pipe.openDestination(path);
  if (fd === null) return null;
  // The range spliced since the last writeback was started.
  let lo = Infinity;
  let hi = 0;
  const move = (guest: number, length: number): number => {
    const n = pipe.splice(fd!, guest, length, path);
    if (n < 0) {
      // Refused for these descriptors: read everything from now on.
      pipe.closeDestination(fd!);
      fd = null;
      return 0;
    }
    if (n > 0) {
      target.wroteDirect!(guest, n);
      lo = Math.min(lo, guest);
      hi = Math.max(hi, guest + n);
      if (hi - lo >= WRITEBACK_STRIDE) {
        pipe.startWriteback(fd!, lo, hi - lo);
        lo = Infinity;
        hi = 0;
      }
    }
    return n;
  };
  return {
    /** Moves what can be moved now; true if anything was. */
    move(): boolean {
      return fd !== null && input.drained && walker.moveDirect!(move) > 0;
    },
    close() {
      if (fd !== null) pipe.closeDestination(fd);
      fd = null;
    },
  };
}
