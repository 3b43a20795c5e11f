/**
 * libc through FFI, for the few system calls Deno has no API for (`lseek` with
 * SEEK_DATA/SEEK_HOLE, `splice`, `copy_file_range`, ...). Always optional: without
 * `--allow-ffi`, off Linux or without libc.so.6 the loader gives null and callers
 * take their portable path.
 *
 * @module
 */

const loaded = new Map<Deno.ForeignLibraryInterface, unknown>();

/**
 * The `symbols` of libc.so.6, loaded once per symbol table; null when FFI is not
 * permitted, not on Linux, or the library cannot be opened.
 */
export function loadLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
): Deno.DynamicLibrary<S>["symbols"] | null {
  if (loaded.has(symbols)) return loaded.get(symbols) as Deno.DynamicLibrary<S>["symbols"] | null;
  let lib: Deno.DynamicLibrary<S>["symbols"] | null = null;
  try {
    if (
      Deno.build.os === "linux" && Deno.permissions.querySync({ name: "ffi" }).state === "granted"
    ) {
      lib = Deno.dlopen("libc.so.6", symbols).symbols;
    }
  } catch {
    lib = null;
  }
  loaded.set(symbols, lib);
  return lib;
}

/**
 * errno of the last failed call on this thread, through libc's `__errno_location`
 * (so only meaningful right after a synchronous FFI call).
 */
export function readErrno(errnoLocation: () => Deno.PointerValue): number {
  const p = errnoLocation();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32();
}

// Linux values of the flags and errno codes used through FFI (the same on x86-64 and arm64).
/** open(2): read only. */
export const O_RDONLY = 0;
/** open(2): write only. */
export const O_WRONLY = 0o1;
/** open(2): read and write. */
export const O_RDWR = 0o2;
/** open(2): non-blocking. */
export const O_NONBLOCK = 0o4000;
/** open(2): close on exec. */
export const O_CLOEXEC = 0o2000000;
/** fcntl(2): get the file status flags. */
export const F_GETFL = 3;
/** fcntl(2): set a pipe's buffer size. */
export const F_SETPIPE_SZ = 1031;
/** fcntl(2): get a pipe's buffer size (fails when not a pipe). */
export const F_GETPIPE_SZ = 1032;
/** splice(2) flags: move pages rather than copy (a hint), more data comes. */
export const SPLICE_F_MOVE = 1;
/** See {@link SPLICE_F_MOVE}. */
export const SPLICE_F_MORE = 4;
/** errno: interrupted, call again. */
export const EINTR = 4;
/** errno: invalid argument (also: a direct transfer this file or device does not take). */
export const EINVAL = 22;
/** posix_fadvise(2): drop these pages from the cache. */
export const POSIX_FADV_DONTNEED = 4;
/** Size asked for a pipe's kernel buffer (the default unprivileged maximum). */
export const PIPE_BYTES = 1024 * 1024;
/**
 * errno values by which the kernel refuses a call for these descriptors (EPERM EBADF
 * EXDEV EINVAL ENOSYS EOPNOTSUPP): callers take their portable path instead.
 */
export const REFUSED_ERRNOS: ReadonlySet<number> = new Set([1, 9, 18, 22, 38, 95]);

/**
 * errno values that a copy gets from its destination, never its source: the disk is
 * full (ENOSPC, EDQUOT), the file too large (EFBIG), read-only (EROFS), the reader
 * gone (EPIPE).
 */
export const WRITE_SIDE_ERRNOS: ReadonlySet<number> = new Set([28, 122, 27, 30, 32]);

/** getsockopt(2) as declared through FFI: `(fd, level, name, value, length)`. */
export type Getsockopt = (
  fd: number,
  level: number,
  name: number,
  value: Uint8Array,
  length: Uint8Array,
) => number;

/** The FFI declaration of getsockopt(2) for {@link isSocket}. */
export const GETSOCKOPT = {
  parameters: ["i32", "i32", "i32", "buffer", "buffer"],
  result: "i32",
} as const;

/** True when `fd` is a socket (its SO_TYPE can be read). */
export function isSocket(getsockopt: Getsockopt, fd: number): boolean {
  const SOL_SOCKET = 1;
  const SO_TYPE = 3;
  return getsockopt(fd, SOL_SOCKET, SO_TYPE, new Uint8Array(4), new Uint8Array([4, 0, 0, 0])) ===
    0;
}
