/**
 * An NBD export as an export's {@link DiskSource}: reads spread over the pool's
 * connections, block status as the data extents (trusted: the planned clusters are
 * not read twice), and read-ahead along the reads pass 2 announces, so that even a
 * run of small scattered clusters keeps every connection busy.
 *
 * @module
 */
import { SourceChangedError } from "../errors.ts";
import type { DiskSource } from "../io/endpoint.ts";
import { NbdExport, type NbdOptions, READ_PIECE } from "./client.ts";

/** Bytes read ahead at most (in pieces of 256 KiB). */
const READ_AHEAD = 32 * 1024 * 1024;
/** Announced runs this long are not read ahead but read directly when asked for. */
const DIRECT_RUN = 2 * 1024 * 1024;

interface Piece {
  offset: number;
  buf: Uint8Array;
  /** Bytes of `buf` already handed out. */
  used: number;
  done: Promise<void>;
}

/** An NBD export opened for reading (see the module comment). */
export class NbdSource implements DiskSource {
  readonly isFile = false;
  readonly remote = true;
  #export: NbdExport;
  #ahead: Piece[] = [];
  #aheadBytes = 0;
  #plan: Iterator<readonly [number, number]> | null = null;
  /** Piece buffers to reuse (no allocation and zeroing per piece). */
  #spare: Uint8Array[] = [];
  /** The rest of the announced range being cut into pieces. */
  #next: [number, number] | null = null;

  constructor(nbd: NbdExport) {
    this.#export = nbd;
  }

  /** Opens the export at `uri` (see `NbdExport.open`). */
  static async open(uri: string, options: NbdOptions = {}): Promise<NbdSource> {
    return new NbdSource(await NbdExport.open(uri, options));
  }

  get path(): string {
    return this.#export.uri;
  }

  get size(): number {
    return this.#export.size;
  }

  /** The pool (for its connection count and export facts). */
  get export(): NbdExport {
    return this.#export;
  }

  extents(limit: number): Promise<Iterable<readonly [number, number]> | null> {
    return this.#export.extents(Math.min(limit, this.size));
  }

  willRead(ranges: Iterable<readonly [number, number]>): void {
    this.#drop();
    this.#plan = ranges[Symbol.iterator]();
    this.#topUp();
  }

  /** Forgets the read-ahead (after a read off the announced order). */
  #drop(): void {
    this.#ahead = [];
    this.#aheadBytes = 0;
    this.#plan = null;
    this.#next = null;
  }

  #topUp(): void {
    while (this.#aheadBytes < READ_AHEAD) {
      if (this.#next === null) {
        const r = this.#plan?.next();
        if (r === undefined || r.done) return;
        const start = r.value[0];
        const end = Math.min(r.value[1], this.size);
        if (end <= start) continue;
        this.#next = [start, end];
      }
      const [start, end] = this.#next;
      // A long run is read straight into the reader's buffers (many requests at once,
      // no copy); read-ahead resumes after it.
      if (end - start >= DIRECT_RUN) return;
      const len = Math.min(READ_PIECE, end - start);
      const buf = (this.#spare.pop() ?? new Uint8Array(READ_PIECE)).subarray(0, len);
      const done = this.#export.read(buf, start);
      done.catch(() => {}); // reported when the read that needs it awaits it
      this.#ahead.push({ offset: start, buf, used: 0, done });
      this.#aheadBytes += len;
      this.#next = start + len < end ? [start + len, end] : null;
    }
  }

  async readAt(buf: Uint8Array, position: number, limit = this.size): Promise<void> {
    const want = Math.max(0, Math.min(buf.length, limit - position));
    if (want < buf.length) buf.fill(0, want);
    if (position + want > this.size) {
      throw new SourceChangedError(
        `${this.path} has ${this.size} bytes, fewer than the ${limit} expected: the export shrank`,
      );
    }
    let got = 0;
    for (;;) {
      const head = this.#ahead[0];
      if (got >= want || head === undefined || head.offset + head.used !== position + got) break;
      await head.done;
      const n = Math.min(want - got, head.buf.length - head.used);
      buf.set(head.buf.subarray(head.used, head.used + n), got);
      head.used += n;
      got += n;
      if (head.used === head.buf.length) {
        this.#ahead.shift();
        this.#aheadBytes -= head.buf.length;
        this.#spare.push(new Uint8Array(head.buf.buffer, 0, READ_PIECE));
      }
    }
    if (got < want) {
      const at = position + got;
      const next = this.#next;
      if (
        this.#ahead.length === 0 && next !== null && next[0] === at && next[1] - at >= DIRECT_RUN
      ) {
        // The long run read ahead stops at: read it directly, then go on along the plan.
        const end = Math.min(next[1], position + want);
        const reading = this.#export.read(buf.subarray(got, end - position), at);
        this.#next = end < next[1] ? [end, next[1]] : null;
        if (this.#next === null || this.#next[1] - this.#next[0] < DIRECT_RUN) this.#topUp();
        await reading;
        got = end - position;
      }
    }
    if (got < want) {
      if (this.#ahead.length > 0 || this.#next !== null) this.#drop();
      await this.#export.read(buf.subarray(got, want), position + got);
    }
    this.#topUp();
  }

  currentSize(): Promise<number> {
    // An NBD export's size is fixed for the session.
    return Promise.resolve(this.size);
  }

  close(): void {
    this.#drop();
    this.#export.close().catch(() => {});
  }
}
