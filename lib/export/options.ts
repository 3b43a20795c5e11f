/**
 * The options of an export and the shape of a planned export, shared by the plan,
 * pass 2 and the format glue.
 *
 * @module
 */
import type { Allocation } from "../alloc/allocation.ts";
import type { ClusterSet } from "../alloc/cluster_set.ts";
import type { Endpoint } from "../io/stream.ts";
import type { StreamLayout } from "../qcow2/layout.ts";
import type { ProgressSink } from "../progress.ts";
import type { NbdOptions } from "../nbd/client.ts";

/** Options of every export format (see {@link ExportOptions} for qcow2). */
export interface StreamExportOptions {
  /**
   * Which clusters of the source may hold data (any cluster size; see
   * `parseAllocation`). Only those are read, and they are written without looking
   * at them unless `zeroCheck` is set. Its virtual size must be the source's.
   */
  allocation?: Allocation;
  /** With `allocation`: also leave out the hinted clusters that are all zeros. */
  zeroCheck?: boolean;
  /** How to reach a source or base that is an NBD export: connections, CA certificate. */
  nbd?: NbdOptions;
  /** Export only what differs from this base disk (a raw file or device, or an NBD URI). */
  base?: string;
  /** Which clusters of `base` may hold data (its virtual size must be the base's). */
  baseAllocation?: Allocation;
  /** Receives progress in bytes (pass 1 reads, then the bytes of the stream). */
  progress?: ProgressSink;
  /** Size of the stream's chunks in bytes (default 4 MiB). */
  chunkSize?: number;
  /**
   * Recycle a small ring of chunk buffers (much faster for large disks): each chunk
   * then stays valid only until the next one is read, so write or copy it first
   * (as `for await (const c of stream) await out.write(c)` does). Default false:
   * every chunk is a fresh buffer the consumer may keep.
   */
  reuseBuffers?: boolean;
  /**
   * Keep the disks' data out of the page cache (vhd-tool's `--direct`): the source and
   * the base are read with O_DIRECT (where that is refused, what is read is dropped
   * from the cache behind the transfer), what is written to an output file is dropped
   * from the cache a few megabytes behind the transfer. Needs FFI (else ignored).
   */
  direct?: boolean;
  /**
   * {@link PlannedExport.writeTo}: make the output durable (`fdatasync`) before
   * returning, when it is a file or a device (default true).
   */
  sync?: boolean;
  /**
   * Stops the export when aborted: pass 1 and pass 2 check it between reads and
   * copies; `writeTo` then removes an output file it created and throws (an
   * `InterruptedError` reason is retold with what was interrupted).
   */
  signal?: AbortSignal;
}

/** Options of {@link exportQcow2}. */
export interface ExportOptions extends StreamExportOptions {
  /** Output cluster size in bytes, a power of two from 512 to 2 MiB (default 64 KiB). */
  clusterSize?: number;
  /** Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (default 16). */
  refcountBits?: number;
}

/** A planned export: its stream and what it will contain. */
export interface PlannedExport<Layout> {
  /**
   * The image bytes, in chunks of megabytes. Reading it runs pass 2; cancel it to
   * stop early (the source is closed either way).
   */
  readonly stream: ReadableStream<Uint8Array>;
  /** Where everything goes; `layout.fileSize` is the exact length of the stream. */
  readonly layout: Layout;
  /** The guest clusters written as data (for VHD: the 2 MiB blocks). */
  readonly clusters: ClusterSet;
  /** Size of the source in bytes (the virtual size is this rounded up to 512). */
  readonly sourceSize: number;
  /** Bytes of the source examined while planning (pass 1). */
  readonly scannedBytes: number;
  /**
   * Writes the image to `target` (stdout, a path — created or truncated — or an
   * inherited descriptor) instead of reading {@link stream}; use one or the other.
   * With FFI permitted on Linux the data clusters never pass through JavaScript:
   * `splice(2)` moves them into a pipe, `copy_file_range(2)` into a file (the
   * fastest way, though each kernel call of up to 8 MiB holds the event loop while
   * the reader is slow); otherwise the stream is written. stdout is refused when it
   * is a terminal. Unless `sync` is false, a file or device output is synced before
   * the promise resolves. On failure, an output file this call created is removed.
   */
  writeTo(target: Endpoint): Promise<void>;
}

/** A planned qcow2 export (see {@link exportQcow2}). */
export type Qcow2Export = PlannedExport<StreamLayout>;
