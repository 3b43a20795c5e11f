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
