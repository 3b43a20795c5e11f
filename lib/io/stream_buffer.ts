/**
 * The bounded memory of an import: bytes of the stream that went by before the
 * metadata saying what they are (data that precedes its L2 table or BAT, tables that
 * precede the table pointing at them). They are kept, up to a limit, until they are
 * claimed or until every table is known and the rest can be forgotten. An all-zero
 * piece is remembered without its bytes.
 *
 * @module
 */
import { LimitError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { isAllZero } from "../zero.ts";

/** What {@link StreamBuffer.take} returns for a range that was all zeros. */
export const ZERO_RANGE: unique symbol = Symbol("zero range");

/** Bookkeeping cost counted for every kept piece, so tiny pieces cannot run away. */
const PIECE_OVERHEAD = 64;

/** Bytes of the stream held back, by stream offset, within a memory limit. */
export class StreamBuffer {
  readonly #limit: number;
  readonly #unit: number;
  // Pieces in stream order, never crossing a multiple of `unit`; data null = zeros,
  // data undefined = claimed and released.
  readonly #starts: number[] = [];
  readonly #ends: number[] = [];
  readonly #data: (Uint8Array | null | undefined)[] = [];
  #used = 0;
  #released = 0;
  /** Memory counted against the same limit elsewhere (the agenda's metadata). */
  #others: () => number = () => 0;

  /**
   * `limit` is the most memory (bytes) the kept pieces may use; `unit` the grain at
   * which all-zero pieces are recognised (the image's cluster size).
   */
  constructor(limit: number, unit: number) {
    this.#limit = limit;
    this.#unit = unit;
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
   * Keeps `chunk[from, to)`, the stream bytes at `start…`. Throws {@link LimitError}
   * when the limit would be passed.
   */
  add(start: number, chunk: Uint8Array, from: number, to: number): void {
    let at = from;
    while (at < to) {
      const pos = start + (at - from);
      const stop = Math.min(to, at + (this.#unit - (pos % this.#unit)));
      if (isAllZero(chunk, at, stop)) {
        this.#push(pos, pos + (stop - at), null, PIECE_OVERHEAD);
        at = stop;
        continue;
      }
      // Copy the run of non-zero units in one piece of memory, then split it.
      let end = stop;
      while (end < to) {
        const next = Math.min(to, end + this.#unit);
        if (isAllZero(chunk, end, next)) break;
        end = next;
      }
      const copy = chunk.slice(at, end);
      for (let a = at; a < end;) {
        const p = start + (a - from);
        const b = Math.min(end, a + (this.#unit - (p % this.#unit)));
        this.#push(p, p + (b - a), copy.subarray(a - at, b - at), b - a + PIECE_OVERHEAD);
        a = b;
      }
      at = end;
    }
  }

  #push(start: number, end: number, data: Uint8Array | null, cost: number) {
    if (this.#used + cost + this.#others() > this.#limit) {
      throw new LimitError(
        `more than ${
          formatBytes(this.#limit)
        } of the stream arrived before the metadata that maps it ` +
          `(at byte offset ${start}); import again with a larger --max-buffer (for example ` +
          `--max-buffer ${nextLimit(this.#limit)})`,
      );
    }
    this.#used += cost;
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

  /**
   * Takes the whole range `[start, start + length)` out of the buffer: its bytes,
   * {@link ZERO_RANGE} when they were all zero, or undefined when any byte of it is
   * not held (never kept, or already taken).
   */
  take(start: number, length: number): Uint8Array | typeof ZERO_RANGE | undefined {
    const first = this.#find(start);
    if (first < 0) return undefined;
    let last = first;
    while (this.#ends[last] < start + length) {
      const n = last + 1;
      if (n >= this.#starts.length || this.#starts[n] !== this.#ends[last]) return undefined;
      if (this.#data[n] === undefined) return undefined;
      last = n;
    }
    let out: Uint8Array | typeof ZERO_RANGE;
    const skip = start - this.#starts[first];
    if (first === last) {
      const d = this.#data[first];
      out = d ? d.subarray(skip, skip + length) : ZERO_RANGE;
    } else if (this.#allZero(first, last)) {
      out = ZERO_RANGE;
    } else {
      out = this.#gather(first, start, length);
    }
    for (let i = first; i <= last; i++) {
      if (this.#starts[i] >= start && this.#ends[i] <= start + length) this.#release(i);
    }
    if (this.#released > 1024 && this.#released * 2 > this.#starts.length) this.#compact();
    return out;
  }

  /**
   * The held bytes from `start` on, as many as are contiguous up to `length` (a copy
   * or a view), or undefined when `start` itself is not held. Nothing is released:
   * compressed data may share its first and last sectors with other clusters.
   */
  read(start: number, length: number): Uint8Array | undefined {
    const first = this.#find(start);
    if (first < 0) return undefined;
    let last = first;
    let have = this.#ends[first] - start;
    while (have < length) {
      const n = last + 1;
      if (n >= this.#starts.length || this.#starts[n] !== this.#ends[last]) break;
      if (this.#data[n] === undefined) break;
      last = n;
      have = this.#ends[n] - start;
    }
    const d = this.#data[first];
    const skip = start - this.#starts[first];
    if (first === last && d) return d.subarray(skip, skip + Math.min(have, length));
    return this.#gather(first, start, Math.min(have, length));
  }

  #allZero(first: number, last: number): boolean {
    for (let i = first; i <= last; i++) if (this.#data[i] !== null) return false;
    return true;
  }

  #gather(first: number, start: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    for (let i = first; i < this.#starts.length; i++) {
      const s = Math.max(this.#starts[i], start);
      const e = Math.min(this.#ends[i], start + length);
      if (s >= e) break;
      const d = this.#data[i];
      if (d) out.set(d.subarray(s - this.#starts[i], e - this.#starts[i]), s - start);
    }
    return out;
  }

  #release(i: number) {
    const d = this.#data[i];
    if (d === undefined) return;
    this.#used -= (d ? d.length : 0) + PIECE_OVERHEAD;
    this.#data[i] = undefined;
    this.#released++;
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

  /** Forgets everything (every table is known: what is left is unreferenced). */
  clear(): void {
    this.#starts.length = 0;
    this.#ends.length = 0;
    this.#data.length = 0;
    this.#used = 0;
    this.#released = 0;
  }
}

/** A larger `--max-buffer` to suggest after `limit` was not enough. */
export function nextLimit(limit: number): string {
  const mib = Math.max(1, Math.ceil((limit * 4) / 2 ** 20));
  return mib >= 1024 && mib % 1024 === 0 ? `${mib / 1024}G` : `${mib}M`;
}
