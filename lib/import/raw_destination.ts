/**
 * The destination of an import: a raw regular file or block device written at guest
 * offsets. Writes are queued as views of the input chunks (no copy), adjacent ones
 * merged, and performed in large positional writes by {@link RawDestination.flush}.
 *
 * - A new regular file is created at the virtual size and stays sparse: only data is
 *   written (all-zero stretches of it too are left as holes), holes read as zeros.
 * - An existing file or a device gets zeros written wherever the image has no data,
 *   unless it is known to be zeroed already (`prezeroed`).
 * - `delta` applies a diff: ranges the image does not allocate are left untouched,
 *   ranges it marks as zero are written as zeros.
 * - A destination smaller than the image is refused before anything is written, and
 *   nothing is ever written outside `[0, virtual size)`.
 *
 * @module
 */
import { ClusterSet } from "../alloc/cluster_set.ts";
import { describeIoError, DiskstreamError, InterruptedError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { zeroTest } from "../zero.ts";
import { openPageCache, type PageCache } from "../io/page_cache.ts";
import { type DirectFile, openDirectFile } from "../io/direct_io.ts";
import { destinationTooSmall, type DiskTarget } from "../io/endpoint.ts";

export type { ImageTarget } from "../io/endpoint.ts";

/** Options of {@link RawDestination.open}. */
export interface DestinationOptions {
  /**
   * The destination's usable size in bytes, when it cannot be read (or to check it):
   * an image larger than this is refused before any write.
   */
  size?: number;
  /** The destination already reads as zeros: do not write zeros where the image has none. */
  prezeroed?: boolean;
  /** Apply a diff: leave unallocated ranges untouched, write zeros for ZERO ranges. */
  delta?: boolean;
  /**
   * Keep the written data out of the page cache (vhd-tool's `--direct`): written with
   * O_DIRECT, or where that is refused (tmpfs), written back in strides and dropped
   * from the cache. Needs FFI (else ignored).
   */
  direct?: boolean;
  /** Sync the data to the device (fdatasync) before finishing (default true). */
  sync?: boolean;
  /** Stops the writes when aborted: the next flush throws the reason. */
  signal?: AbortSignal;
}

/** How the destination was found. */
export type DestinationKind = "new file" | "file" | "device" | "nbd export";

const ZEROS = new Uint8Array(4 * 1024 * 1024);
/** All-zero data is left as a hole in pieces of this size (when the destination is zero). */
const ZERO_GRAIN = 64 * 1024;
/** Queued writes are merged up to this size. */
const MAX_WRITE = 16 * 1024 * 1024;

/** A raw file or device being filled by an import. See the module comment. */
export class RawDestination implements DiskTarget {
  /** Path of the destination. */
  readonly path: string;
  /** The path, for messages. */
  get name(): string {
    return this.path;
  }
  /** What the destination was when opened. */
  readonly kind: DestinationKind;
  /** The image's virtual size, the end of what is written; null until known (fixed VHD). */
  readonly virtualSize: number | null;
  readonly #file: Deno.FsFile;
  /** With `direct`: the destination opened with O_DIRECT, which every write goes through. */
  readonly #direct: DirectFile | null;
  readonly #cache: PageCache | null;
  readonly #capacity: number;
  readonly #initialSize: number;
  readonly #writeZeros: boolean;
  readonly #skipZeros: boolean;
  /** Units written so far, when the unwritten ones get zeros at the end. */
  readonly #written: ClusterSet | null;
  /** Zeros are written at the end only below this offset (an extended file is zero beyond). */
  readonly #fillLimit: number;
  #filePos = -1;
  // Queued writes: guest offset, and the bytes as buffer + offset + length.
  #offs: number[] = [];
  #bufs: ArrayBufferLike[] = [];
  #bufOffs: number[] = [];
  #lens: number[] = [];
  #dataBytes = 0;
  #directBytes = 0;
  #queued = 0;
  /** The lowest offset written (or extended) so far: the destination is intact below it. */
  #lowest = Infinity;
  readonly #sync: boolean;
  readonly #signal: AbortSignal | undefined;

  private constructor(
    path: string,
    kind: DestinationKind,
    file: Deno.FsFile,
    virtualSize: number | null,
    unit: number,
    opts: DestinationOptions,
    sizes: { fillLimit: number; capacity: number; initial: number },
  ) {
    this.path = path;
    this.kind = kind;
    this.#file = file;
    this.#direct = opts.direct ? openDirectFile(path, true) : null;
    // Without --direct, an import that syncs at the end starts the writeback as it goes.
    this.#cache = opts.direct
      ? this.#direct === null ? openPageCache(path, true) : null
      : (opts.sync ?? true)
      ? openPageCache(path, false, true)
      : null;
    this.virtualSize = virtualSize;
    this.#capacity = sizes.capacity;
    this.#initialSize = sizes.initial;
    const fillLimit = sizes.fillLimit;
    // Zeros for what the image lacks, at the end; not possible when the size is unknown
    // (a fixed VHD from a pipe, whose every byte is in the stream anyway).
    const fill = kind !== "new file" && !opts.delta && !opts.prezeroed;
    this.#writeZeros = fill || !!opts.delta;
    this.#skipZeros = !this.#writeZeros;
    this.#written = fill && virtualSize !== null
      ? new ClusterSet(Math.ceil(fillLimit / unit), unit)
      : null;
    this.#fillLimit = fill ? fillLimit : 0;
    this.#sync = opts.sync ?? true;
    this.#signal = opts.signal;
    if (kind === "file" && virtualSize !== null && sizes.initial < virtualSize) {
      this.#lowest = sizes.initial; // extended to the virtual size
    }
  }

  /**
   * Opens (or creates) `path` for an image of `virtualSize` bytes (null: not known
   * yet, give it to {@link RawDestination.finish}). `unit` is the grain of the image's
   * allocation (cluster or block size). Refuses a destination smaller than the image
   * before writing anything.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { RawDestination } from "./raw_destination.ts";
   *
   * const dir = await Deno.makeTempDir();
   * const dest = await RawDestination.open(`${dir}/disk.raw`, 4096, 512);
   * dest.write(1024, new Uint8Array(512).fill(9), 0, 512);
   * await dest.finish();
   * const raw = await Deno.readFile(`${dir}/disk.raw`);
   * assert.equal(raw.length, 4096);
   * assert.equal(raw[1024], 9);
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static async open(
    path: string,
    virtualSize: number | null,
    unit: number,
    opts: DestinationOptions = {},
  ): Promise<RawDestination> {
    let info: Deno.FileInfo | null = null;
    try {
      info = await Deno.stat(path);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw describeIoError(err, path, "open");
    }
    if (info?.isDirectory) {
      throw new DiskstreamError(`cannot write to ${path}: it is a directory`);
    }
    const kind: DestinationKind = !info ? "new file" : info.isFile ? "file" : "device";
    let capacity = opts.size ?? Infinity;
    const size = virtualSize ?? 0;
    if (size > capacity) throw destinationTooSmall(path, capacity, size);
    let file: Deno.FsFile;
    try {
      file = await Deno.open(
        path,
        kind === "new file" ? { write: true, createNew: true } : { read: true, write: true },
      );
    } catch (err) {
      throw describeIoError(err, path, "open for writing");
    }
    try {
      let fillLimit = size;
      const initial = info?.size ?? 0;
      if (kind === "device") {
        const end = await file.seek(0, Deno.SeekMode.End);
        if (info!.isBlockDevice) capacity = Math.min(capacity, end);
        if (size > capacity) throw destinationTooSmall(path, capacity, size);
      } else if (kind === "file") {
        fillLimit = Math.min(size, initial);
        if (initial < size) await file.truncate(size);
      } else {
        await file.truncate(size);
      }
      const sizes = { fillLimit, capacity, initial };
      return new RawDestination(path, kind, file, virtualSize, unit, opts, sizes);
    } catch (err) {
      file.close();
      if (kind === "new file") await Deno.remove(path).catch(() => {});
      throw describeIoError(err, path, "prepare");
    }
  }

  get queued(): number {
    return this.#queued;
  }

  /** True when writes use O_DIRECT (so data is never spliced into the destination). */
  get direct(): boolean {
    return this.#direct !== null;
  }

  /** Bytes of image data (not zeros) written so far. */
  get dataBytes(): number {
    return this.#dataBytes;
  }

  write(offset: number, bytes: Uint8Array, from: number, to: number): void {
    const len = to - from;
    if (len <= 0) return;
    this.#check(offset, len);
    this.#dataBytes += len;
    this.#written?.addBytes(offset, len);
    if (!this.#skipZeros) {
      this.#queue(offset, bytes.buffer, bytes.byteOffset + from, len);
      return;
    }
    // The destination reads as zeros already: leave all-zero stretches as holes.
    const isZero = zeroTest(bytes);
    let run = from;
    for (let a = from; a < to;) {
      const b = Math.min(to, a + ZERO_GRAIN - ((offset + a - from) % ZERO_GRAIN));
      if (isZero(a, b)) {
        if (run < a) {
          this.#queue(offset + run - from, bytes.buffer, bytes.byteOffset + run, a - run);
        }
        run = b;
      }
      a = b;
    }
    if (run < to) this.#queue(offset + run - from, bytes.buffer, bytes.byteOffset + run, to - run);
  }

  /** Bytes written directly ({@link RawDestination.wroteDirect}). */
  get directBytes(): number {
    return this.#directBytes;
  }

  wroteDirect(offset: number, length: number): void {
    this.#check(offset, length);
    this.#lowest = Math.min(this.#lowest, offset);
    this.#directBytes += length;
    if (this.#cache?.drop) this.#cache.wrote(offset, length); // splices start their writeback
    this.#dataBytes += length;
    this.#written?.addBytes(offset, length);
  }

  zero(offset: number, length: number): void {
    if (!this.#writeZeros || length <= 0) return;
    this.#check(offset, length);
    this.#written?.addBytes(offset, length);
    this.#queueZeros(offset, length);
  }

  #check(offset: number, len: number) {
    if (this.virtualSize === null) {
      if (offset + len > this.#capacity) {
        // A fixed VHD from a pipe: its size is known only at its end.
        throw new DiskstreamError(
          `${this.path} holds ${this.#capacity} bytes (${formatBytes(this.#capacity)}), but the ` +
            `image goes on past byte ${offset + len}; a fixed VHD read from a pipe has no size ` +
            `until its footer, so the first ${this.#capacity} bytes of ${this.path} were ` +
            `already written (give the image with -i FILE to have this checked before writing)`,
        );
      }
    } else if (offset < 0 || offset + len > this.virtualSize) {
      throw new Error(
        `write of ${len} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
      );
    }
  }

  #queueZeros(offset: number, length: number) {
    for (let at = offset; at < offset + length;) {
      const n = Math.min(ZEROS.length, offset + length - at);
      this.#queue(at, ZEROS.buffer, 0, n);
      at += n;
    }
  }

  #queue(offset: number, buf: ArrayBufferLike, bufOff: number, len: number) {
    this.#queued += len;
    const last = this.#offs.length - 1;
    if (last >= 0) {
      const lastLen = this.#lens[last];
      if (
        this.#offs[last] + lastLen === offset && this.#bufs[last] === buf &&
        lastLen + len <= (buf === ZEROS.buffer ? ZEROS.length : MAX_WRITE) &&
        (buf === ZEROS.buffer || this.#bufOffs[last] + lastLen === bufOff)
      ) {
        this.#lens[last] = lastLen + len;
        return;
      }
    }
    this.#offs.push(offset);
    this.#bufs.push(buf);
    this.#bufOffs.push(bufOff);
    this.#lens.push(len);
  }

  async flush(): Promise<void> {
    this.#signal?.throwIfAborted();
    const offs = this.#offs;
    const bufs = this.#bufs;
    const bufOffs = this.#bufOffs;
    const lens = this.#lens;
    this.#offs = [];
    this.#bufs = [];
    this.#bufOffs = [];
    this.#lens = [];
    this.#queued = 0;
    const f = this.#file;
    try {
      for (let i = 0; i < offs.length; i++) {
        if (this.#direct) {
          this.#lowest = Math.min(this.#lowest, offs[i]);
          await this.#direct.write(new Uint8Array(bufs[i], bufOffs[i], lens[i]), offs[i]);
          continue;
        }
        if (this.#filePos !== offs[i]) {
          await f.seek(offs[i], Deno.SeekMode.Start);
        }
        this.#lowest = Math.min(this.#lowest, offs[i]);
        const view = new Uint8Array(bufs[i], bufOffs[i], lens[i]);
        let done = 0;
        while (done < view.length) done += await f.write(view.subarray(done));
        this.#filePos = offs[i] + lens[i];
        this.#cache?.wrote(offs[i], lens[i]);
      }
    } catch (err) {
      this.#filePos = -1;
      throw describeIoError(err, this.path, "write to");
    }
  }

  /**
   * Completes the destination: zeros where the image had nothing (unless sparse,
   * prezeroed or delta), then flushes and syncs the data to the device, and closes.
   * `virtualSize` is needed when it was not known at {@link RawDestination.open}.
   */
  async finish(virtualSize?: number): Promise<void> {
    try {
      if (this.virtualSize === null) {
        const size = virtualSize ?? 0;
        if (size > this.#capacity) throw destinationTooSmall(this.path, this.#capacity, size);
        await this.flush();
        if (this.kind === "new file" || this.#initialSize < size) await this.#file.truncate(size);
      }
      const written = this.#written;
      if (written) {
        let gapStart = 0;
        const fill = async (end: number) => {
          const b = Math.min(end * written.clusterSize, this.#fillLimit);
          for (let a = gapStart * written.clusterSize; a < b; a += MAX_WRITE) {
            this.#queueZeros(a, Math.min(MAX_WRITE, b - a));
            if (this.#offs.length >= 64) await this.flush();
          }
        };
        for (const [first, last] of written.runs()) {
          await fill(first);
          gapStart = last + 1;
        }
        await fill(written.length);
      }
      await this.flush();
      if (this.#direct) await (this.#sync ? this.#direct.sync() : this.#direct.drain());
      else if (this.#sync) await this.#file.syncData();
    } catch (err) {
      this.#close();
      throw describeIoError(err, this.path, "write to");
    }
    this.#close();
  }

  /** Whether any byte of the destination was changed (or a file extended). */
  get written(): boolean {
    return this.#lowest !== Infinity;
  }

  /**
   * What a failed import left in the destination, for messages (after
   * {@link RawDestination.abort}): removed, not written, or partly written from
   * which byte on.
   */
  get damage(): string {
    if (this.kind === "new file") return `${this.path} (created by this import) was removed`;
    if (this.#lowest === Infinity) return `${this.path} was not written`;
    return `${this.path} (an existing ${this.kind}) is partly written from byte ${this.#lowest} on`;
  }

  /** Gives up: closes, and removes the file if this import created it. */
  async abort(): Promise<void> {
    this.#close();
    if (this.kind === "new file") await Deno.remove(this.path).catch(() => {});
  }

  #close() {
    this.#cache?.close();
    this.#direct?.close();
    try {
      this.#file.close();
    } catch {
      // already closed
    }
  }
}

/** What {@link failedImport} needs of a destination (a file, a device or an NBD export). */
interface ImportDestination {
  readonly kind: string;
  readonly damage: string;
  readonly written: boolean;
  abort(): Promise<void>;
}

/**
 * The error an import into `dest` ends with after `err`: the destination (null when it
 * was never opened) is aborted, so a file the import created is removed, and the input
 * cancelled; a signal is told with what was left, an existing file or device is named
 * with what the failure left in it, and `nothingWritten` is set for the server.
 */
export async function failedImport(
  err: unknown,
  dest: string,
  target: ImportDestination | null,
  input: { cancel(): Promise<unknown> },
): Promise<unknown> {
  await target?.abort();
  await input.cancel().catch(() => {});
  if (err instanceof InterruptedError) {
    return err.retell(
      `import into ${dest} interrupted by ${err.signal}: ` +
        (target ? target.damage : `nothing was written to ${dest}`),
    );
  }
  if (err instanceof DiskstreamError) {
    if (target !== null && target.kind !== "new file") {
      err.message = `${err.message}; ${target.damage}`;
    }
    err.nothingWritten = target === null || !target.written;
  }
  return err;
}
