/**
 * A raw disk to read from: a regular file or a block device. Its size comes from
 * `stat` for a file and from seeking to the end for a device (whose `stat` size is
 * 0). Reads are positional and large; one read runs at a time per source (a seek and
 * a read are one step), so callers may overlap reads of different sources.
 *
 * @module
 */
import { describeIoError, DiskstreamError, SourceChangedError } from "../errors.ts";
import type { DiskSource } from "./endpoint.ts";
import { dataExtents } from "./seek_data.ts";
import { openPageCache, type PageCache } from "./page_cache.ts";
import { type DirectFile, openDirectFile } from "./direct_io.ts";
import { openPositionalReader, type PositionalReader } from "./pread.ts";
import { BATCH_READS, type BatchReads } from "./uring.ts";

export type { DiskSource } from "./endpoint.ts";

/**
 * Opens `path` for reading and learns its size. Errors name the path and what to do
 * (a device under `/dev` needs Deno's `--allow-all`, e.g. `deno task diskstream`).
 * `direct`: reads bypass the page cache (O_DIRECT, see direct_io.ts), or where that is
 * refused (tmpfs), what is read leaves the page cache again (see page_cache.ts).
 */
export async function openDiskSource(
  path: string,
  options: { direct?: boolean } = {},
): Promise<DiskSource> {
  let file: Deno.FsFile;
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
    if (info.isDirectory) throw new DiskstreamError(`cannot read ${path}: it is a directory`);
    file = await Deno.open(path, { read: true });
  } catch (err) {
    throw describeIoError(err, path, "open");
  }
  let size: number;
  try {
    size = info.isFile ? info.size : await file.seek(0, Deno.SeekMode.End);
  } catch (err) {
    file.close();
    throw describeIoError(err, path, "find the size of");
  }
  const direct = options.direct ? openDirectFile(path, false) : null;
  const cache = direct ? null : openPageCache(path, !!options.direct);
  const pread = direct ? null : openPositionalReader(path, file);
  return new FileSource(path, file, size, info.isFile, cache, direct, pread);
}

/** What another thread needs to read a disk itself: its path and the file's identity. */
export interface SharedFile {
  path: string;
  /** `stat` device and inode of the file this source has open (the other thread checks them). */
  dev: number;
  ino: number;
}

/**
 * A file or device source that another thread may open by its path and read as well
 * (its reads need no page-cache bookkeeping, `--direct`), or null for any other source.
 */
export function sharedFileOf(source: DiskSource): SharedFile | null {
  if (!(source instanceof FileSource) || source.cache?.drop || source.direct) return null;
  return source.identity();
}

class FileSource implements DiskSource {
  #file: Deno.FsFile;
  #closed = false;
  /** The file position, when known: a read where it already is needs no seek. */
  #position = -1;
  /** Results of batched reads ({@link readManySync}). */
  #results: Int32Array | null = null;
  /** The last queued operation: seek + read pairs must not interleave. */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(
    readonly path: string,
    file: Deno.FsFile,
    readonly size: number,
    readonly isFile: boolean,
    readonly cache: PageCache | null = null,
    readonly directFile: DirectFile | null = null,
    /** Synchronous reads in one system call each (see pread.ts), when available. */
    readonly pread: PositionalReader | null = null,
  ) {
    this.#file = file;
  }

  get direct(): boolean {
    return this.directFile !== null;
  }

  #serial<T>(op: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(op, op);
    this.#queue = next.catch(() => {});
    return next;
  }

  readAt(buf: Uint8Array, position: number, limit = this.size): Promise<void> {
    const want = this.#prepare(buf, position, limit);
    if (want === 0) return Promise.resolve();
    const direct = this.directFile;
    if (direct) {
      return this.#serial(async () => {
        this.#check(await direct.read(buf.subarray(0, want), position), want, position, limit);
      });
    }
    return this.#serial(async () => {
      let got = 0;
      try {
        if (this.#position !== position) {
          this.#position = -1;
          await this.#file.seek(position, Deno.SeekMode.Start);
        }
        while (got < want) {
          const n = await this.#file.read(buf.subarray(got, want));
          if (n === null) break;
          got += n;
        }
      } catch (err) {
        this.#position = -1;
        throw describeIoError(err, this.path, "read");
      }
      this.#position = position + got;
      this.cache?.read(position, got);
      this.#check(got, want, position, limit);
    });
  }

  readAtSync(buf: Uint8Array, position: number, limit = this.size): void {
    const want = this.#prepare(buf, position, limit);
    if (this.directFile) {
      const got = want > 0 ? this.directFile.readSync(buf.subarray(0, want), position) : 0;
      return this.#check(got, want, position, limit);
    }
    let got = 0;
    if (this.pread) {
      try {
        while (got < want) {
          const n = this.pread.read(buf.subarray(got, want), position + got);
          if (n === 0) break;
          got += n;
        }
      } catch (err) {
        throw describeIoError(err, this.path, "read");
      }
      this.cache?.read(position, got);
      return this.#check(got, want, position, limit);
    }
    try {
      if (want > 0 && this.#position !== position) {
        this.#position = -1;
        this.#file.seekSync(position, Deno.SeekMode.Start);
      }
      while (got < want) {
        const n = this.#file.readSync(buf.subarray(got, want));
        if (n === null) break;
        got += n;
      }
    } catch (err) {
      this.#position = -1;
      throw describeIoError(err, this.path, "read");
    }
    if (want > 0) this.#position = position + got;
    this.cache?.read(position, got);
    this.#check(got, want, position, limit);
  }

  /** What reads in batches: the O_DIRECT descriptor, else the positional reader. */
  get #batcher(): BatchReads | null {
    return this.directFile ?? this.pread;
  }

  get batchedReads(): boolean {
    return this.#batcher?.batched() ?? false;
  }

  readManySync(
    into: Uint8Array,
    length: number,
    positions: Float64Array,
    count: number,
    limit = this.size,
  ): void {
    const results = this.#results ??= new Int32Array(BATCH_READS);
    const reader = this.#batcher;
    let done = 0;
    // In batches through io_uring, where the kernel has it.
    while (done < count && reader) {
      const n = Math.min(BATCH_READS, count - done);
      const slots = into.subarray(done * length);
      const at = positions.subarray(done, done + n);
      try {
        if (!reader.readMany(slots, length, at, n, results)) break;
      } catch (err) {
        throw describeIoError(err, this.path, "read");
      }
      for (let i = 0; i < n; i++) {
        const want = Math.max(0, Math.min(length, limit - at[i]));
        const slot = slots.subarray(i * length, (i + 1) * length);
        // A short or failed read is read again alone: that finds the end or the error.
        if (results[i] !== want) this.readAtSync(slot, at[i], limit);
        else {
          if (want < length) slot.fill(0, want);
          this.cache?.read(at[i], want);
        }
      }
      done += n;
    }
    for (; done < count; done++) {
      this.readAtSync(into.subarray(done * length, (done + 1) * length), positions[done], limit);
    }
  }

  /** See {@link sharedFileOf}; null when the file cannot be inspected. */
  identity(): SharedFile | null {
    try {
      const info = this.#file.statSync();
      return info.ino === null ? null : { path: this.path, dev: info.dev, ino: info.ino };
    } catch {
      return null;
    }
  }

  /** Zero-fills what lies past `limit` and returns how many bytes to read. */
  #prepare(buf: Uint8Array, position: number, limit: number): number {
    const want = Math.max(0, Math.min(buf.length, limit - position));
    if (want < buf.length) buf.fill(0, want);
    return want;
  }

  #check(got: number, want: number, position: number, limit: number): void {
    if (got < want) {
      throw new SourceChangedError(
        `${this.path} ended at byte ${
          position + got
        } while ${limit} bytes were expected: the source shrank during the export`,
      );
    }
  }

  prefetch(offset: number, length: number): void {
    this.cache?.willNeed(offset, Math.max(0, Math.min(length, this.size - offset)));
  }

  extents(limit: number): Promise<Iterable<readonly [number, number]> | null> {
    return Promise.resolve(this.isFile ? dataExtents(this.path, Math.min(limit, this.size)) : null);
  }

  currentSize(): Promise<number> {
    return this.#serial(async () => {
      try {
        if (this.isFile) return (await this.#file.stat()).size;
        this.#position = -1;
        return await this.#file.seek(0, Deno.SeekMode.End);
      } catch (err) {
        throw describeIoError(err, this.path, "find the size of");
      }
    });
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.cache?.close();
    this.directFile?.close();
    this.pread?.close();
    try {
      this.#file.close();
    } catch {
      // already closed by an aborted operation
    }
  }
}
