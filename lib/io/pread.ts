/**
 * Positional reads through FFI: one `pread(2)` per read, where Deno's file API needs
 * a seek and a read (two system calls, two runtime operations). It matters when reads
 * are many and small — the probes of an export's first pass are one 4 KiB read per
 * cluster, 32 768 for a 2 GiB disk, and a system call costs about as much as copying
 * 64 KiB here.
 *
 * The descriptor is opened again by path, so it is checked to be the very file the
 * caller has open (device and inode, through `fstat`): a path replaced in between is
 * never read. Optional: {@link openPositionalReader} returns null without
 * `--allow-ffi`, off Linux, or when the check fails, and callers seek and read.
 *
 * @module
 */
import { EINTR, loadLibc, O_CLOEXEC, O_RDONLY, readErrno } from "./libc.ts";
import { errnoMessage } from "./errno.ts";
import { BATCH_READS, type BatchReads, lazyReadRing } from "./uring.ts";

/** Bytes of `struct stat` (144 on x86-64, 128 on arm64), with room to spare. */
const STAT_BYTES = 256;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/**
 * Reads at offsets of one open file with single `pread` calls, or many small ones in
 * batches ({@link BatchReads}, io_uring: see uring.ts).
 */
export interface PositionalReader extends BatchReads {
  /**
   * Reads up to `buf.length` bytes at `offset` into `buf`; returns how many were read
   * (fewer only at the end of the file). Throws an `Error` naming errno on failure.
   */
  read(buf: Uint8Array, offset: number): number;
  /** Closes the descriptor; later reads throw. */
  close(): void;
}

/**
 * A positional reader of `path`, which must be the file `file` has open (same device
 * and inode), or null when FFI is unavailable or it is not that file.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openPositionalReader } from "./pread.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/d.raw`, new Uint8Array([1, 2, 3, 4, 5]));
 * using file = await Deno.open(`${dir}/d.raw`);
 * const reader = openPositionalReader(`${dir}/d.raw`, file); // null without --allow-ffi
 * if (reader) {
 *   const buf = new Uint8Array(4);
 *   assert.equal(reader.read(buf, 3), 2); // the file ends after 2 bytes
 *   assert.deepEqual([...buf.subarray(0, 2)], [4, 5]);
 *   reader.close();
 * }
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function openPositionalReader(path: string, file: Deno.FsFile): PositionalReader | null {
  const c = loadLibc(SYMBOLS);
  if (c === null) return null;
  let info: Deno.FileInfo;
  try {
    info = file.statSync();
  } catch {
    return null;
  }
  if (info.ino === null) return null;
  const fd = c.open(new TextEncoder().encode(path + "\0"), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return null;
  // st_dev and st_ino are the first two 64-bit fields on x86-64 and arm64 alike.
  const st = new BigUint64Array(STAT_BYTES / 8);
  if (
    c.fstat(fd, st) !== 0 || Number(st[0]) !== info.dev || Number(st[1]) !== info.ino
  ) {
    c.close(fd);
    return null;
  }
  let open = true;
  const ring = lazyReadRing(BATCH_READS);
  return {
    read(buf, offset) {
      if (!open) throw new Error("read after close");
      for (;;) {
        const n = Number(c.pread(fd, buf, BigInt(buf.length), BigInt(offset)));
        if (n >= 0) return n;
        const e = readErrno(c.__errno_location);
        if (e !== EINTR) throw new Error(`${errnoMessage(e)} at byte ${offset}`);
      }
    },
    batched: () => open && ring.get() !== null,
    readMany(into, length, positions, count, results) {
      if (!open) throw new Error("read after close");
      const batches = ring.get();
      batches?.read(fd, into, length, positions, count, results);
      return batches !== null;
    },
    close() {
      if (open) c.close(fd);
      ring.close();
      open = false;
    },
  };
}
