/**
 * The spill file of an import read from a pipe: stream bytes that arrive before the
 * metadata mapping them and do not fit in memory (`--max-buffer`) are appended here
 * and read back when claimed. The file is created on first use in the spool folder
 * (`--spool-dir`, default the system temporary folder) and unlinked at once, so
 * nothing is left behind whatever happens to the process.
 *
 * @module
 */
import { dirname } from "node:path";
import { describeIoError, LimitError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { loadLibc } from "./libc.ts";
import { type DestinationOps, destinationOps } from "./pipe_input.ts";

/** Bytes read from the spool at once (see {@link Spool.read}). */
const READ_BLOCK = 1024 * 1024;
/** fallocate(2): free the blocks of a range, the file keeping its size. */
const PUNCH_HOLE = 0x02 | 0x01;
/** Ranges smaller than this are not worth a system call to free. */
const MIN_PUNCH = 4096;
const PUNCH_SYMBOLS = {
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
} as const;

/** errno codes of a full filesystem or a file-size limit (ENOSPC, EFBIG, EDQUOT). */
const FULL = /\(os error (28|27|122)\)|No space left|File too large|quota/i;

/** An append-only, self-deleting file of spilled stream bytes. */
export class Spool {
  /** The folder asked for (undefined: the system temporary folder). */
  readonly #dir: string | undefined;
  #file: Deno.FsFile | null = null;
  /** With FFI, a second descriptor of the file that the kernel may write into (splice). */
  #fd = -1;
  #ops: DestinationOps | null = null;
  #where = "";
  #end = 0;
  #punched = 0;
  #canPunch = true;
  /** The block of the spool read last (see {@link read}): bytes `[#cacheAt, +#cacheLength)`. */
  #cacheAt = 0;
  #cacheLength = 0;
  #cacheBuffer: Uint8Array | null = null;

  get #cache(): Uint8Array {
    return this.#cacheBuffer ??= new Uint8Array(READ_BLOCK);
  }

  /** `dir`: where to create the file (default: the system temporary folder). */
  constructor(dir?: string) {
    this.#dir = dir;
  }

  /** Bytes written to the spool so far. */
  get bytes(): number {
    return this.#end;
  }

  /** The folder the spool file is in (known once it was created). */
  get folder(): string {
    return this.#where || (this.#dir ?? "the temporary folder");
  }

  /** Appends `bytes`; returns their offset in the spool. */
  write(bytes: Uint8Array): number {
    const f = this.#open();
    const at = this.#end;
    try {
      f.seekSync(at, Deno.SeekMode.Start);
      for (let done = 0; done < bytes.length;) done += f.writeSync(bytes.subarray(done));
    } catch (err) {
      throw this.#failed(err, at);
    }
    this.#end = at + bytes.length;
    return at;
  }

  /**
   * Appends up to `length` bytes that `move(fd, offset, length)` has the kernel write
   * into the spool's descriptor at `offset` (a splice from the input pipe), and says
   * where they are; null when this is not possible (no FFI, refused): write them instead.
   */
  writeDirect(
    length: number,
    move: (fd: number, offset: number, length: number) => number,
  ): { at: number; n: number } | null {
    this.#open();
    if (this.#fd < 0) return null;
    const at = this.#end;
    let n: number;
    try {
      n = move(this.#fd, at, length);
    } catch (err) {
      throw this.#failed(err, at);
    }
    if (n < 0) {
      this.#ops!.closeDestination(this.#fd);
      this.#fd = -1;
      return null;
    }
    this.#end = at + n;
    return { at, n };
  }

  /** The error for a failed write after `at` bytes: one line when the disk is full. */
  #failed(err: unknown, at: number): Error {
    const msg = err instanceof Error ? err.message : String(err);
    if (FULL.test(msg)) {
      return new LimitError(
        `the spool file in ${this.folder} ran out of space after ${formatBytes(at)} ` +
          `(${
            msg.replace(/ \(os error \d+\)$/, "").replace(
              /^.*: no space left on the device$/,
              "No space left on device",
            )
          }): free space there, give --spool-dir on a larger filesystem, or send the image ` +
          "with its tables first",
        { cause: err },
      );
    }
    return describeIoError(err, `the spool file in ${this.folder}`, "write to");
  }

  /**
   * The `length` spooled bytes at `offset` will never be read: their space (their pages
   * in the page cache, which would otherwise be written to the disk) is given back at
   * once. Best effort: without FFI it is given back when the spool is closed.
   */
  punch(offset: number, length: number): void {
    if (this.#fd < 0 || length < MIN_PUNCH || !this.#canPunch) return;
    const c = loadLibc(PUNCH_SYMBOLS);
    if (c !== null && c.fallocate(this.#fd, PUNCH_HOLE, BigInt(offset), BigInt(length)) === 0) {
      this.#punched += length;
    } else {
      this.#canPunch = false; // no FFI, or a filesystem without holes: freed at the end
    }
  }

  /** Bytes given back by {@link punch} so far. */
  get punched(): number {
    return this.#punched;
  }

  /**
   * Fills `target` with the spooled bytes at `offset`. Claims come mostly in spool
   * order (a table names its clusters in the order they were written), so the spool is
   * read in large blocks kept for the next claims: one read per block, not per cluster.
   */
  read(offset: number, target: Uint8Array): void {
    if (target.length > READ_BLOCK) {
      this.#readFile(offset, target);
      return;
    }
    const cache = this.#cache;
    if (offset < this.#cacheAt || offset + target.length > this.#cacheAt + this.#cacheLength) {
      this.#cacheAt = offset;
      this.#cacheLength = Math.min(READ_BLOCK, this.#end - offset);
      this.#readFile(offset, cache.subarray(0, this.#cacheLength));
    }
    const from = offset - this.#cacheAt;
    target.set(cache.subarray(from, from + target.length));
  }

  #readFile(offset: number, target: Uint8Array): void {
    const f = this.#file!;
    try {
      f.seekSync(offset, Deno.SeekMode.Start);
      for (let done = 0; done < target.length;) {
        const n = f.readSync(target.subarray(done));
        if (n === null) throw new Error(`the spool file ends at ${offset + done}`);
        done += n;
      }
    } catch (err) {
      throw describeIoError(err, `the spool file in ${this.folder}`, "read");
    }
  }

  /** Gives the space back and closes the file (it was unlinked when created). */
  close(): void {
    const f = this.#file;
    this.#file = null;
    this.#cacheBuffer = null;
    this.#cacheLength = 0;
    if (this.#fd >= 0) this.#ops!.closeDestination(this.#fd);
    this.#fd = -1;
    if (!f) return;
    try {
      f.truncateSync(0);
    } catch {
      // closing frees it anyway
    }
    f.close();
  }

  #open(): Deno.FsFile {
    if (this.#file) return this.#file;
    let path: string;
    try {
      path = Deno.makeTempFileSync({ dir: this.#dir, prefix: "diskstream-spool-" });
    } catch (err) {
      throw describeIoError(
        err,
        `a spool file in ${this.#dir ?? "the temporary folder"}`,
        "create",
      );
    }
    this.#where = dirname(path);
    try {
      this.#file = Deno.openSync(path, { read: true, write: true });
      this.#ops = destinationOps();
      this.#fd = this.#ops?.openDestination(path) ?? -1;
    } finally {
      Deno.removeSync(path); // unlinked: the space is freed when the file is closed
    }
    return this.#file;
  }
}
