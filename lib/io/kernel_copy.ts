/**
 * Kernel-side copies for the export's data clusters, reached through FFI (Deno has no
 * splice or copy_file_range of its own): `splice(2)` moves page-cache pages of the
 * source into an output pipe without copying them through JavaScript,
 * `copy_file_range(2)` copies into an output file inside the kernel, `sendfile(2)`
 * into a socket (XAPI hands the HTTP connection over as stdout). Whatever the kernel
 * refuses (a device source into a file, another filesystem, ...) falls back to
 * `pread`/`write` with one buffer. Optional: {@link openKernelCopy} returns null
 * without `--allow-ffi` or off Linux, and callers use the stream instead.
 *
 * Calls are synchronous (errno is per thread, so it must be read on the calling
 * thread): each moves at most {@link COPY_STEP} bytes, so the event loop runs between
 * them, but a slow reader of the output pipe holds the thread inside a call.
 *
 * With `direct` (`--direct`), the source is read with O_DIRECT, and an output file or
 * device opened here is written with O_DIRECT too (direct_io.ts: aligned staging
 * buffers, written on another thread while the next piece is read): neither the disk
 * nor the image passes through the page cache. Where the output refuses O_DIRECT
 * (tmpfs before Linux 6.6, ramfs), it is written as usual and the caller drops it
 * behind (page_cache.ts).
 *
 * @module
 */
import { BrokenPipeError, DiskstreamError, SourceChangedError } from "../errors.ts";
import {
  EINTR,
  EINVAL,
  F_GETFL,
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  GETSOCKOPT,
  isSocket,
  loadLibc,
  O_CLOEXEC,
  O_NONBLOCK,
  O_WRONLY,
  PIPE_BYTES,
  readErrno,
  REFUSED_ERRNOS,
  SPLICE_F_MORE,
  SPLICE_F_MOVE,
  WRITE_SIDE_ERRNOS,
} from "./libc.ts";
import { errnoMessage } from "./errno.ts";
import { DIRECT_ALIGN, DIRECT_VIEW, type DirectFile, openDirectFile } from "./direct_io.ts";

/** Bytes moved per call. */
export const COPY_STEP = 8 * 1024 * 1024;
/**
 * Bytes moved per call when a direct source is spliced into a pipe or socket: long
 * calls keep the device's reads queued (a cold 2 GiB loop device exported with a hint:
 * 1.70–1.73 s in 8 MiB calls, 1.25–1.42 s in 64 MiB calls).
 */
export const DIRECT_SPLICE_STEP = 64 * 1024 * 1024;
const O_CREAT = 0o100;
const O_TRUNC = 0o1000;
const EPIPE = 32;
const SYNC_FILE_RANGE_WRITE = 2;
/** Bytes written to an output file after which their writeback is started. */
const WRITEBACK_STRIDE = 16 * 1024 * 1024;
/** errno values after which a plain pread/write copy is tried instead. */
const UNSUPPORTED = REFUSED_ERRNOS;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  splice: { parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"], result: "isize" },
  sendfile: { parameters: ["i32", "i32", "buffer", "usize"], result: "isize" },
  copy_file_range: {
    parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"],
    result: "isize",
  },
  fdatasync: { parameters: ["i32"], result: "i32" },
  sync_file_range: { parameters: ["i32", "i64", "i64", "u32"], result: "i32" },
  getsockopt: GETSOCKOPT,
  __errno_location: { parameters: [], result: "pointer" },
} as const;

const encoder = new TextEncoder();

/** How data reaches the output ("direct": read with O_DIRECT, then written). */
type Method = "splice" | "copy_file_range" | "sendfile" | "bounce" | "direct";

/** What to try after `method` is refused by the kernel for these descriptors. */
const NEXT: Record<Method, Method | null> = {
  splice: "bounce",
  copy_file_range: "sendfile", // e.g. a socket, a device source, another filesystem
  sendfile: "bounce",
  bounce: null,
  direct: null,
};

/** An output descriptor and the source descriptor the data is copied from. */
export interface KernelCopy {
  /**
   * Writes all of `bytes` to the output (`bytes` may be reused once this returns). A
   * promise when the output is written with O_DIRECT: await it before the next call.
   */
  write(bytes: Uint8Array): void | Promise<void>;
  /**
   * Copies `length` source bytes at `offset` to the output (in the kernel when
   * possible). A promise when the output is written with O_DIRECT, as for `write`.
   */
  copy(offset: number, length: number): void | Promise<void>;
  /**
   * Waits for the writes still running (O_DIRECT output; throws their error) and with
   * `sync` makes what was written durable (`fdatasync`) when the output is a file or
   * a device; a pipe or socket has nothing to sync.
   */
  finish(sync: boolean): Promise<void>;
  /** Closes what was opened here (an inherited output descriptor stays open). */
  close(): void;
  /**
   * The bytes to hand to one {@link KernelCopy.copy}: {@link COPY_STEP}, or
   * {@link DIRECT_SPLICE_STEP} when a direct source is spliced (its reads run several
   * at once within a call, and a call's end leaves none running).
   */
  readonly step: number;
  /** True when the source is read with O_DIRECT (`direct`), past the page cache. */
  readonly readsDirect: boolean;
  /** True when the output is written with O_DIRECT (`direct`), past the page cache. */
  readonly writesDirect: boolean;
}

/**
 * Opens `source` for kernel copies into `output` (a path, created or truncated, or an
 * inherited descriptor), or returns null when FFI is unavailable or the output is a
 * non-blocking descriptor. `name` names the output in messages. `writeback`: an
 * output file opened here gets its writeback started every 16 MiB
 * (`sync_file_range`), so that a final {@link KernelCopy.finish} has little left.
 * `direct`: the source is read with O_DIRECT into an aligned buffer and written from
 * there (no kernel copy: those would go through the page cache), unless O_DIRECT is
 * refused for it (ramfs); an output path is written with O_DIRECT too, where its file
 * system takes it.
 */
export function openKernelCopy(
  source: string,
  output: { path: string } | { fd: number },
  name: string,
  writeback = false,
  direct = false,
): KernelCopy | null {
  const c = loadLibc(SYMBOLS);
  if (c === null) return null;
  const errno = () => readErrno(c.__errno_location);
  /** Throws for the errno of a failed call, naming the side it belongs to. */
  const fail = (e: number, what: string): never => {
    if (e === EPIPE) throw new BrokenPipeError(`${name}: the reader closed the pipe`);
    throw new DiskstreamError(`${what}: ${errnoMessage(e)}`);
  };
  let outFd: number;
  let ownOut = false;
  if ("fd" in output) {
    outFd = output.fd;
    const flags = c.fcntl(outFd, F_GETFL, 0);
    if (flags < 0 || (flags & O_NONBLOCK) !== 0) return null;
  } else {
    outFd = c.open(
      encoder.encode(output.path + "\0"),
      O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
      0o666,
    );
    if (outFd < 0) return null; // let the ordinary path report it
    ownOut = true;
  }
  const inFd = c.open(encoder.encode(source + "\0"), O_CLOEXEC, 0);
  if (inFd < 0) {
    if (ownOut) c.close(outFd);
    return null;
  }
  let method: Method = "copy_file_range";
  const outIsPipe = c.fcntl(outFd, F_GETPIPE_SZ, 0) > 0;
  if (outIsPipe) {
    method = "splice";
    c.fcntl(outFd, F_SETPIPE_SZ, PIPE_BYTES); // a larger pipe: fewer wake-ups; optional
  }
  const directIn: DirectFile | null = direct ? openDirectFile(source, false) : null;
  if (directIn) method = "direct";
  // The output file, created or truncated above, written with O_DIRECT at the same offsets.
  const directOut: DirectFile | null = direct && ownOut && "path" in output
    ? openDirectFile(output.path, true)
    : null;
  if (directOut && method !== "direct") method = "bounce"; // no kernel copy into the page cache
  const offset = new BigInt64Array(1);
  const offsetBytes = new Uint8Array(offset.buffer);
  let bounce: Uint8Array | null = null;

  // Bytes written to an output opened here, and up to where writeback was started.
  let outPos = 0;
  let writebackFrom = 0;
  const moved = (n: number) => {
    outPos += n;
    if (writeback && ownOut && outPos - writebackFrom >= WRITEBACK_STRIDE) {
      c.sync_file_range(
        outFd,
        BigInt(writebackFrom),
        BigInt(outPos - writebackFrom),
        SYNC_FILE_RANGE_WRITE,
      );
      writebackFrom = outPos;
    }
  };

  const writeAll = (bytes: Uint8Array): void | Promise<void> => {
    if (directOut) {
      const at = outPos;
      outPos += bytes.length; // no writeback strides: direct writes leave nothing dirty
      return directOut.write(bytes, at);
    }
    for (let done = 0; done < bytes.length;) {
      const n = Number(c.write(outFd, bytes.subarray(done), BigInt(bytes.length - done)));
      if (n < 0) {
        const e = errno();
        if (e === EINTR) continue;
        fail(e, `cannot write to ${name}`);
      }
      done += n;
      moved(n);
    }
  };

  /** A direct output's write of the last step, awaited before the next step. */
  let writing: void | Promise<void>;
  const shrank = (at: number) =>
    new SourceChangedError(`${source} ended at byte ${at}: the source shrank during the export`);

  /** One call: moves up to `length` bytes at `at`; 0 = the source ended. */
  const step = (at: number, length: number): number => {
    offset[0] = BigInt(at);
    if (method === "splice") {
      return Number(
        c.splice(inFd, offsetBytes, outFd, null, BigInt(length), SPLICE_F_MOVE | SPLICE_F_MORE),
      );
    }
    if (method === "copy_file_range") {
      return Number(c.copy_file_range(inFd, offsetBytes, outFd, null, BigInt(length), 0));
    }
    if (method === "sendfile") {
      return Number(c.sendfile(outFd, inFd, offsetBytes, BigInt(length)));
    }
    if (method === "direct") {
      const data = directIn!.readView(at, Math.min(length, DIRECT_VIEW));
      writing = writeAll(data);
      return data.length;
    }
    bounce ??= new Uint8Array(COPY_STEP);
    const n = Number(c.pread(inFd, bounce, BigInt(Math.min(length, bounce.length)), BigInt(at)));
    if (n > 0) writing = writeAll(bounce.subarray(0, n));
    return n;
  };

  /** One step with its retries: moves 1 to `length` bytes at `at` and says how many. */
  const advance = (at: number, length: number): number => {
    for (;;) {
      const n = step(at, Math.min(COPY_STEP, length));
      if (n > 0) {
        if (method !== "bounce" && method !== "direct") moved(n); // those counted their writes
        return n;
      }
      if (n === 0) {
        throw shrank(at);
      }
      const e = errno();
      if (e === EINTR) continue;
      const next = NEXT[method];
      if (next !== null && UNSUPPORTED.has(e)) {
        method = next;
        continue;
      }
      fail(
        e,
        method === "bounce"
          ? `cannot read ${source} at byte ${at}`
          : WRITE_SIDE_ERRNOS.has(e)
          ? `cannot write to ${name} (copying ${source} from byte ${at} with ${method})`
          : `cannot copy (${method}) from ${source} at byte ${at} to ${name}`,
      );
    }
  };

  const copySync = (at: number, length: number) => {
    for (let done = 0; done < length;) done += advance(at + done, length - done);
  };

  /**
   * A direct source into a pipe or socket: spliced from the O_DIRECT descriptor (the
   * kernel reads into pages it hands to the output, several reads at once: no copy
   * through memory), else read and written ({@link copySync}).
   */
  const spliceOut = directIn && !directOut && (outIsPipe || isSocket(c.getsockopt, outFd));
  const copySpliced = async (at: number, length: number) => {
    // The aligned part spliced, an unaligned tail (the end of the disk) read and written.
    const aligned = at % DIRECT_ALIGN === 0 ? length - (length % DIRECT_ALIGN) : 0;
    let done = 0;
    const spliced = aligned > 0 &&
      await directIn!.spliceTo(outFd, at, aligned, (n) => {
        done += n;
        moved(n);
      }, (e) => fail(e, `cannot write to ${name}`));
    if (!spliced) return copySync(at, length);
    if (done < aligned) throw shrank(at + done);
    if (aligned < length) copySync(at + aligned, length - aligned);
  };

  /**
   * {@link copySync} into a direct output: each step's bytes (in a buffer the next step
   * reuses) are taken by the output before the next step reads.
   */
  const copyDirect = async (at: number, length: number) => {
    for (let done = 0; done < length;) {
      done += advance(at + done, length - done);
      await writing;
    }
  };

  return {
    write: writeAll,
    copy: directOut ? copyDirect : spliceOut ? copySpliced : copySync,
    async finish(sync) {
      if (directOut) {
        await (sync ? directOut.sync() : directOut.drain());
        return;
      }
      while (sync && c.fdatasync(outFd) < 0) {
        const e = errno();
        if (e === EINVAL) return; // a pipe or a socket
        if (e !== EINTR) fail(e, `cannot sync ${name} to its device (fdatasync)`);
      }
    },
    close() {
      c.close(inFd);
      directIn?.close();
      directOut?.close();
      if (ownOut) c.close(outFd);
    },
    step: spliceOut ? DIRECT_SPLICE_STEP : COPY_STEP,
    readsDirect: directIn !== null,
    writesDirect: directOut !== null,
  };
}
