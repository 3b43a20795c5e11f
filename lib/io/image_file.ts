/**
 * An image file opened for random access: its size and positional reads that refuse to
 * run past the end (a {@link CorruptImageError} naming what was being read and where).
 * Used by the header readers, which read tables, never data.
 *
 * @module
 */
import { ClusterSet } from "../alloc/cluster_set.ts";
import {
  CorruptImageError,
  describeIoError,
  DiskstreamError,
  UnsupportedError,
} from "../errors.ts";
import { dataExtents } from "./seek_data.ts";

/** A read-only image file (regular file or block device) with positional reads. */
export class ImageFile {
  /** The path as given. */
  readonly path: string;
  /** Size in bytes (for a block device, its length). */
  readonly size: number;
  readonly #file: Deno.FsFile;
  readonly #base: number;

  private constructor(path: string, file: Deno.FsFile, size: number, base: number) {
    this.path = path;
    this.#file = file;
    this.size = size;
    this.#base = base;
  }

  /**
   * Opens `path` read-only; errors name the path. The image starts `base` bytes into
   * the file (an inherited descriptor that was partly read): offsets count from there.
   */
  static async open(path: string, base = 0): Promise<ImageFile> {
    let file: Deno.FsFile;
    try {
      // Opening a FIFO waits for a writer (forever, deaf to SIGTERM): look first.
      const st = await Deno.stat(path);
      if (!st.isFile && !st.isBlockDevice && !st.isDirectory) {
        throw new UnsupportedError(
          `cannot read ${path}: it is ${kindOf(st)}, and an image is read at random ` +
            `offsets: give a regular file or a block device`,
        );
      }
      file = await Deno.open(path, { read: true });
    } catch (err) {
      throw describeIoError(err, path, "open");
    }
    try {
      const size = await file.seek(0, Deno.SeekMode.End);
      return new ImageFile(path, file, Math.max(0, size - base), base);
    } catch (err) {
      file.close();
      throw describeIoError(err, path, "read");
    }
  }

  /**
   * Reads exactly `length` bytes at `offset`. `what` names the structure for the
   * error raised when it lies (partly) past the end of the file.
   */
  readAt(offset: number, length: number, what: string): Promise<Uint8Array> {
    return Promise.resolve().then(() => this.readAtSync(offset, length, what));
  }

  /** {@link readAt}, synchronously. */
  readAtSync(offset: number, length: number, what: string): Uint8Array {
    const buf = new Uint8Array(length);
    this.readInto(offset, buf, what);
    return buf;
  }

  /**
   * Fills all of `target` from `offset`, synchronously: for many small reads into one
   * reused buffer (an async op and a fresh buffer per table cost more than the read).
   */
  readInto(offset: number, target: Uint8Array, what: string): void {
    const length = target.length;
    if (offset + length > this.size) {
      throw new CorruptImageError(
        `${what} (${length} bytes at ${offset}) lies past the end of the ${this.size}-byte file`,
        offset,
      );
    }
    const done = this.readSome(offset, target);
    if (done < length) {
      throw new CorruptImageError(
        `${what} ends early: the file shrank while being read`,
        offset + done,
      );
    }
  }

  /**
   * Reads up to `target.length` bytes at `offset` (fewer only at the end of the file),
   * synchronously; returns how many.
   */
  readSome(offset: number, target: Uint8Array): number {
    try {
      this.#file.seekSync(this.#base + offset, Deno.SeekMode.Start);
      let done = 0;
      while (done < target.length) {
        const n = this.#file.readSync(target.subarray(done));
        if (n === null) break;
        done += n;
      }
      return done;
    } catch (err) {
      throw describeIoError(err, this.path, "read");
    }
  }

  /** Closes the file. */
  close(): void {
    this.#file.close();
  }
}

/** What a path that is neither a file nor a block device nor a directory is. */
function kindOf(st: Deno.FileInfo): string {
  if (st.isFifo) return "a FIFO (named pipe)";
  if (st.isSocket) return "a socket";
  if (st.isCharDevice) return "a character device";
  return "not a regular file";
}

/** Opens `path`, runs `fn` with it and closes it, whatever happens. */
export async function withImageFile<T>(
  path: string,
  fn: (file: ImageFile) => Promise<T>,
): Promise<T> {
  const file = await ImageFile.open(path);
  try {
    return await fn(file);
  } finally {
    file.close();
  }
}

/** A CorruptImageError's message without its "(at byte offset N)" suffix. */
function stripOffset(message: string): string {
  return message.replace(/ \(at byte offset \d+\)$/, "");
}

/**
 * `err` with `path: ` in front of its message (unless already there), keeping its
 * class and byte offset, so that an error deep in a backing chain names its file.
 */
export function inFile(path: string, err: unknown): unknown {
  if (!(err instanceof DiskstreamError) || err.message.startsWith(`${path}: `)) return err;
  if (err instanceof CorruptImageError) {
    return new CorruptImageError(`${path}: ${stripOffset(err.message)}`, err.offset, {
      cause: err,
    });
  }
  if (err instanceof UnsupportedError) {
    return new UnsupportedError(`${path}: ${err.message}`, { cause: err });
  }
  return err;
}

/** True when `path` exists and is a regular file or a block device. */
export async function isImagePath(path: string): Promise<boolean> {
  try {
    const st = await Deno.stat(path);
    return st.isFile || st.isBlockDevice === true;
  } catch {
    return false;
  }
}

/**
 * The clusters of `[0, size)` of the file at `path` that hold data when its bytes are
 * the disk's bytes (raw files, fixed VHDs): those with data extents when the file's
 * holes can be found (SEEK_DATA), else all of them.
 */
export function rawDataClusters(path: string, size: number, clusterSize: number): ClusterSet {
  const set = new ClusterSet(Math.ceil(size / clusterSize), clusterSize);
  const extents = dataExtents(path, size);
  if (extents === null) set.addRange(0, set.length - 1);
  else for (const [start, end] of extents) set.addBytes(start, end - start);
  return set;
}
