/**
 * The input of a stream decoder: large chunks read from a byte stream (or a pipe's
 * descriptor), with a push-back, in a few recycled buffers.
 *
 * @module
 */
import { CHUNK_SIZE } from "./stream.ts";
import type { PipeInput } from "./pipe_input.ts";
import type { SeekableInput } from "./file_input.ts";

/** Longest wait for a pipe's next bytes between two looks at the abort signal. */
const PIPE_WAIT_MS = 200;
/** How long a read waits in place for the pipe's next bytes before {@link PIPE_WAIT_MS}. */
const BRIEF_WAIT_MS = 20;

/**
 * Bytes of queued writes after which a decoder that writes views of the input's
 * chunks flushes its target and releases those chunks (bounds its memory).
 */
export const DECODE_FLUSH_BYTES = 16 * 1024 * 1024;

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
  /** The input when it is a file or device: metadata by random access, gaps skipped. */
  readonly seekable: SeekableInput | null = null;
  readonly #back: Uint8Array[] = [];
  readonly #pool: ArrayBuffer[] = [];
  /** Buffers handed out, with the number of their pieces not released yet. */
  readonly #lent = new Map<ArrayBufferLike, number>();
  #ended = false;
  readonly #signal: AbortSignal | undefined;
  /**
   * Read a pipe without ever blocking the event loop: set when the destination is a
   * network export, whose sockets are served by the event loop (its writes and the
   * server's replies then go on while the next chunk is read).
   */
  overlapIo = false;

  /**
   * `signal` stops a wait for a pipe's next bytes (the reason is thrown); other
   * inputs are read as they come.
   */
  constructor(
    source: ReadableStream<Uint8Array> | AsyncIterator<Uint8Array> | PipeInput,
    signal?: AbortSignal,
  ) {
    this.#signal = signal;
    if ("splice" in source) {
      this.pipe = source;
      if ("skip" in source) this.seekable = source as SeekableInput;
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
    this.#signal?.throwIfAborted();
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

  /**
   * Fills `buf` from the pipe: blocking reads while bytes are there (no thread hop per
   * pipe-full); while the pipe is empty, waits on another thread, so that signals and
   * timers are handled meanwhile. Bytes in hand are returned once the pipe stays empty
   * for a brief wait: a peer that sent its stream's end and keeps the connection open
   * for an answer (XAPI hands over its HTTP connection) sends nothing more.
   */
  async #fill(buf: Uint8Array): Promise<Uint8Array | null> {
    const pipe = this.pipe!;
    let filled = 0;
    while (filled < buf.length) {
      if (filled > 0 && !(await this.#moreSoon())) break;
      if (this.overlapIo) await this.#waitAside();
      else await this.waitForPipe();
      const n = pipe.read(buf.subarray(filled));
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

  /**
   * True when the pipe has bytes (or its end) now or within a brief wait: on another
   * thread when reads overlap writes (the event loop runs meanwhile), in place
   * otherwise. A writer that is only slow (a busy machine) keeps the chunks whole, so
   * that they are not cut where they need not be (zeros left as holes are found
   * within each piece).
   */
  async #moreSoon(): Promise<boolean> {
    const pipe = this.pipe!;
    if (pipe.ready(this.overlapIo ? 0 : BRIEF_WAIT_MS)) return true;
    if (!this.overlapIo) return false;
    await pipe.wait(BRIEF_WAIT_MS);
    return pipe.ready();
  }

  /** Passes over the next `n` bytes of a seekable input without reading them. */
  skip(n: number): void {
    while (n > 0) {
      const back = this.#back.pop();
      if (!back) break;
      if (back.length > n) {
        this.#back.push(back.subarray(n));
        return;
      }
      n -= back.length;
      this.release(back);
    }
    if (n > 0) this.seekable!.skip(n);
  }

  /**
   * Until the pipe has bytes (or its writer is gone): waits on another thread, looking
   * at the abort signal in between (its reason is thrown). `turn`: also let the event
   * loop run once first (pending signals and timers), even when bytes are there.
   */
  async waitForPipe(turn = false): Promise<void> {
    const pipe = this.pipe;
    if (pipe === null) return;
    if (turn) await new Promise((resolve) => setTimeout(resolve, 0));
    this.#signal?.throwIfAborted();
    // A writer a little slower than us: wait briefly in place (no thread hop).
    while (!pipe.ready(BRIEF_WAIT_MS)) {
      await pipe.wait(PIPE_WAIT_MS);
      this.#signal?.throwIfAborted();
    }
  }

  /**
   * Until the pipe has bytes (or its writer is gone), waiting on another thread even
   * when they are there already: the event loop turns between two reads.
   */
  async #waitAside(): Promise<void> {
    const pipe = this.pipe!;
    do {
      this.#signal?.throwIfAborted();
      await pipe.wait(PIPE_WAIT_MS);
    } while (!pipe.ready());
  }

  /**
   * True when reading on would wait: nothing is held in front, and the input is a pipe
   * or socket where no byte (nor its end) came within a brief wait. A peer that keeps
   * its connection open for an answer (XAPI hands over its HTTP connection) is then
   * done sending: a decoder at its stream's end must not wait for more.
   */
  idle(): boolean {
    return this.#back.length === 0 && this.pipe !== null && !this.#ended &&
      !this.pipe.ready(BRIEF_WAIT_MS);
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
    return await this.#gather(out, first.length, false);
  }

  /**
   * The next `n` bytes copied into a buffer of their own (fewer only at the end of the
   * stream), every input buffer they came from released: for headers read between
   * large pieces of data, so that reading them never pins the input's buffers.
   */
  async readCopy(n: number): Promise<Uint8Array> {
    return await this.#gather(new Uint8Array(n), 0, true);
  }

  /** Fills `out` from `have` on (fewer at the end); `release`s the chunks it used up. */
  async #gather(out: Uint8Array, have: number, release: boolean): Promise<Uint8Array> {
    while (have < out.length) {
      const c = await this.next();
      if (!c) return out.subarray(0, have);
      const take = Math.min(c.length, out.length - have);
      out.set(c.subarray(0, take), have);
      have += take;
      this.unshift(c.subarray(take));
      if (release) this.release(c);
    }
    return out;
  }

  /** Stops reading (releases the source; a pipe's descriptor is left to its owner). */
  async cancel(): Promise<void> {
    if (this.#byob) await this.#byob.cancel();
    else await this.#it?.return?.();
  }
}
