/**
 * `--direct`: keeping a transfer's data out of the host's page cache, as vhd-tool's
 * O_DIRECT does, without losing the kernel's readahead, its kernel copies (splice,
 * copy_file_range) or its write-behind. Read ranges are dropped from the cache a
 * little behind the reader (`posix_fadvise(POSIX_FADV_DONTNEED)`); written ranges
 * are written back in strides (`sync_file_range`, the next stride's writeback
 * started while the previous one is awaited) and then dropped. The cache thus holds
 * a few strides of the transfer, not the disk.
 *
 * Why not O_DIRECT itself: Deno opens files without it, direct reads have no
 * readahead (a cold disk is read one request at a time unless reads are issued in
 * parallel), and splice/copy_file_range from an O_DIRECT descriptor go through a
 * bounce buffer. Dropping behind keeps every fast path and the memory goal.
 *
 * Reached through FFI; {@link openPageCacheDropper} returns null without
 * `--allow-ffi` or off Linux (the transfer then uses the page cache as usual).
 *
 * @module
 */
import { loadLibc, O_CLOEXEC, O_RDONLY, POSIX_FADV_DONTNEED } from "./libc.ts";

const POSIX_FADV_WILLNEED = 3;
const SYNC_FILE_RANGE_WAIT_BEFORE = 1;
const SYNC_FILE_RANGE_WRITE = 2;
const SYNC_FILE_RANGE_WAIT_AFTER = 4;
/** Bytes read or written between two drops. */
export const DROP_STRIDE = 16 * 1024 * 1024;
/**
 * Read pages are dropped this far behind the reader: a page spliced into an output
 * pipe is in use until the pipe's reader takes it (the pipe holds at most 1 MiB).
 */
const READ_LAG = 4 * 1024 * 1024;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  posix_fadvise: { parameters: ["i32", "i64", "i64", "i32"], result: "i32" },
  sync_file_range: { parameters: ["i32", "i64", "i64", "u32"], result: "i32" },
  sync_file_range_async: {
    name: "sync_file_range",
    parameters: ["i32", "i64", "i64", "u32"],
    result: "i32",
    nonblocking: true,
  },
} as const;

/**
 * One file's page cache: read ahead on request, and with `drop` its transferred
 * ranges dropped again; see the module comment.
 */
export interface PageCache {
  /** True when transferred ranges leave the cache again (`--direct`). */
  readonly drop: boolean;
  /** Starts reading `[offset, offset + length)` into the cache (not waiting for it). */
  willNeed(offset: number, length: number): void;
  /** `[offset, offset + length)` was read (mostly in ascending order): dropped behind. */
  read(offset: number, length: number): void;
  /** `[offset, offset + length)` was written (mostly in ascending order): written back, dropped. */
  wrote(offset: number, length: number): void;
  /**
   * Drops everything transferred: written ranges are written back first (waiting
   * for them). Releases the file; later calls do nothing.
   */
  close(): void;
}

/** A range `[lo, hi)`, empty when `hi <= lo`. */
interface Span {
  lo: number;
  hi: number;
}

const empty = (): Span => ({ lo: Infinity, hi: 0 });
const widen = (s: Span, offset: number, length: number) => {
  s.lo = Math.min(s.lo, offset);
  s.hi = Math.max(s.hi, offset + length);
};

/**
 * The page cache of the file or block device at `path` (opened here, read-only: the
 * cache belongs to the file, whichever descriptor reads or writes it), dropping what
 * is transferred when `drop` is set, or null when FFI is unavailable or it cannot be
 * opened. `writeback` without `drop`: what is written has its writeback started every
 * {@link DROP_STRIDE} bytes (not waited for, the pages stay cached), so that a final
 * `fdatasync` finds little left to write: an import that syncs its data at the end
 * writes the device while it receives the stream, as the kernel copies do.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openPageCache } from "./page_cache.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(1 << 20).fill(1));
 * const cache = openPageCache(`${dir}/disk.raw`, true); // null without --allow-ffi
 * cache?.read(0, 1 << 20);
 * cache?.close(); // the file's pages read above leave the page cache
 * assert.deepEqual((await Deno.readFile(`${dir}/disk.raw`))[5], 1);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function openPageCache(
  path: string,
  drop: boolean,
  writeback = false,
): PageCache | null {
  const c = loadLibc(SYMBOLS);
  if (c === null) return null;
  const fd = c.open(new TextEncoder().encode(path + "\0"), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return null;
  const dropRange = (s: Span) => {
    if (s.hi > s.lo) c.posix_fadvise(fd, BigInt(s.lo), BigInt(s.hi - s.lo), POSIX_FADV_DONTNEED);
  };
  const sync = (s: Span, flags: number) => {
    if (s.hi > s.lo) c.sync_file_range(fd, BigInt(s.lo), BigInt(s.hi - s.lo), flags);
  };
  const waitAll = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
    SYNC_FILE_RANGE_WAIT_AFTER;
  /** Everything read or written, dropped again at the end. */
  const all = empty();
  /** Read since the last drop. */
  let reading = empty();
  /** Written since the last stride; the stride whose writeback was started. */
  let writing = empty();
  let started = empty();
  let wroteAny = false;
  /** The writebacks being started on another thread (`writeback` without `drop`). */
  let starting: Promise<unknown> = Promise.resolve();
  let closed = false;
  return {
    drop,
    willNeed(offset, length) {
      if (!closed && length > 0) {
        c.posix_fadvise(fd, BigInt(offset), BigInt(length), POSIX_FADV_WILLNEED);
      }
    },
    read(offset, length) {
      if (!drop || closed || length <= 0) return;
      widen(all, offset, length);
      widen(reading, offset, length);
      if (reading.hi - reading.lo >= DROP_STRIDE + READ_LAG) {
        const behind = { lo: reading.lo, hi: reading.hi - READ_LAG };
        dropRange(behind);
        reading = { lo: behind.hi, hi: reading.hi };
      }
    },
    wrote(offset, length) {
      if (!(drop || writeback) || closed || length <= 0) return;
      widen(writing, offset, length);
      if (!drop) {
        if (writing.hi - writing.lo < DROP_STRIDE) return;
        // On another thread: submitting the writes takes the caller's processor time.
        const [lo, hi] = [writing.lo, writing.hi];
        starting = starting.then(() =>
          c.sync_file_range_async(fd, BigInt(lo), BigInt(hi - lo), SYNC_FILE_RANGE_WRITE)
        );
        writing = empty();
        return;
      }
      wroteAny = true;
      widen(all, offset, length);
      if (writing.hi - writing.lo < DROP_STRIDE) return;
      sync(writing, SYNC_FILE_RANGE_WRITE); // start this stride's writeback
      sync(started, waitAll); // the previous one is done by now, mostly
      dropRange(started);
      started = writing;
      writing = empty();
    },
    close() {
      if (closed) return;
      closed = true;
      if (wroteAny) sync(all, waitAll);
      if (drop) dropRange(all);
      starting.then(() => c.close(fd)); // after the writebacks being started
    },
  };
}
