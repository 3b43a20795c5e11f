/**
 * The read–decode–write loop of an import: each chunk is decoded while the previous
 * chunk's writes run; data that follows a chunk on a pipe may be spliced by the kernel.
 *
 * @module
 */
import type { ImageTarget } from "./endpoint.ts";
import type { ChunkStream } from "./chunk_stream.ts";

export interface ChunkConsumer {
  /**
   * Decodes one chunk, queueing writes; may stop early (returning the bytes it took)
   * when enough is waiting to be written: the rest is pushed again after a write.
   */
  push(chunk: Uint8Array): number | void;
  /** See {@link StreamWalker.moveDirect}. */
  moveDirect?(move: (guest: number, length: number) => number): number;
  /** See {@link StreamWalker.nextAssembled}. */
  nextAssembled?(): number;
  /** See {@link StreamWalker.advance}. */
  advance?(limit: number): number;
  /** See {@link StreamWalker.spoolAhead}. */
  spoolAhead?(move: (fd: number, offset: number, length: number) => number): number;
  /** Stream offset of the next byte to come. */
  readonly pos?: number;
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
    // Awaited before the next flush or at the end; meanwhile the next chunk is read,
    // which may wait for the input (a failure must not count as unhandled then).
    writing.catch(() => {});
  };
  // After data went by spliced, read only the table that comes next (when one does),
  // so that the data after it is spliced too.
  let limit = 0;
  const seekable = input.seekable;
  const pipe = seekable ? null : input.pipe;
  // While the bytes ahead are to wait in the spool, they are spliced there, the pipe
  // waited for (interruptibly) when empty: reading them through JavaScript instead would
  // copy them twice more and look at every cluster for zeros. A pipe holds 1 MiB: many
  // splices make one turn of the loop, up to a budget.
  const spoolMove = pipe && walker.spoolAhead
    ? async (): Promise<boolean> => {
      let moved = 0;
      while (moved < MOVE_BUDGET && input.drained) {
        let starved = false;
        const n = walker.spoolAhead!((fd, at, length) => {
          // An empty pipe would block out of reach of signals: wait briefly in place
          // (not when the event loop serves the destination's sockets).
          if (!pipe.ready(input.overlapIo ? 0 : BRIEF_WAIT_MS)) {
            starved = true;
            return 0;
          }
          return pipe.splice(fd, at, length, "the spool file");
        });
        moved += n;
        if (n > 0) continue;
        if (!starved || moved > 0) break;
        await input.waitForPipe();
      }
      return moved > 0;
    }
    : null;
  try {
    for (;;) {
      if (seekable && walker.advance && walker.pos !== undefined) {
        // Nothing is kept and no range needs the bytes up to the next range: seek.
        const from = walker.pos;
        const to = walker.advance(seekable.size);
        if (to > from) input.skip(to - from);
      }
      const chunk = await input.next(limit);
      limit = 0;
      if (!chunk) break;
      for (let at = 0; at < chunk.length;) {
        const end = Math.min(chunk.length, at + SLICE);
        const took = walker.push(
          at === 0 && end === chunk.length ? chunk : chunk.subarray(at, end),
        );
        const stopped = typeof took === "number" && at + took < end;
        at = typeof took === "number" ? at + took : end;
        if (at < chunk.length && (stopped || target.queued >= HIGH_WATER)) await write(chunk);
      }
      onChunk(chunk);
      await write(chunk);
      // Data spliced into the destination, bytes waiting for their tables into the spool.
      // Read only the table (or passed-over range) that comes next, so that what
      // follows it goes the kernel's way too.
      if (pipe && (direct || spoolMove)) limit = walker.nextAssembled?.() ?? 0;
      for (;;) {
        let moved = (await direct?.move()) === true;
        if (await spoolMove?.()) moved = true;
        if (!moved) break;
        onChunk(EMPTY);
        limit = walker.nextAssembled?.() ?? 0;
        // Kernel moves are synchronous: let signals and timers run between slices.
        await new Promise((resolve) => setTimeout(resolve, 0));
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
/** Spliced bytes after which their writeback to the device is started. */
const WRITEBACK_STRIDE = 16 * 1024 * 1024;
/**
 * How long a splice waits in place for the pipe's next bytes (a writer a little slower
 * than us) before waiting on another thread, out of the event loop's way.
 */
const BRIEF_WAIT_MS = 20;
/** Spliced bytes between two turns of the event loop (signals, timers). */
const MOVE_BUDGET = 256 * 1024 * 1024;

/** The splice path of {@link walkChunks}, when input, decoder and target allow it. */
function openDirect(input: ChunkStream, walker: ChunkConsumer, target: ImageTarget) {
  const pipe = input.pipe;
  if (!pipe || !walker.moveDirect || !target.wroteDirect || target.path === undefined) return null;
  if (target.direct) return null; // O_DIRECT writes: the data goes through write()
  const path = target.path;
  let fd = pipe.openDestination(path);
  if (fd === null) return null;
  // The range spliced since the last writeback was started.
  let lo = Infinity;
  let hi = 0;
  // Why the last moves stopped: the pipe was empty (a splice would block, out of reach
  // of signals), or this turn's budget was spent.
  let starved = false;
  let budget = 0;
  const move = (guest: number, length: number): number => {
    if (budget <= 0) return 0;
    if (!pipe.ready(BRIEF_WAIT_MS)) {
      starved = true;
      return 0;
    }
    const n = pipe.splice(fd!, guest, length, path);
    if (n < 0) {
      // Refused for these descriptors: read everything from now on.
      pipe.closeDestination(fd!);
      fd = null;
      return 0;
    }
    if (n > 0) {
      budget -= n;
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
    /**
     * Moves what the decoder lets move, waiting (interruptibly) for the pipe's bytes and
     * letting the event loop run between budgets; true if anything was moved.
     */
    async move(): Promise<boolean> {
      let any = false;
      while (fd !== null && input.drained) {
        starved = false;
        budget = MOVE_BUDGET;
        if (walker.moveDirect!(move) > 0) any = true;
        if (starved) await input.waitForPipe();
        else if (budget <= 0) await input.waitForPipe(true);
        else break;
      }
      return any;
    },
    close() {
      if (fd !== null) pipe.closeDestination(fd);
      fd = null;
    },
  };
}
