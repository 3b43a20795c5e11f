/**
 * `--direct` with O_DIRECT: a file or block device opened through FFI with `O_DIRECT`,
 * read and written in aligned pieces through reused page-aligned buffers, so that the
 * data never enters the host's page cache (vhd-tool's `--direct`).
 *
 * - Reads of any range read the aligned range around it into a staging buffer (a
 *   direct read's offset, length and memory must be multiples of the device's block
 *   size; {@link DIRECT_ALIGN} covers 512-byte and 4 KiB devices) and copy out.
 * - Writes are staged the same way: the aligned middle of a range is written
 *   directly, from one of two staging buffers on another thread while the next range
 *   is copied into the other; an unaligned head or tail (a partial block at the end of
 *   a file, 512-byte clusters) is written through the page cache (a second, ordinary
 *   descriptor), which the kernel keeps coherent with direct writes.
 * - Where `O_DIRECT` is refused — at open (tmpfs: EINVAL) {@link openDirectFile}
 *   returns null and callers keep the page cache at bay as before (page_cache.ts);
 *   for a transfer (EINVAL: an alignment this device does not take) the file goes on
 *   through the page cache.
 *
 * Optional like every FFI piece: null without `--allow-ffi` or off Linux.
 *
 * @module
 */
import { DiskstreamError } from "../errors.ts";
import { errnoMessage } from "./errno.ts";
import { BATCH_READS, type BatchReads, lazyReadRing } from "./uring.ts";
import {
  EINTR,
  EINVAL,
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  loadLibc,
  O_CLOEXEC,
  O_RDONLY,
  O_RDWR,
  PIPE_BYTES,
  POSIX_FADV_DONTNEED,
  readErrno,
  REFUSED_ERRNOS,
  SPLICE_F_MORE,
  SPLICE_F_MOVE,
} from "./libc.ts";

/** Alignment of direct transfers: offsets, lengths and buffer addresses. */
export const DIRECT_ALIGN = 4096;
/** Size of each staging buffer: the largest single direct transfer. */
export const DIRECT_CHUNK = 8 * 1024 * 1024;
/** open(2)'s O_DIRECT (its value differs between architectures). */
const O_DIRECT = Deno.build.arch === "aarch64" ? 0o200000 : 0o40000;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pread_async: {
    name: "pread",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwrite_async: {
    name: "pwrite",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  splice: { parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"], result: "isize" },
  splice_async: {
    name: "splice",
    parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"],
    result: "isize",
    nonblocking: true,
  },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  fdatasync: { parameters: ["i32"], result: "i32" },
  posix_fadvise: { parameters: ["i32", "i64", "i64", "i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/**
 * `size` bytes whose first byte sits at a multiple of {@link DIRECT_ALIGN} in memory
 * (a direct transfer needs aligned memory). The backing store of an ArrayBuffer does
 * not move, so the alignment holds for the buffer's life.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { alignedBuffer, DIRECT_ALIGN } from "./direct_io.ts";
 *
 * const buf = alignedBuffer(8192);
 * assert.equal(buf.length, 8192);
 * const at = Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf));
 * assert.equal(Number(BigInt(at) % BigInt(DIRECT_ALIGN)), 0);
 * ```
 */
export function alignedBuffer(size: number): Uint8Array {
  const raw = new Uint8Array(size + DIRECT_ALIGN);
  const at = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw)));
  const pad = Number((BigInt(DIRECT_ALIGN) - at % BigInt(DIRECT_ALIGN)) % BigInt(DIRECT_ALIGN));
  return raw.subarray(pad, pad + size);
}

/**
 * Pipes, hence reads running at once, of {@link DirectFile.spliceTo}: a cold 2 GiB loop
 * device was exported with a hint in 1.25–1.33 s with 2, 1.12–1.17 s with 8 (the disk
 * in one call; 16 or 32 were no faster).
 */
const SPLICE_PIPES = 8;

/** The most {@link DirectFile.readView} returns at once. */
export const DIRECT_VIEW = DIRECT_CHUNK - DIRECT_ALIGN;

const down = (x: number) => x - (x % DIRECT_ALIGN);
const up = (x: number) => down(x + DIRECT_ALIGN - 1);

/**
 * A file or block device opened with `O_DIRECT`; see the module comment. Its batched
 * reads ({@link BatchReads}) are direct too: the device has them all queued at once
 * (a cold disk's probes, which one at a time would each wait for the device); `into`,
 * `length` and the positions must be multiples of {@link DIRECT_ALIGN}, or the kernel
 * fails those reads (negative `results`).
 */
export interface DirectFile extends BatchReads {
  readonly path: string;
  /** False once the kernel refused a direct transfer and the descriptor went buffered. */
  readonly direct: boolean;
  /**
   * Reads `buf.length` bytes at `position` (any alignment) into `buf`; returns how
   * many were read (fewer at the end of the file). Throws on a read error. Writes still
   * running are not waited for: {@link DirectFile.drain} first to read them back.
   */
  readSync(buf: Uint8Array, position: number): number;
  /**
   * {@link DirectFile.readSync} on another thread (one at a time per file), after the
   * running writes that cover the range.
   */
  read(buf: Uint8Array, position: number): Promise<number>;
  /**
   * Reads up to `length` bytes at `position` (at most {@link DIRECT_VIEW} bytes) and
   * returns them as a view of a staging buffer, valid until the next read (no copy);
   * shorter at the end of the file. Like {@link DirectFile.readSync}, it does not wait
   * for running writes.
   */
  readView(position: number, length: number): Uint8Array;
  /**
   * Moves `length` bytes at `position` into the pipe or socket `out` without copying
   * them through memory: the kernel reads them with O_DIRECT into pages it then hands
   * to `out` (`splice`), several reads at once, each into a pipe of its own, taken in
   * order. Resolves false, having moved nothing, when the kernel refuses it for these
   * descriptors or this alignment (the caller reads and writes instead); fewer bytes
   * are moved only at the end of the file. `moved` is told each piece moved; a failed
   * write to `out` calls `outError` with its errno (which throws); a failed read throws.
   */
  spliceTo(
    out: number,
    position: number,
    length: number,
    moved: (n: number) => void,
    outError: (errno: number) => never,
  ): Promise<boolean>;
  /**
   * Writes `bytes` at `position` (any alignment). The bytes are copied before this
   * returns; the direct write of the copy may still be running: {@link DirectFile.drain}
   * waits for it (and throws its error). Throws an earlier write's error.
   */
  write(bytes: Uint8Array, position: number): Promise<void>;
  /** Waits for the writes that are running. */
  drain(): Promise<void>;
  /** {@link DirectFile.drain}, then `fdatasync` (a device's cache, the file's size). */
  sync(): Promise<void>;
  /** Closes the descriptors (once the writes still running have ended). */
  close(): void;
}

/**
 * Opens `path` with `O_DIRECT`, for reading or (`write`) reading and writing; null
 * when FFI is unavailable, the open fails (callers open it their usual way and report
 * that) or the file system refuses `O_DIRECT` (tmpfs).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openDirectFile } from "./direct_io.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(10000).fill(7));
 * const file = openDirectFile(`${dir}/disk.raw`, true); // null without --allow-ffi, or on tmpfs
 * if (file !== null) {
 *   await file.write(new Uint8Array(5000).fill(1), 3000); // unaligned: head and tail buffered
 *   await file.sync();
 *   const back = new Uint8Array(10000);
 *   assert.equal(file.readSync(back, 0), 10000);
 *   assert.deepEqual([back[2999], back[3000], back[7999], back[8000]], [7, 1, 1, 7]);
 *   file.close();
 * }
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function openDirectFile(path: string, write: boolean): DirectFile | null {
  const c = loadLibc(SYMBOLS);
  if (c === null) return null;
  const mode = (write ? O_RDWR : O_RDONLY) | O_CLOEXEC;
  const name = new TextEncoder().encode(path + "\0");
  const fd = c.open(name, mode | O_DIRECT, 0);
  if (fd < 0) return null;
  const plain = c.open(name, mode, 0);
  if (plain < 0) {
    c.close(fd);
    return null;
  }
  return new Direct(c, fd, plain, path);
}

type Libc = NonNullable<ReturnType<typeof loadLibc<typeof SYMBOLS>>>;

class Direct implements DirectFile {
  direct = true;
  #c: Libc;
  /** The O_DIRECT descriptor, and an ordinary one for unaligned pieces. */
  #fd: number;
  #plain: number;
  /** Staging buffers, made when first needed: writes alternate between 0 and 1, reads use 2 and 3. */
  #slots: Uint8Array[] = [];
  #running: (Promise<void> | null)[] = [null, null];
  /** The byte ranges `[from, to)` the running writes cover. */
  #ranges: [number, number][] = [[0, 0], [0, 0]];
  #next = 0;
  /** The first error of a write that ran on another thread. */
  #failed: Error | null = null;
  /** The range transferred, `[lo, hi)`: dropped from the page cache at the end. */
  #lo = Infinity;
  #hi = 0;
  #ring = lazyReadRing(BATCH_READS);

  #touch(at: number, length: number): void {
    this.#lo = Math.min(this.#lo, at);
    this.#hi = Math.max(this.#hi, at + length);
  }

  constructor(c: Libc, fd: number, plain: number, readonly path: string) {
    this.#c = c;
    this.#fd = fd;
    this.#plain = plain;
  }

  #slot(i: number): Uint8Array {
    return this.#slots[i] ??= alignedBuffer(DIRECT_CHUNK);
  }

  #errno(): number {
    return readErrno(this.#c.__errno_location);
  }

  /** The descriptor for the next transfer: the ordinary one once direct ones are refused. */
  #for(buffered: boolean): number {
    return buffered || !this.direct ? this.#plain : this.#fd;
  }

  readSync(buf: Uint8Array, position: number): number {
    const slot = this.#slot(2);
    let got = 0;
    for (;;) {
      const [lo, hi] = this.#window(slot, buf, position, got);
      const n = this.#pread(slot, hi - lo, lo);
      const [more, done] = this.#copyOut(slot, n, lo, hi, buf, position, got);
      if (done) return more;
      got = more;
    }
  }

  batched(): boolean {
    return this.#fd >= 0 && this.#ring.get() !== null;
  }

  readMany: BatchReads["readMany"] = (into, length, positions, count, results) => {
    const batches = this.#fd >= 0 ? this.#ring.get() : null; // none opened once closed
    if (batches === null) return false;
    for (let i = 0; i < count; i++) this.#touch(positions[i], length);
    batches.read(this.#for(false), into, length, positions, count, results);
    return true;
  };

  readView(position: number, length: number): Uint8Array {
    const slot = this.#slot(2);
    const lo = down(position);
    const hi = up(position + Math.min(length, DIRECT_VIEW));
    const n = this.#pread(slot, hi - lo, lo);
    const skip = position - lo;
    return slot.subarray(skip, Math.max(skip, Math.min(n, skip + length)));
  }

  async read(buf: Uint8Array, position: number): Promise<number> {
    await this.#settle(position, position + buf.length);
    const slot = this.#slot(3);
    let got = 0;
    for (;;) {
      const [lo, hi] = this.#window(slot, buf, position, got);
      let n = this.direct
        ? Number(await this.#c.pread_async(this.#fd, slot, BigInt(hi - lo), BigInt(lo)))
        : -1;
      if (n < 0) n = this.#pread(slot, hi - lo, lo); // errno is readable only on this thread
      else this.#touch(lo, hi - lo);
      const [more, done] = this.#copyOut(slot, n, lo, hi, buf, position, got);
      if (done) return more;
      got = more;
    }
  }

  /** The aligned range `[lo, hi)` to read next into `slot`, `got` bytes of `buf` read. */
  #window(slot: Uint8Array, buf: Uint8Array, position: number, got: number): [number, number] {
    const lo = down(position + got);
    return [lo, Math.min(lo + slot.length, up(position + buf.length))];
  }

  /**
   * Copies what `n` bytes read at `lo` hold of `buf`'s range; returns the bytes of
   * `buf` read so far, and true when the read is complete (all of it, or the file ended).
   */
  #copyOut(
    slot: Uint8Array,
    n: number,
    lo: number,
    hi: number,
    buf: Uint8Array,
    position: number,
    got: number,
  ): [number, boolean] {
    const at = position + got;
    const useful = Math.min(n - (at - lo), buf.length - got);
    if (useful <= 0) return [got, true]; // the end of the file (or nothing asked)
    buf.set(slot.subarray(at - lo, at - lo + useful), got);
    got += useful;
    return [got, got === buf.length || n < hi - lo];
  }

  #pread(into: Uint8Array, length: number, at: number): number {
    this.#touch(at, length);
    for (;;) {
      const n = Number(this.#c.pread(this.#for(false), into, BigInt(length), BigInt(at)));
      if (n >= 0) return n;
      const e = this.#errno();
      if (e === EINTR) continue;
      if (e === EINVAL && this.direct) {
        this.direct = false;
        continue;
      }
      throw new DiskstreamError(`cannot read ${this.path} at byte ${at}: ${errnoMessage(e)}`);
    }
  }

  /** A synchronous pwrite of all of `bytes` at `at`, through the page cache if `buffered`. */
  #pwriteSync(bytes: Uint8Array, at: number, buffered: boolean): void {
    for (let done = 0; done < bytes.length;) {
      const rest = bytes.subarray(done);
      const fd = this.#for(buffered);
      const n = Number(this.#c.pwrite(fd, rest, BigInt(rest.length), BigInt(at + done)));
      if (n > 0) {
        done += n;
        continue;
      }
      const e = n < 0 ? this.#errno() : 0;
      if (e === EINTR) continue;
      if (e === EINVAL && fd === this.#fd) {
        this.direct = false;
        continue;
      }
      throw new DiskstreamError(
        `cannot write to ${this.path} at byte ${at + done}: ${
          e ? errnoMessage(e) : "nothing was written"
        }`,
      );
    }
  }

  /** spliceTo's pipes `[read end, write end]`, made on first use; null once refused. */
  #pipes: [number, number][] | null | undefined;
  /** Bytes each of those pipes holds. */
  #pipeBytes = 0;

  async spliceTo(
    out: number,
    position: number,
    length: number,
    moved: (n: number) => void,
    outError: (errno: number) => never,
  ): Promise<boolean> {
    if (!this.direct || position % DIRECT_ALIGN !== 0 || length % DIRECT_ALIGN !== 0) return false;
    const pipes = this.#pipes === undefined ? this.#openPipes() : this.#pipes;
    if (pipes === null || length === 0) return pipes !== null;
    const slice = this.#pipeBytes;
    const count = Math.ceil(length / slice);
    const sizeOf = (k: number) => Math.min(slice, length - k * slice);
    // The first slice synchronously: a refusal (this device's alignment, a file system
    // without direct splices) is seen here, with nothing moved yet.
    const first = this.#fillSync(pipes[0][1], position, sizeOf(0), 0);
    if (first < 0) {
      if (!REFUSED_ERRNOS.has(-first)) this.#readFailed(-first, position);
      this.#closePipes();
      this.#pipes = null;
      return false;
    }
    this.#touch(position, length);
    const filling = new Map<number, Promise<number>>([[0, Promise.resolve(first)]]);
    const start = (k: number) => {
      if (k >= count) return;
      const p = this.#fill(pipes[k % pipes.length][1], position + k * slice, sizeOf(k));
      p.catch(() => {}); // awaited in turn
      filling.set(k, p);
    };
    for (let k = 1; k < pipes.length; k++) start(k);
    try {
      for (let k = 0; k < count; k++) {
        const n = await filling.get(k)!;
        filling.delete(k);
        this.#drain(pipes[k % pipes.length][0], out, n, moved, outError);
        if (n < sizeOf(k)) return true; // the end of the file
        start(k + pipes.length);
      }
      return true;
    } catch (err) {
      // Pipes still being filled, or holding bytes: not to be used again.
      await Promise.allSettled(filling.values());
      this.#closePipes();
      this.#pipes = null;
      throw err;
    }
  }

  /** SPLICE_PIPES pipes of PIPE_BYTES (or whatever size the kernel grants), or null. */
  #openPipes(): [number, number][] | null {
    const pipes: [number, number][] = [];
    const ends = new Int32Array(2);
    for (let k = 0; k < SPLICE_PIPES; k++) {
      if (this.#c.pipe2(new Uint8Array(ends.buffer), O_CLOEXEC) < 0) break;
      pipes.push([ends[0], ends[1]]);
      this.#c.fcntl(ends[1], F_SETPIPE_SZ, PIPE_BYTES); // optional: fails quietly
    }
    this.#pipes = pipes;
    // Every pipe must hold a whole slice, a multiple of the alignment.
    const least = Math.min(...pipes.map(([, w]) => this.#c.fcntl(w, F_GETPIPE_SZ, 0)));
    this.#pipeBytes = least - (least % DIRECT_ALIGN);
    if (pipes.length < 2 || this.#pipeBytes <= 0) {
      this.#closePipes();
      this.#pipes = null;
    }
    return this.#pipes;
  }

  #closePipes(): void {
    for (const [r, w] of this.#pipes ?? []) {
      this.#c.close(r);
      this.#c.close(w);
    }
  }

  /**
   * Splices `n` bytes at `at` of the O_DIRECT descriptor into the pipe end `w` on this
   * thread; returns the bytes in the pipe (fewer at the end of the file), or `-errno`
   * when the first splice fails (`done` bytes were already there).
   */
  #fillSync(w: number, at: number, n: number, done: number): number {
    const offset = new BigInt64Array(1);
    while (done < n) {
      offset[0] = BigInt(at + done);
      const r = Number(
        this.#c.splice(this.#fd, new Uint8Array(offset.buffer), w, null, BigInt(n - done), 0),
      );
      if (r === 0) break;
      if (r > 0) {
        done += r;
        continue;
      }
      const e = this.#errno();
      if (e !== EINTR) return -e;
    }
    return done;
  }

  /** {@link Direct.#fillSync} on one of Deno's blocking threads (errors read here). */
  async #fill(w: number, at: number, n: number): Promise<number> {
    const offset = new BigInt64Array(1);
    let done = 0;
    while (done < n) {
      offset[0] = BigInt(at + done);
      const r = Number(
        await this.#c.splice_async(
          this.#fd,
          new Uint8Array(offset.buffer),
          w,
          null,
          BigInt(n - done),
          0,
        ),
      );
      if (r === 0) return done;
      if (r > 0) {
        done += r;
        continue;
      }
      // errno belongs to the other thread: the same splice again here, to read it.
      const got = this.#fillSync(w, at, n, done);
      if (got >= 0) return got;
      this.#readFailed(-got, at + done);
    }
    return done;
  }

  #readFailed(e: number, at: number): never {
    throw new DiskstreamError(`cannot read ${this.path} at byte ${at}: ${errnoMessage(e)}`);
  }

  /** Moves the `n` bytes pipe end `r` holds into `out`. */
  #drain(
    r: number,
    out: number,
    n: number,
    moved: (n: number) => void,
    outError: (errno: number) => never,
  ): void {
    for (let left = n; left > 0;) {
      const k = Number(
        this.#c.splice(r, null, out, null, BigInt(left), SPLICE_F_MOVE | SPLICE_F_MORE),
      );
      if (k > 0) {
        left -= k;
        moved(k);
        continue;
      }
      if (k === 0) {
        throw new DiskstreamError(`cannot move the bytes read from ${this.path}: none left`);
      }
      const e = this.#errno();
      if (e !== EINTR) outError(e);
    }
  }

  async write(bytes: Uint8Array, position: number): Promise<void> {
    if (this.#failed) throw this.#failed;
    this.#touch(position, bytes.length);
    const end = position + bytes.length;
    // A write still running on another thread that covers some of these bytes must
    // land first: otherwise its older bytes could overwrite these.
    await this.#settle(position, end);
    if (this.#failed) throw this.#failed;
    // The unaligned head and tail, through the page cache.
    const a = Math.min(up(position), end);
    const b = Math.max(down(end), a);
    if (a > position) this.#pwriteSync(bytes.subarray(0, a - position), position, true);
    if (b < end) this.#pwriteSync(bytes.subarray(b - position), b, true);
    // The aligned middle, staged and written on another thread, chunk by chunk.
    for (let at = a; at < b;) {
      const n = Math.min(DIRECT_CHUNK, b - at);
      const k = this.#next;
      this.#next = 1 - k;
      await this.#running[k];
      if (this.#failed) throw this.#failed;
      const slot = this.#slot(k);
      slot.set(bytes.subarray(at - position, at - position + n));
      this.#ranges[k] = [at, at + n];
      this.#running[k] = this.#pwriteAsync(slot.subarray(0, n), at);
      at += n;
    }
  }

  /** Waits for the running writes that cover some of the bytes `[from, to)`. */
  async #settle(from: number, to: number): Promise<void> {
    for (let k = 0; k < 2; k++) {
      const [a, b] = this.#ranges[k];
      if (this.#running[k] && a < to && from < b) await this.#running[k];
    }
  }

  async #pwriteAsync(bytes: Uint8Array, at: number): Promise<void> {
    try {
      let done = 0;
      if (this.direct) {
        const n = Number(
          await this.#c.pwrite_async(this.#fd, bytes, BigInt(bytes.length), BigInt(at)),
        );
        if (n > 0) done = n;
      }
      // Short, failed or buffered: finish here, where errno can be read.
      if (done < bytes.length) this.#pwriteSync(bytes.subarray(done), at + done, false);
    } catch (err) {
      this.#failed ??= err as Error;
    }
  }

  async drain(): Promise<void> {
    await Promise.all(this.#running);
    this.#running = [null, null];
    if (this.#failed) throw this.#failed;
  }

  async sync(): Promise<void> {
    await this.drain();
    while (this.#c.fdatasync(this.#plain) < 0) {
      const e = this.#errno();
      if (e !== EINTR) {
        throw new DiskstreamError(
          `cannot sync ${this.path} to its device (fdatasync): ${errnoMessage(e)}`,
        );
      }
    }
  }

  close(): void {
    if (this.#fd < 0) return;
    const [c, fd, plain, lo, hi] = [this.#c, this.#fd, this.#plain, this.#lo, this.#hi];
    this.#fd = this.#plain = -1;
    const end = () => {
      // What was cached before (another reader's) or went through the page cache (the
      // unaligned pieces) leaves it too, as with the page-cache path.
      if (hi > lo) c.posix_fadvise(plain, BigInt(lo), BigInt(hi - lo), POSIX_FADV_DONTNEED);
      c.close(fd);
      c.close(plain);
      this.#closePipes();
      this.#ring.close();
    };
    // A write still queued for another thread must not meet a closed (or reused) number.
    if (this.#running.every((r) => r === null)) end();
    else Promise.allSettled(this.#running).then(end);
  }
}
