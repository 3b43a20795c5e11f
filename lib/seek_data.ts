/**
 * Data extents of a regular file through `lseek(SEEK_DATA/SEEK_HOLE)`, reached via FFI
 * (Deno has no lseek of its own). Optional: returns null when FFI is not permitted or
 * not available, and callers fall back to reading everything. (Stub until built.)
 *
 * @module
 */

/**
 * The `[start, end)` byte ranges of `path` that may hold data, in order, or null when
 * hole detection is unavailable (no --allow-ffi, not Linux, not a regular file).
 */
export function dataExtents(_path: string, _size: number): Iterable<[number, number]> | null {
  return null;
}
