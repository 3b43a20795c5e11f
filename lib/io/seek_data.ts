/**
 * Data extents of a regular file through `lseek(SEEK_DATA/SEEK_HOLE)`, reached via FFI
 * (Deno has no lseek of its own). Optional: returns null when FFI is not permitted or
 * not available, and callers fall back to reading everything.
 *
 * @module
 */

import { loadLibc, O_CLOEXEC, O_RDONLY, readErrno } from "./libc.ts";

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/** libc's symbols, loaded once; null when FFI is not permitted or libc is not there. */
function libc(): Libc | null {
  return loadLibc(SYMBOLS);
}

function errno(c: Libc): number {
  return readErrno(c.__errno_location);
}

/** An open read-only descriptor of `path`, or null. */
function openFd(c: Libc, path: string): number | null {
  const name = new TextEncoder().encode(path + "\0");
  const fd = c.open(name, O_RDONLY | O_CLOEXEC);
  return fd < 0 ? null : fd;
}

/**
 * `lseek(fd, offset, whence)`: the resulting offset, `"end"` for ENXIO (no more data
 * past `offset` with SEEK_DATA), or null for any other failure.
 */
function seek(c: Libc, fd: number, offset: number, whence: number): number | "end" | null {
  const r = Number(c.lseek(fd, BigInt(offset), whence));
  if (r >= 0) return r;
  return errno(c) === ENXIO ? "end" : null;
}

/**
 * The `[start, end)` byte ranges of `path` that may hold data, in order, clipped to
 * `size`, or null when hole detection is unavailable (no --allow-ffi, not Linux, not a
 * regular file, a filesystem without SEEK_DATA). Ranges are as the filesystem reports
 * them, so they are aligned to its block size and may include some zeros. Holes read as
 * zeros, so a caller may skip everything outside the ranges. If seeking fails part-way
 * (the file changed), the rest of the file is reported as data.
 *
 * The descriptor is opened when iteration starts and closed when it ends (or is broken
 * off), so iterate the result promptly.
 *
 * @example Find the data of a sparse file
 * ```ts
 * import { dataExtents } from "./seek_data.ts";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const path = `${dir}/sparse`;
 * const f = await Deno.open(path, { write: true, create: true });
 * await f.truncate(64 << 20);
 * await f.seek(32 << 20, Deno.SeekMode.Start);
 * await f.write(new Uint8Array(4096).fill(1));
 * f.close();
 * const extents = dataExtents(path, 64 << 20);
 * if (extents !== null) { // null without --allow-ffi: then read everything
 *   const list = [...extents];
 *   assert.ok(list.some(([s, e]) => s <= 32 << 20 && e >= (32 << 20) + 4096));
 *   assert.ok(list.every(([s, e]) => e - s < 16 << 20));
 * }
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function dataExtents(path: string, size: number): Iterable<[number, number]> | null {
  const c = libc();
  if (c === null) return null;
  try {
    if (!Deno.statSync(path).isFile) return null;
  } catch {
    return null;
  }
  // Probe once now so that an unsupported filesystem (EINVAL) gives null up front.
  const fd = openFd(c, path);
  if (fd === null) return null;
  const first = seek(c, fd, 0, SEEK_DATA);
  c.close(fd);
  if (first === null) return null;
  return {
    [Symbol.iterator]: () => extents(c, path, size),
  };
}

function* extents(c: Libc, path: string, size: number): Generator<[number, number]> {
  const fd = openFd(c, path);
  if (fd === null) {
    if (size > 0) yield [0, size];
    return;
  }
  try {
    let pos = 0;
    while (pos < size) {
      const start = seek(c, fd, pos, SEEK_DATA);
      if (start === "end") return;
      const end = start === null ? null : seek(c, fd, start, SEEK_HOLE);
      if (start === null || end === null || end === "end" || end <= start) {
        // Something changed under us: report the rest as data, which is always safe.
        yield [pos, size];
        return;
      }
      if (start >= size) return;
      yield [start, Math.min(end, size)];
      pos = end;
    }
  } finally {
    c.close(fd);
  }
}
