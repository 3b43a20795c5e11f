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

/** errno codes of a full filesystem or a file-size limit (ENOSPC, EFBIG, EDQUOT). */
const FULL = /\(os error (28|27|122)\)|No space left|File too large|quota/i;

/** An append-only, self-deleting file of spilled stream bytes. */
export class Spool {
  /** The folder asked for (undefined: the system temporary folder). */
  readonly #dir: string | undefined;
  #file: Deno.FsFile | null = null;
  #where = "";
  #end = 0;

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
      const msg = err instanceof Error ? err.message : String(err);
      if (FULL.test(msg)) {
        throw new LimitError(
          `the spool file in ${this.folder} ran out of space after ${formatBytes(at)} ` +
            `(${msg.replace(/ \(os error \d+\)$/, "")}): free space there, give --spool-dir ` +
            "on a larger filesystem, or send the image with its tables first",
          { cause: err },
        );
      }
      throw describeIoError(err, `the spool file in ${this.folder}`, "write to");
    }
    this.#end = at + bytes.length;
    return at;
  }

  /** Fills `target` with the spooled bytes at `offset`. */
  read(offset: number, target: Uint8Array): void {
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
    } finally {
      Deno.removeSync(path); // unlinked: the space is freed when the file is closed
    }
    return this.#file;
  }
}
