/**
 * Export: a raw disk (regular file or block device) as an image stream, without a
 * temporary file and without seeking the output. First the plan — which clusters
 * to write: the non-zero ones (pass 1 reads the data extents, or everything), the
 * hinted ones (`allocation`), or those that differ from a base disk (`base`) — then
 * pass 2 writes the image from the plan, reading the planned clusters straight into
 * the output chunks or copying them in the kernel. The plan and pass 2 are shared by
 * the formats: qcow2 here (the layout of QEMU's `qcow2-to-stdout.py`), VHD in
 * export_vhd.ts (2 MiB blocks).
 *
 * @module
 */
import { setImmediate } from "node:timers";
import type { Allocation } from "./allocation.ts";
import { alignUp } from "./bytes.ts";
import {
  candidateCount,
  candidateRuns,
  type Candidates,
  candidatesOf,
  scanWindows,
  setRuns,
} from "./cluster_scan.ts";
import { ClusterSet } from "./cluster_set.ts";
import { diffScanBytes, planDiff } from "./diff.ts";
import { type DiskSource, openDiskSource } from "./disk_source.ts";
import { CHUNK_SIZE, type Endpoint, endpointName, openOutput, pipeToOutput } from "./io.ts";
import { COPY_STEP, type KernelCopy, openKernelCopy } from "./kernel_copy.ts";
import { DiskstreamError, SourceChangedError, UsageError } from "./errors.ts";
import {
  checkGeometry,
  DEFAULT_CLUSTER_SIZE,
  DEFAULT_REFCOUNT_BITS,
  l1Geometry,
  type StreamLayout,
  streamLayout,
} from "./qcow2/layout.ts";
import {
  countL2Tables,
  qcow2Chunks,
  qcow2MetadataChunks,
  type WriterOptions,
} from "./qcow2/writer.ts";
import type { ProgressSink } from "./progress.ts";
import { endpointPath, sameFile } from "./same_file.ts";
import { zeroTest } from "./zero.ts";

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
  /** Export only what differs from this base disk (path of a raw file or device). */
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
   * is a terminal.
   */
  writeTo(target: Endpoint): Promise<void>;
}

/** A planned qcow2 export (see {@link exportQcow2}). */
export type Qcow2Export = PlannedExport<StreamLayout>;

/**
 * The clusters (at `clusterSize`, within the first `clip` bytes) that a hint for a
 * disk of `size` bytes names, refusing a hint made for a disk of another size.
 */
function hintClusters(
  hint: Allocation,
  size: number,
  clusterSize: number,
  what: string,
  path: string,
  clip = size,
): ClusterSet {
  if (hint.virtualSize !== size && hint.virtualSize !== alignUp(size, 512)) {
    throw new DiskstreamError(
      `${what} describes a disk of ${hint.virtualSize} bytes but ${path} has ${size} bytes: ` +
        `the allocation does not belong to this disk`,
    );
  }
  const set = hint.clusters;
  return set.clusterSize === clusterSize && set.length === Math.ceil(clip / clusterSize)
    ? set
    : set.remap(clusterSize, clip);
}

/** Bytes read first from each cluster by the probing pass 1. */
const PROBE_BYTES = 4096;
/** Clusters of this size and more are probed first (smaller ones are read whole). */
const PROBE_MIN_CLUSTER = 4 * PROBE_BYTES;
/** Bytes examined between two yields to the event loop in the synchronous probing. */
const YIELD_BYTES = 64 * 1024 * 1024;

/** Pass 1 without a base: the candidate clusters that hold a non-zero byte. */
async function planNonZero(
  source: DiskSource,
  candidates: Candidates,
  clusterSize: number,
  onRead: (bytes: number) => void,
): Promise<ClusterSet> {
  if (candidates.trusted && candidates.set !== null) return candidates.set;
  const out = new ClusterSet(candidates.clusters, clusterSize);
  if (clusterSize >= PROBE_MIN_CLUSTER) {
    await probeNonZero(source, candidates, clusterSize, out, onRead);
    return out;
  }
  await scanWindows(
    candidateRuns(candidates),
    clusterSize,
    [{ source, limit: source.size, wants: () => true }],
    ({ first, parts, buffers: [buf] }) => {
      const zero = zeroTest(buf);
      for (const [a, b] of parts) {
        const start = (a - first) * clusterSize;
        if (zero(start, (b - first + 1) * clusterSize)) continue;
        for (let c = a, at = start; c <= b; c++, at += clusterSize) {
          if (!zero(at, at + clusterSize)) out.add(c);
        }
      }
    },
    onRead,
  );
  return out;
}

/**
 * Pass 1 for large clusters: a cluster whose first 4 KiB hold a non-zero byte is data,
 * known from one small synchronous read; only from a zero probe on are the clusters
 * read whole (4 MiB at a time) and tested. A fully allocated disk is decided from
 * 1/16 of its bytes at 64 KiB clusters; the decisions are the same as a full read's.
 */
async function probeNonZero(
  source: DiskSource,
  candidates: Candidates,
  cs: number,
  out: ClusterSet,
  onRead: (bytes: number) => void,
): Promise<void> {
  const probe = new Uint8Array(PROBE_BYTES);
  const probeIsZero = zeroTest(probe);
  const window = new Uint8Array(Math.max(cs, Math.floor(CHUNK_SIZE / cs) * cs));
  const windowZero = zeroTest(window);
  const span = window.length / cs;
  let sinceYield = 0;
  for (const [a, b] of candidateRuns(candidates)) {
    for (let c = a; c <= b;) {
      source.readAtSync(probe, c * cs);
      if (!probeIsZero(0, PROBE_BYTES)) {
        out.add(c++);
        onRead(cs);
        if ((sinceYield += cs) >= YIELD_BYTES) {
          sinceYield = 0;
          await new Promise((resolve) => setImmediate(resolve));
        }
        continue;
      }
      const count = Math.min(b - c + 1, span);
      await source.readAt(window.subarray(0, count * cs), c * cs);
      for (let k = 0; k < count; k++) {
        if (!windowZero(k * cs, (k + 1) * cs)) out.add(c + k);
      }
      onRead(count * cs);
      c += count;
    }
  }
}

/**
 * Plans the export of the raw disk at `source` as a qcow2 v3 image and returns the
 * image as a stream of large chunks, with its layout. Without `allocation`, the
 * all-zero clusters are left out and the bytes are those QEMU's
 * `scripts/qcow2-to-stdout.py` writes for the same input and options.
 *
 * Memory: one bit per cluster (a few bitmaps) and a few chunk buffers. Errors are
 * {@link DiskstreamError}s (missing source, hint for another disk, disk too large for
 * the cluster size, source changed size between the passes, ...).
 *
 * @example Export a sparse disk to a qcow2 file
 * ```ts
 * import { exportQcow2 } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = `${dir}/disk.raw`;
 * // A 64 MiB disk holding 1 MiB of data at 16 MiB; the rest is a hole.
 * const file = await Deno.open(disk, { write: true, create: true });
 * await file.truncate(64 << 20);
 * await file.seek(16 << 20, Deno.SeekMode.Start);
 * await file.write(new Uint8Array(1 << 20).fill(0xab));
 * file.close();
 *
 * const exported = await exportQcow2(disk, { clusterSize: 65536 });
 * assert.equal(exported.clusters.count, 16); // 1 MiB in 64 KiB clusters
 * assert.deepEqual([...exported.clusters.runs()], [[256, 271]]);
 * await Deno.writeFile(`${dir}/disk.qcow2`, exported.stream);
 * assert.equal((await Deno.stat(`${dir}/disk.qcow2`)).size, exported.layout.fileSize);
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @example Write the image to a file, the data copied by the kernel
 * ```ts
 * import { exportQcow2 } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(3 << 20).fill(7));
 * const exported = await exportQcow2(`${dir}/disk.raw`, { clusterSize: 2 << 20 });
 * await exported.writeTo({ kind: "path", path: `${dir}/disk.qcow2` });
 * assert.equal((await Deno.stat(`${dir}/disk.qcow2`)).size, exported.layout.fileSize);
 * assert.equal(exported.layout.dataClusters, 2); // the second 2 MiB cluster half full
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @example Export only what differs from a base disk, with an allocation hint
 * ```ts
 * import { ClusterSet, exportQcow2 } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const base = new Uint8Array(4 << 20).fill(1);
 * const changed = base.slice();
 * changed.fill(2, 3 << 20, (3 << 20) + 10); // 10 bytes of cluster 48 change
 * await Deno.writeFile(`${dir}/base.raw`, base);
 * await Deno.writeFile(`${dir}/new.raw`, changed);
 * // The hint says where the new disk may hold data (here: everywhere).
 * const clusters = new ClusterSet(2, 2 << 20);
 * clusters.addRange(0, 1);
 * const diff = await exportQcow2(`${dir}/new.raw`, {
 *   base: `${dir}/base.raw`,
 *   allocation: { virtualSize: 4 << 20, clusters },
 * });
 * assert.deepEqual([...diff.clusters], [48]);
 * await diff.stream.cancel(); // not needed after all: release the source
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exportQcow2(
  source: string,
  options: ExportOptions = {},
): Promise<Qcow2Export> {
  const cs = options.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const refcountBits = options.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  checkGeometry(cs, refcountBits);
  // Refuse a disk too large for the cluster size before reading it.
  const plan = await planExport(source, options, cs, (size) => l1Geometry(size, cs));
  const { src, clusters } = plan;
  return plannedExport(plan, options, (virtualSize) => {
    const layout = streamLayout({
      virtualSize,
      clusterSize: cs,
      refcountBits,
      l2Tables: countL2Tables(clusters, cs / 8),
      dataClusters: clusters.count,
    });
    return {
      layout,
      fileSize: layout.fileSize,
      chunks: (writerOptions) => qcow2Chunks(layout, clusters, src, writerOptions),
      *pieces() {
        yield* qcow2MetadataChunks(layout, clusters);
        for (const [first, last] of setRuns(clusters)) {
          yield { offset: first * cs, length: (last - first + 1) * cs };
        }
      },
    };
  });
}

/** What pass 1 decided: the opened source and the clusters to write. */
export interface ExportPlan {
  /** The source, open; closed by pass 2 (or by the caller when it gives up). */
  src: DiskSource;
  /** The source size rounded up to 512. */
  virtualSize: number;
  /** The clusters (of the planned cluster size) to write. */
  clusters: ClusterSet;
  /** Bytes read while planning. */
  scanned: number;
}

/**
 * Pass 1 of every format: opens `source` and decides which clusters of `clusterSize`
 * bytes to write — a cluster is planned when any byte of it is non-zero, hinted, or
 * differs from the base (see {@link StreamExportOptions}). `check` sees the virtual
 * size before anything is read (to refuse a disk the format cannot hold).
 */
export async function planExport(
  source: string,
  options: StreamExportOptions,
  cs: number,
  check: (virtualSize: number) => void,
): Promise<ExportPlan> {
  if (options.baseAllocation !== undefined && options.base === undefined) {
    throw new UsageError("a base allocation needs a base disk (--base-allocation needs --diff)");
  }
  const progress = options.progress;
  const src = await openDiskSource(source);
  try {
    const virtualSize = alignUp(src.size, 512);
    check(virtualSize);
    const hint = options.allocation &&
      hintClusters(options.allocation, src.size, cs, "the allocation hint", src.path);
    const sourceCandidates = candidatesOf(src, virtualSize, cs, hint, options.zeroCheck);
    let scanned = 0;
    const onRead = (bytes: number) => {
      scanned += bytes;
      progress?.update(scanned);
    };
    let clusters: ClusterSet;
    if (options.base !== undefined) {
      clusters = await planAgainstBase(
        src,
        options.base,
        options.baseAllocation,
        sourceCandidates,
        cs,
        progress,
        onRead,
      );
    } else {
      const estimate = sourceCandidates.trusted ? 0 : candidateCount(sourceCandidates) * cs;
      if (estimate > 0) progress?.setTotal(2 * estimate);
      clusters = await planNonZero(src, sourceCandidates, cs, onRead);
    }
    return { src, virtualSize, clusters, scanned };
  } catch (err) {
    src.close();
    throw err;
  }
}

/** Source bytes `[offset, offset + length)` to copy; those past the source's end are zeros. */
export interface SourceRange {
  offset: number;
  length: number;
}

/** How pass 2 writes one format's image from a plan. */
export interface ImageWriter<Layout> {
  layout: Layout;
  /** Exact length of the image in bytes. */
  fileSize: number;
  /** The image as chunks of megabytes, data read from the source into them. */
  chunks(options: WriterOptions): AsyncGenerator<Uint8Array>;
  /** The image as bytes to write and source ranges to copy (for kernel copies). */
  pieces(): Iterable<Uint8Array | SourceRange>;
}

/**
 * The export of a plan in the format `writer` makes for the plan's virtual size:
 * its stream or {@link PlannedExport.writeTo}. Closes the source if that fails.
 */
export function plannedExport<Layout>(
  plan: ExportPlan,
  options: StreamExportOptions,
  writer: (virtualSize: number) => ImageWriter<Layout>,
): PlannedExport<Layout> {
  const { src, clusters, scanned } = plan;
  try {
    const image = writer(plan.virtualSize);
    options.progress?.setTotal(scanned + image.fileSize);
    const pass2 = new Pass2(src, image, options.progress, scanned, {
      chunkSize: options.chunkSize,
      reuseBuffers: options.reuseBuffers,
      sourceSize: src.size,
    }, [
      ["source", src.path],
      ...(options.base === undefined ? [] : [["base", options.base]] as [string, string][]),
    ]);
    return {
      // Made on first use: a ReadableStream starts pulling (prefetching) at once.
      get stream() {
        return pass2.stream();
      },
      layout: image.layout,
      clusters,
      sourceSize: src.size,
      scannedBytes: scanned,
      writeTo: (target) => pass2.writeTo(target),
    };
  } catch (err) {
    src.close();
    throw err;
  }
}

/** Pass 1 with a base: the clusters that differ from it (lib/diff.ts). */
async function planAgainstBase(
  src: DiskSource,
  basePath: string,
  baseAllocation: Allocation | undefined,
  sourceCandidates: Candidates,
  cs: number,
  progress: ProgressSink | undefined,
  onRead: (bytes: number) => void,
): Promise<ClusterSet> {
  const base = await openDiskSource(basePath);
  try {
    const virtualSize = alignUp(src.size, 512);
    const baseLimit = Math.min(base.size, virtualSize);
    const baseHint = baseAllocation &&
      hintClusters(baseAllocation, base.size, cs, "the base allocation hint", base.path, baseLimit);
    const input = {
      source: src,
      base,
      clusterSize: cs,
      virtualSize,
      sourceCandidates,
      baseCandidates: candidatesOf(base, baseLimit, cs, baseHint),
      onRead,
    };
    const estimate = diffScanBytes(input);
    if (estimate > 0) progress?.setTotal(2 * estimate);
    return await planDiff(input);
  } finally {
    base.close();
  }
}

/** Pass 2: the image from the plan, as a stream or written to an endpoint. */
class Pass2<Layout> {
  #sent = 0;
  #started = false;
  #stream: ReadableStream<Uint8Array> | null = null;

  constructor(
    readonly src: DiskSource,
    readonly image: ImageWriter<Layout>,
    readonly progress: ProgressSink | undefined,
    readonly scanned: number,
    readonly writerOptions: WriterOptions,
    /** Files the output must not be: the source, and the base of a diff. */
    readonly protect: [role: string, path: string][],
  ) {}

  /** Refuses a second start and a source whose size changed since pass 1. */
  async #start(): Promise<void> {
    if (this.#started) throw new UsageError("an export can be written only once");
    this.#started = true;
    const now = await this.src.currentSize();
    if (now !== this.src.size) {
      throw new SourceChangedError(
        `${this.src.path} changed size between the passes (${this.src.size} → ${now} bytes); export it again`,
      );
    }
  }

  #sentBytes(bytes: number): void {
    this.#sent += bytes;
    this.progress?.update(this.scanned + this.#sent);
  }

  /** The image as a ReadableStream (made once) that prefetches two chunks. */
  stream(): ReadableStream<Uint8Array> {
    this.#stream ??= this.#makeStream();
    return this.#stream;
  }

  #makeStream(): ReadableStream<Uint8Array> {
    const { src, image, writerOptions } = this;
    let chunks: AsyncGenerator<Uint8Array> | null = null;
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          if (chunks === null) {
            await this.#start();
            chunks = image.chunks(writerOptions);
          }
          const r = await chunks.next();
          if (r.done) {
            src.close();
            this.progress?.finish();
            controller.close();
            return;
          }
          this.#sentBytes(r.value.length);
          controller.enqueue(r.value);
        } catch (err) {
          src.close();
          throw err;
        }
      },
      cancel: async () => {
        src.close();
        await chunks?.return(undefined).catch(() => {});
      },
    }, new CountQueuingStrategy({ highWaterMark: 2 }));
  }

  /** Writes the image to `target`, with kernel copies of the data when possible. */
  async writeTo(target: Endpoint): Promise<void> {
    if (this.#stream !== null || this.#started) {
      throw new UsageError("an export can be written only once");
    }
    if (target.kind === "std") await openOutput(target); // refuses a terminal
    const out = endpointPath(target, "stdout");
    for (const [role, path] of this.protect) {
      if (await sameFile(out, path)) {
        throw new UsageError(
          `the output ${
            endpointName(target, "stdout")
          } is the ${role} itself (${path}): write elsewhere`,
        );
      }
    }
    const copier = openKernelCopy(
      this.src.path,
      target.kind === "path" ? { path: target.path } : { fd: target.kind === "fd" ? target.fd : 1 },
      endpointName(target, "stdout"),
    );
    if (copier === null) return await pipeToOutput(this.stream(), await openOutput(target));
    try {
      await this.#start();
      await this.#copyWith(copier);
    } finally {
      copier.close();
      this.src.close();
    }
    this.progress?.finish();
  }

  async #copyWith(copier: KernelCopy): Promise<void> {
    const src = this.src;
    for (const piece of this.image.pieces()) {
      if (piece instanceof Uint8Array) {
        copier.write(piece);
        this.#sentBytes(piece.length);
        continue;
      }
      const end = piece.offset + piece.length;
      for (let at = piece.offset; at < end;) {
        const step = Math.min(COPY_STEP, end - at);
        const real = Math.max(0, Math.min(step, src.size - at));
        if (real > 0) copier.copy(at, real);
        if (real < step) copier.write(new Uint8Array(step - real)); // the last cluster's padding
        this.#sentBytes(step);
        at += step;
        await new Promise((resolve) => setImmediate(resolve)); // let timers and signals run
      }
    }
  }
}
