/**
 * An import's input when it is a pipe (or a socket) and FFI is permitted: blocking
 * `read(2)` into the caller's buffers once `poll(2)` says bytes are there (waiting on
 * another thread otherwise, so signals are handled), and `splice(2)` to move the
 * image's data from a pipe into the destination file inside the kernel (no copy
 * through JavaScript). Optional: {@link openPipeInput} returns null without
 * `--allow-ffi`, off Linux, or when the descriptor is not a blocking pipe or socket,
 * and the import reads a ReadableStream instead.
 *
 * @module
 */
import { DiskstreamError } from "../errors.ts";
import * as libc from "./libc.ts";
import { errnoMessage } from "./errno.ts";

const SYNC_FILE_RANGE_WRITE = 2;
const POLLIN = 1;
/** Bytes asked per splice call. */
const SPLICE_STEP = 16 * 1024 * 1024;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  splice: { parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"], result: "isize" },
  sync_file_range: { parameters: ["i32", "i64", "i64", "u32"], result: "i32" },
  getsockopt: libc.GETSOCKOPT,
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
  poll_waiting: {
    name: "poll",
    parameters: ["buffer", "u64", "i32"],
    result: "i32",
    nonblocking: true,
  },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

const encoder = new TextEncoder();

/** A pipe read through its descriptor; see the module comment. */
export interface PipeInput {
  /** A name for messages: "stdin" or "fd 5". */
  readonly name: string;
  /** Reads up to `buf.length` bytes (blocking); 0 at the end. */
  read(buf: Uint8Array): number;
  /**
   * True when a read or splice would not block: bytes are waiting, or the writer is
   * gone. Waits up to `ms` milliseconds for that, blocking this thread (default 0).
   */
  ready(ms?: number): boolean;
  /**
   * Waits up to `ms` milliseconds for {@link PipeInput.ready} on another thread, so
   * that timers and signal listeners run meanwhile.
   */
  wait(ms: number): Promise<void>;
  /**
   * Opens `path` (already created and sized) for {@link PipeInput.splice}; null when
   * it cannot be opened this way (the ordinary writes still work).
   */
  openDestination(path: string): number | null;
  /**
   * Moves up to `length` bytes of the pipe to `destFd` at `offset`; returns how many
   * (0 at the end of the input), or -1 when the kernel refuses splice for these
   * descriptors (nothing was moved: read the bytes instead). `dest` names the
   * destination in messages.
   */
  splice(destFd: number, offset: number, length: number, dest: string): number;
  /**
   * Starts writing back `[offset, offset + length)` of `destFd` to the device
   * (`sync_file_range` with SYNC_FILE_RANGE_WRITE, not waiting for it), so that the
   * final fdatasync has less left to do. Best effort.
   */
  startWriteback(destFd: number, offset: number, length: number): void;
  /** Closes a descriptor opened by {@link PipeInput.openDestination}. */
  closeDestination(fd: number): void;
  /** Closes the pipe if it was opened by path. */
  close(): void;
}

/** The destination side of {@link PipeInput.splice}, shared by every input that moves data in the kernel. */
export type DestinationOps = Pick<
  PipeInput,
  "openDestination" | "startWriteback" | "closeDestination"
>;

/** {@link DestinationOps} through libc, or null without FFI. */
export function destinationOps(): DestinationOps | null {
  const c = libc.loadLibc(SYMBOLS);
  if (c === null) return null;
  return {
    openDestination(path) {
      const out = c.open(encoder.encode(path + "\0"), libc.O_WRONLY | libc.O_CLOEXEC, 0);
      return out < 0 ? null : out;
    },
    startWriteback(out, at, length) {
      c.sync_file_range(out, BigInt(at), BigInt(length), SYNC_FILE_RANGE_WRITE);
    },
    closeDestination(out) {
      c.close(out);
    },
  };
}

/**
 * The result of a failed kernel move of data (`splice`, `copy_file_range`) with errno
 * `e`: -1 when the kernel refuses it for these descriptors (read the bytes instead),
 * else the error naming `input`, `dest` and the guest offset `at`.
 */
export function moveFailure(e: number, input: string, dest: string, at: number): -1 {
  if (libc.REFUSED_ERRNOS.has(e)) return -1;
  throw new DiskstreamError(
    (libc.WRITE_SIDE_ERRNOS.has(e)
      ? `cannot write to ${dest} at byte ${at} (moving data from ${input})`
      : `cannot move data from ${input} to ${dest} at byte ${at}`) +
      `: ${errnoMessage(e)}`,
  );
}

/**
 * The pipe or socket at descriptor `fd` (0 = stdin; left open) or at `path` (a named
 * pipe, opened here), or null when FFI is unavailable or it is not a blocking pipe or
 * socket.
 * Enlarges the pipe's buffer when allowed (fewer wake-ups).
 */
export function openPipeInput(
  source: { fd: number } | { path: string },
  name: string,
): PipeInput | null {
  const c = libc.loadLibc(SYMBOLS);
  if (c === null) return null;
  const own = "path" in source;
  const fd = own
    ? c.open(encoder.encode(source.path + "\0"), libc.O_RDONLY | libc.O_CLOEXEC, 0)
    : source.fd;
  if (fd < 0) return null; // the ordinary path reports it
  const flags = c.fcntl(fd, libc.F_GETFL, 0);
  const isPipe = c.fcntl(fd, libc.F_GETPIPE_SZ, 0) > 0;
  // A socket (XAPI hands over its HTTP connection as stdin) is read the same way, so
  // that a signal is handled while it is silent; splice refuses it (data is read).
  const isSocket = !isPipe && libc.isSocket(c.getsockopt, fd);
  if (flags < 0 || (flags & libc.O_NONBLOCK) !== 0 || !(isPipe || isSocket)) {
    if (own) c.close(fd);
    return null; // not a blocking pipe or socket
  }
  // A larger pipe: fewer wake-ups (optional: fails quietly when not allowed).
  if (isPipe) c.fcntl(fd, libc.F_SETPIPE_SZ, libc.PIPE_BYTES);
  const errno = () => libc.readErrno(c.__errno_location);
  const offset = new BigInt64Array(1);
  const offsetBytes = new Uint8Array(offset.buffer);
  // struct pollfd { int fd; short events; short revents; }, asking for POLLIN.
  const pollFd = new Uint8Array(8);
  new DataView(pollFd.buffer).setInt32(0, fd, true);
  new DataView(pollFd.buffer).setInt16(4, POLLIN, true);
  const waitFd = pollFd.slice();
  const fail = (what: string): never => {
    throw new DiskstreamError(`cannot ${what} ${name}: ${errnoMessage(errno())}`);
  };
  return {
    ...destinationOps()!,
    name,
    read(buf) {
      for (;;) {
        const n = Number(c.read(fd, buf, BigInt(buf.length)));
        if (n >= 0) return n;
        if (errno() !== libc.EINTR) fail("read");
      }
    },
    ready(ms = 0) {
      const r = c.poll(pollFd, 1n, ms); // 1: readable or hung up
      // -1: interrupted by a signal (not ready: its listener must run), else let the
      // read report the error.
      return r > 0 || (r < 0 && errno() !== libc.EINTR);
    },
    async wait(ms) {
      await c.poll_waiting(waitFd, 1n, ms);
    },
    splice(destFd, at, length, dest) {
      for (;;) {
        offset[0] = BigInt(at);
        const n = Number(
          c.splice(
            fd,
            null,
            destFd,
            offsetBytes,
            BigInt(Math.min(length, SPLICE_STEP)),
            libc.SPLICE_F_MOVE | libc.SPLICE_F_MORE,
          ),
        );
        if (n >= 0) return n;
        const e = errno();
        if (e !== libc.EINTR) return moveFailure(e, name, dest, at);
      }
    },
    close() {
      if (own) c.close(fd);
    },
  };
}
