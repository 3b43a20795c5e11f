/**
 * The two endpoint interfaces every disk transport implements, in the spirit of
 * nbdcopy's "ops": {@link DiskSource} (read, extents) for what export reads, and
 * {@link ImageTarget} / {@link DiskTarget} (write, zero, flush) for what import
 * writes. A file or block device (`disk_source.ts`, `import/raw_destination.ts`) is
 * one implementation; network transports (`http/`, `nbd/`) are others, so export and
 * import never special-case a transport.
 *
 * Byte streams (an image on stdout, a pipe, an HTTP body) are the other kind of
 * endpoint: see `stream.ts`.
 *
 * @module
 */
import { LimitError } from "../errors.ts";
import { formatBytes } from "../size.ts";

/**
 * The read operations of a disk: a regular file, a block device, or a remote export
 * (nbdcopy's "ops"). Export reads its source and base through this.
 */
export interface DiskSource {
  /** The path it was opened with (for messages). */
  readonly path: string;
  /** Size in bytes when it was opened. */
  readonly size: number;
  /** True for a regular file (hole detection may apply), false for a device. */
  readonly isFile: boolean;
  /**
   * True for a network export (NBD): `path` is no file to copy from in the kernel,
   * and its {@link DiskSource.extents} come from the server's metadata, so they are
   * planned as data without being read first (as a trusted allocation hint is), since
   * reading to check them would cost what the metadata saves.
   */
  readonly remote?: boolean;
  /**
   * False when `path` does not hold these bytes at these offsets (the source is a view
   * of another file, such as a disk inside an XVA): then kernel copies from `path` must
   * not be used. Absent means true.
   */
  readonly kernelCopy?: boolean;
  /**
   * Other files its bytes are read from (a VHD's parents): an export must not write
   * its output over them.
   */
  readonly files?: readonly string[];
  /**
   * True when reads bypass the page cache (O_DIRECT): there is no readahead, so each
   * read is one request to the device — read in large pieces, not small probes.
   */
  readonly direct?: boolean;
  /**
   * Fills all of `buf` with the bytes at `position`. Bytes at or past `limit`
   * (default: the size) read as zeros. Throws a `SourceChangedError` when the
   * source ends before `limit`.
   */
  readAt(buf: Uint8Array, position: number, limit?: number): Promise<void>;
  /**
   * {@link readAt}, synchronously: for small reads (a few KiB), where an asynchronous
   * operation would cost more than the read. Not while an asynchronous read runs.
   */
  readAtSync?(buf: Uint8Array, position: number, limit?: number): void;
  /**
   * True when {@link readManySync} does many reads per system call (else it reads one
   * at a time, which for a source read with O_DIRECT means one device request each).
   */
  readonly batchedReads?: boolean;
  /**
   * {@link readAtSync} of `length` bytes at each of `positions[0 .. count)` into
   * consecutive slots of `into`, in as few system calls as the kernel allows: for many
   * small scattered reads (an export's probes).
   */
  readManySync?(
    into: Uint8Array,
    length: number,
    positions: Float64Array,
    count: number,
    limit?: number,
  ): void;
  /**
   * Asks for `[offset, offset + length)` to be read ahead (the kernel's readahead for
   * a file or device), not waiting: small scattered reads that follow are then served
   * from memory instead of one disk request each.
   */
  prefetch?(offset: number, length: number): void;
  /**
   * The byte ranges `[start, end)` of the first `limit` bytes that may hold data,
   * ascending (a file's `SEEK_DATA` extents, a remote export's block status); null
   * when unknown (then every byte may).
   */
  extents(limit: number): Promise<Iterable<readonly [number, number]> | null>;
  /** The size now (to detect a source that changed between passes). */
  currentSize(): Promise<number>;
  /** Releases the file; later calls do nothing. */
  close(): void;
}

/** Where a decoder puts the guest's bytes. */
export interface ImageTarget {
  /**
   * Queues `bytes[from, to)` for guest offset `offset`. The bytes must stay unchanged
   * until the next {@link ImageTarget.flush} has finished.
   */
  write(offset: number, bytes: Uint8Array, from: number, to: number): void;
  /** Guest range `[offset, offset + length)` reads as zeros in the image. */
  zero(offset: number, length: number): void;
  /** Performs the queued writes. */
  flush(): Promise<void>;
  /** Bytes queued and not yet written. */
  readonly queued: number;
  /** The destination's path, when {@link ImageTarget.wroteDirect} may be used. */
  readonly path?: string;
  /**
   * Guest range `[offset, offset + length)` was written to `path` directly (spliced
   * by the kernel): accounts for it. Throws when the range is out of bounds.
   */
  wroteDirect?(offset: number, length: number): void;
  /**
   * True when the target writes with O_DIRECT (`--direct`): data must reach it through
   * {@link ImageTarget.write}, never be spliced into `path` through the page cache.
   */
  readonly direct?: boolean;
}

/** What an import writes into: the write operations plus its end. */
export interface DiskTarget extends ImageTarget {
  /** A name for messages (a path, a URL). */
  readonly name: string;
  /** Flushes, makes the data durable and releases the target. */
  finish(virtualSize?: number): Promise<void>;
  /** Releases the target after a failure (removing what this run created). */
  abort(): Promise<void>;
}

/**
 * The refusal of a destination (`name`: a path or URL) that holds `have` bytes, fewer
 * than the image's virtual size `need`; nothing has been written when it is thrown.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { destinationTooSmall } from "./endpoint.ts";
 *
 * const err = destinationTooSmall("/dev/sdb", 1 << 20, 2 << 20);
 * assert.match(err.message, /^\/dev\/sdb holds 1048576 bytes \(1\.00 MiB\), less than/);
 * ```
 */
export function destinationTooSmall(name: string, have: number, need: number): LimitError {
  return new LimitError(
    `${name} holds ${have} bytes (${formatBytes(have)}), less than the image's virtual size ` +
      `of ${need} bytes (${formatBytes(need)}): refusing to write`,
  );
}
