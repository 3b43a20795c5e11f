/**
 * The bounded memory of an import: bytes of the stream that went by before the
 * metadata saying what they are (data that precedes its L2 table or BAT, tables that
 * precede the table pointing at them). They are kept until they are claimed, or until
 * every table is known and the rest can be forgotten. An all-zero piece is remembered
 * without its bytes; ranges recognised as metadata the import never needs are dropped
 * ({@link StreamBuffer.drop}).
 *
 * Memory holds up to a limit; beyond it bytes go to a {@link Spool} file when there is
 * one. Without one the buffer goes on counting what it would have had to hold, so that
 * the error raised once every table is known ({@link StreamBuffer.overflowError}) names
 * the `--max-buffer` that is enough.
 *
 * @module
 */
import { LimitError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { isAllZero } from "../zero.ts";
import type { Spool } from "./spool.ts";

/** What {@link StreamBuffer.take} returns for a range that was all zeros. */
export const ZERO_RANGE: unique symbol = Symbol("zero range");
/**
 * What {@link StreamBuffer.take} and {@link StreamBuffer.read} return for a range whose
 * bytes were not kept because the limit was reached without a spool: the import fails
 * with {@link StreamBuffer.overflowError} once every table is known.
 */
export const LOST_RANGE: unique symbol = Symbol("lost range");

/** Bookkeeping cost counted for every kept piece, so tiny pieces cannot run away. */
const PIECE_OVERHEAD = 64;
/**
 * With a spool, the index of pieces that hold no bytes in memory (spooled, all-zero)
 * is bounded on its own: 2 Mi pieces, for example the refcount blocks of a 64 GiB image
 * with 512-byte clusters, which go by before the refcount table that names them.
 */
const INDEX_LIMIT = 2 * 1024 * 1024 * PIECE_OVERHEAD;

/** Size of the blocks bytes read back are cut from. */
const SLAB_BYTES = 1024 * 1024;
/** Pieces in the index beyond which spooled pieces are no longer cut for drops. */
const MAX_SPLIT_INDEX = 64 * 1024;

/**
 * A piece's bytes: in memory, `null` all zeros, a number: the offset in the spool,
 * `false`: not kept (over the limit without a spool), `undefined`: claimed.
 */
type Piece = Uint8Array | null | number | false | undefined;

/** Bytes of the stream held back, by stream offset, within a memory limit. */
export class StreamBuffer {
  readonly #limit: number;
  readonly #unit: number;
  readonly #spool: Spool | null;
  // Pieces in stream order. Pieces in memory never cross a multiple of `unit`, so that
  // each claimed cluster frees its memory; the others may be longer.
  readonly #starts: number[] = [];
  readonly #ends: number[] = [];
  readonly #data: Piece[] = [];
  #used = 0;
  /** Index cost of the pieces counted apart from memory (see {@link INDEX_LIMIT}). */
  #index = 0;
  #released = 0;
  /** Memory the pieces would use without a limit, and its peak. */
  #wouldUse = 0;
  #peak = 0;
  #lostAt = -1;
  #lostClaimed = false;
  /** The last bytes kept went to the spool: memory is full. */
  #spilling = false;
  /** Stream ranges dropped as unneeded metadata: `[start, end)` pairs, merged. */
  readonly #dropped: number[] = [];
  /** The block {@link #fresh} cuts buffers from, and how much of it is used. */
  #slab: Uint8Array | null = null;
  #slabUsed = 0;
  /** Memory counted against the same limit elsewhere (the agenda's metadata). */
  #others: () => number = () => 0;

  /**
   * `limit` is the most memory (bytes) the kept pieces may use; `unit` the grain at
   * which all-zero pieces are recognised (the image's cluster size); `spool` takes
   * what does not fit.
   */
  constructor(limit: number, unit: number, spool: Spool | null = null) {
    this.#limit = limit;
    this.#unit = unit;
    this.#spool = spool;
  }

  /** The most memory (bytes) the kept pieces, and whatever shares the limit, may use. */
  get limit(): number {
    return this.#limit;
  }

  /** Counts `others()` bytes (metadata kept elsewhere) against the same limit. */
  shareLimit(others: () => number): void {
    this.#others = others;
  }

  /** Memory the kept pieces use now (bytes). */
  get used(): number {
    return this.#used;
  }

  /**
   * True when bytes not kept for want of memory were claimed (see {@link overflowError}).
   * Bytes not kept that nothing claims (stale data, metadata dropped) cost nothing.
   */
  get overflowed(): boolean {
    return this.#lostClaimed;
  }

  /**
   * The error of an import that ran out of buffer without a spool: it names the
   * `--max-buffer` that would have held everything at once (valid once every table is
   * known or the stream ended).
   */
  overflowError(atLeast = false): LimitError {
    return new LimitError(
      `more than ${
        formatBytes(this.#limit)
      } of the stream arrived before the metadata that maps it ` +
        `(from byte offset ${this.#lostAt} on); this image needs --max-buffer ` +
        `${atLeast ? "above " : ""}${
          sizeText(this.#peak)
        } to be imported from a pipe without a spool file ` +
        "(or allow spooling, or give the image as a file: -i FILE)",
    );
  }

  /**
   * Keeps `chunk[from, to)`, the stream bytes at `start…`: in memory within the
   * limit, else in the spool, else only counted.
   */
  add(start: number, chunk: Uint8Array, from: number, to: number): void {
    let at = from;
    while (at < to) {
      const pos = start + (at - from);
      const stop = Math.min(to, at + (this.#unit - (pos % this.#unit)));
      if (isAllZero(chunk, at, stop)) {
        this.#push(pos, pos + (stop - at), null);
        at = stop;
        continue;
      }
      // The run of non-zero units, kept as one copy (split per unit) or spooled whole.
      let end = stop;
      while (end < to) {
        const next = Math.min(to, end + this.#unit);
        if (isAllZero(chunk, end, next)) break;
        end = next;
      }
      const cost = this.#cost(pos, end - at);
      this.#count(cost);
      this.#spilling = this.#used + cost + this.#others() > this.#limit;
      if (!this.#spilling) {
        const copy = chunk.slice(at, end);
        for (let a = at; a < end;) {
          const p = start + (a - from);
          const b = Math.min(end, a + (this.#unit - (p % this.#unit)));
          this.#used += b - a + PIECE_OVERHEAD;
          this.#append(p, p + (b - a), copy.subarray(a - at, b - at));
          a = b;
        }
      } else if (this.#spool) {
        this.#push(pos, pos + (end - at), this.#spool.write(chunk.subarray(at, end)));
      } else {
        if (this.#lostAt < 0) this.#lostAt = pos;
        this.#push(pos, pos + (end - at), false);
      }
      at = end;
    }
  }

  /**
   * Once memory is full, keeps up to `length` stream bytes at `start` in the spool
   * without reading them: `move(fd, offset, length)` has the kernel write them into the
   * spool file (a splice from the input pipe) and says how many it moved. Returns that
   * count, 0 when the bytes must be read and {@link add}ed instead.
   */
  spoolDirect(
    start: number,
    length: number,
    move: (fd: number, offset: number, length: number) => number,
  ): number {
    if (!this.#spilling || this.#spool === null) return 0;
    const r = this.#spool.writeDirect(length, move);
    if (r === null || r.n <= 0) return 0;
    this.#count(this.#cost(start, r.n));
    this.#push(start, start + r.n, r.at);
    return r.n;
  }

  /**
   * Moves every piece kept in memory to the spool (the memory is wanted for metadata);
   * returns the bytes of memory freed, 0 without a spool.
   */
  spill(): number {
    if (this.#spool === null) return 0;
    let freed = 0;
    for (let i = 0; i < this.#data.length; i++) {
      const d = this.#data[i];
      if (!(d instanceof Uint8Array)) continue;
      this.#data[i] = this.#spool.write(d);
      this.#used -= d.length + PIECE_OVERHEAD;
      this.#index += PIECE_OVERHEAD;
      freed += d.length + PIECE_OVERHEAD;
    }
    this.#spilling = true;
    return freed;
  }

  /** Memory `length` non-zero bytes at `pos` take in memory pieces. */
  #cost(pos: number, length: number): number {
    const units = Math.ceil((pos % this.#unit + length) / this.#unit);
    return length + units * PIECE_OVERHEAD;
  }

  #count(delta: number) {
    this.#wouldUse += delta;
    // The metadata shares the limit: what is needed is both at once.
    const need = this.#wouldUse + this.#others();
    if (need > this.#peak) this.#peak = need;
  }

  /** A piece outside memory (zeros, spooled, lost): merged with the last when it continues it. */
  #push(start: number, end: number, data: null | number | false) {
    const last = this.#starts.length - 1;
    if (last >= 0 && this.#ends[last] === start) {
      const d = this.#data[last];
      const merge = data === null
        ? d === null
        : data === false
        ? d === false
        : typeof d === "number" && d + (start - this.#starts[last]) === data;
      if (merge) {
        this.#ends[last] = end;
        return;
      }
    }
    if (data === null) this.#count(PIECE_OVERHEAD);
    if (this.#spool !== null) {
      this.#index += PIECE_OVERHEAD;
      if (this.#index > Math.max(this.#limit, INDEX_LIMIT)) {
        throw new LimitError(
          `the stream's bytes waiting for their tables lie in more than ` +
            `${this.#index / PIECE_OVERHEAD} separate pieces (at byte offset ${start}), whose ` +
            `index alone needs --max-buffer above ${sizeText(this.#index)}; give the image as ` +
            `a file (-i FILE), or import with a --max-buffer above that`,
        );
      }
    } else {
      this.#used += PIECE_OVERHEAD;
      if (this.#used + this.#others() > this.#limit) {
        if (this.#lostAt < 0) this.#lostAt = start;
        // Counting only: the index itself must stay bounded.
        if (this.#used + this.#others() > 2 * this.#limit) throw this.overflowError(true);
      }
    }
    this.#append(start, end, data);
  }

  #append(start: number, end: number, data: Piece) {
    this.#starts.push(start);
    this.#ends.push(end);
    this.#data.push(data);
  }

  /** Index of the piece holding stream offset `pos`, or -1. */
  #find(pos: number): number {
    const s = this.#starts;
    let lo = 0;
    let hi = s.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (s[mid] <= pos) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi >= 0 && pos < this.#ends[hi] && this.#data[hi] !== undefined ? hi : -1;
  }

  /** The last piece of the contiguous pieces from `first` that reach `end`, or -1. */
  #reach(first: number, end: number): number {
    let last = first;
    while (this.#ends[last] < end) {
      const n = last + 1;
      if (n >= this.#starts.length || this.#starts[n] !== this.#ends[last]) return -1;
      if (this.#data[n] === undefined) return -1;
      last = n;
    }
    return last;
  }

  /**
   * Takes the whole range `[start, start + length)` out of the buffer: its bytes,
   * {@link ZERO_RANGE} when they were all zero, {@link LOST_RANGE} when not all were
   * kept, or undefined when any byte of it is not held (never kept, dropped, or
   * already taken).
   */
  take(
    start: number,
    length: number,
    optional = false,
  ): Uint8Array | typeof ZERO_RANGE | typeof LOST_RANGE | undefined {
    const first = this.#find(start);
    if (first < 0) return undefined;
    const last = this.#reach(first, start + length);
    if (last < 0) return undefined;
    const out = this.#bytes(first, last, start, length);
    // Bytes the import needs were not kept: it fails once every table is known.
    if (out === LOST_RANGE && !optional) this.#lostClaimed = true;
    this.#forget(first, last, start, start + length);
    return out;
  }

  /**
   * The held bytes from `start` on, as many as are contiguous up to `length` (a copy
   * or a view), {@link LOST_RANGE}, or undefined when `start` itself is not held.
   * Nothing is released: compressed data may share its first and last sectors with
   * other clusters.
   */
  read(start: number, length: number): Uint8Array | typeof LOST_RANGE | undefined {
    const first = this.#find(start);
    if (first < 0) return undefined;
    let last = first;
    while (this.#ends[last] < start + length) {
      const n = last + 1;
      if (n >= this.#starts.length || this.#starts[n] !== this.#ends[last]) break;
      if (this.#data[n] === undefined) break;
      last = n;
    }
    const have = Math.min(this.#ends[last] - start, length);
    const out = this.#bytes(first, last, start, have);
    if (out === LOST_RANGE) this.#lostClaimed = true;
    return out === ZERO_RANGE ? new Uint8Array(have) : out;
  }

  #bytes(
    first: number,
    last: number,
    start: number,
    length: number,
  ): Uint8Array | typeof ZERO_RANGE | typeof LOST_RANGE {
    let zero = true;
    for (let i = first; i <= last; i++) {
      const d = this.#data[i];
      if (d === false) return LOST_RANGE;
      if (d !== null) zero = false;
    }
    if (zero) return ZERO_RANGE;
    const d = this.#data[first];
    const skip = start - this.#starts[first];
    if (first === last && d instanceof Uint8Array) return d.subarray(skip, skip + length);
    const out = this.#fresh(length);
    for (let i = first; i <= last; i++) {
      const s = Math.max(this.#starts[i], start);
      const e = Math.min(this.#ends[i], start + length);
      const p = this.#data[i];
      const into = out.subarray(s - start, e - start);
      if (p instanceof Uint8Array) into.set(p.subarray(s - this.#starts[i], e - this.#starts[i]));
      else if (typeof p === "number") this.#spool!.read(p + (s - this.#starts[i]), into);
    }
    return out;
  }

  /**
   * A new buffer of `length` bytes for bytes read back: small ones are cut one after
   * the other from a shared block, so that the clusters of a table claimed in a row are
   * adjacent in memory and reach the destination as one write, not one per cluster.
   * A block is never reused (queued writes may still refer to it).
   */
  #fresh(length: number): Uint8Array {
    if (length > SLAB_BYTES / 4) return new Uint8Array(length);
    if (this.#slab === null || this.#slabUsed + length > SLAB_BYTES) {
      this.#slab = new Uint8Array(SLAB_BYTES);
      this.#slabUsed = 0;
    }
    const out = this.#slab.subarray(this.#slabUsed, this.#slabUsed + length);
    this.#slabUsed += length;
    return out;
  }

  /**
   * Bytes `[start, end)` of pieces `first…last` are no longer wanted: pieces wholly
   * inside are released, and what they would cost is no longer counted.
   */
  #forget(first: number, last: number, start: number, end: number) {
    for (let i = first; i <= last; i++) {
      const s = Math.max(this.#starts[i], start);
      const e = Math.min(this.#ends[i], end);
      const d = this.#data[i];
      if (e > s && d !== null && d !== undefined) this.#count(-this.#cost(s, e - s));
      if (this.#starts[i] >= start && this.#ends[i] <= end) this.#release(i);
    }
    if (this.#released > 1024 && this.#released * 2 > this.#starts.length) this.#compact();
  }

  #release(i: number) {
    const d = this.#data[i];
    if (d === undefined) return;
    if (d === null) this.#count(-PIECE_OVERHEAD);
    if (typeof d === "number") this.#spool!.punch(d, this.#ends[i] - this.#starts[i]);
    if (this.#spool !== null && !(d instanceof Uint8Array)) this.#index -= PIECE_OVERHEAD;
    else this.#used -= (d instanceof Uint8Array ? d.length : 0) + PIECE_OVERHEAD;
    this.#data[i] = undefined;
    this.#released++;
  }

  /**
   * Stream range `[start, start + length)` is metadata the import never needs
   * (refcount blocks, snapshot tables, bitmaps): what is held of it is let go, and
   * {@link StreamBuffer.dropped} remembers it for messages.
   */
  drop(start: number, length: number): void {
    const end = start + length;
    const d = this.#dropped;
    if (d.length > 0 && d[d.length - 1] === start) d[d.length - 1] = end;
    else if (d.length < 2 * 4096) d.push(start, end); // enough for messages
    let i = this.#find(start);
    if (i < 0) {
      // The first piece starting inside the range, if any.
      const s = this.#starts;
      let lo = 0;
      let hi = s.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (s[mid] < start) lo = mid + 1;
        else hi = mid;
      }
      i = lo;
    }
    let last = i - 1;
    while (last + 1 < this.#starts.length && this.#starts[last + 1] < end) last++;
    if (last < i) return;
    // A spooled piece reaching past the range is cut at its edge, so that the part
    // inside is released and its spool space given back.
    this.#split(last, end);
    if (this.#split(i, start)) {
      i++;
      last++;
    }
    if (last >= i) this.#forget(i, last, start, end);
  }

  /**
   * Cuts spooled piece `i` in two at stream offset `pos` when `pos` falls inside it;
   * true when cut (piece `i + 1` then starts at `pos`). Not done once the index is
   * large (each cut moves the pieces after it).
   */
  #split(i: number, pos: number): boolean {
    const d = this.#data[i];
    const s = this.#starts[i];
    if (typeof d !== "number" || pos <= s || pos >= this.#ends[i]) return false;
    if (this.#starts.length >= MAX_SPLIT_INDEX) return false;
    this.#starts.splice(i + 1, 0, pos);
    this.#ends.splice(i + 1, 0, this.#ends[i]);
    this.#data.splice(i + 1, 0, d + (pos - s));
    this.#ends[i] = pos;
    this.#index += PIECE_OVERHEAD;
    return true;
  }

  /** True when stream offset `pos` was dropped as unneeded metadata. */
  dropped(pos: number): boolean {
    const d = this.#dropped;
    for (let i = 0; i < d.length; i += 2) if (pos >= d[i] && pos < d[i + 1]) return true;
    return false;
  }

  /** Forgets everything (every table is known: what is left is unreferenced). */
  clear(): void {
    this.#starts.length = 0;
    this.#ends.length = 0;
    this.#data.length = 0;
    this.#used = 0;
    this.#index = 0;
    this.#released = 0;
    this.#wouldUse = 0;
    this.#spool?.close();
  }

  /** Drops released pieces from the index so that it stays as small as what it holds. */
  #compact() {
    let w = 0;
    for (let r = 0; r < this.#starts.length; r++) {
      if (this.#data[r] === undefined) continue;
      this.#starts[w] = this.#starts[r];
      this.#ends[w] = this.#ends[r];
      this.#data[w] = this.#data[r];
      w++;
    }
    this.#starts.length = this.#ends.length = this.#data.length = w;
    this.#released = 0;
  }
}

/** A `--max-buffer` value of at least `bytes`, rounded up to a whole MiB. */
export function sizeText(bytes: number): string {
  const mib = Math.max(1, Math.ceil(bytes / 2 ** 20));
  return mib >= 1024 && mib % 1024 === 0 ? `${mib / 1024}G` : `${mib}M`;
}
