/**
 * Pass 1 of an export, the plan: which clusters to write — the non-zero ones (the
 * data extents are read, or everything), the hinted ones (`allocation`), or those
 * that differ from a base disk (`base`, see diff.ts).
 *
 * @module
 */
import type { Allocation } from "../alloc/allocation.ts";
import { alignUp } from "../bytes.ts";
import {
  candidateCount,
  candidateRuns,
  type Candidates,
  candidatesOf,
  scanWindows,
  YIELD_BYTES,
  yieldToEventLoop,
} from "./scan.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { diffScanBytes, planDiff } from "./diff.ts";
import { type DiskSource, openDiskSource } from "../io/disk_source.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { alignedBuffer } from "../io/direct_io.ts";
import { DiskstreamError, InterruptedError, UsageError } from "../errors.ts";
import type { ProgressSink } from "../progress.ts";
import { zeroTest } from "../zero.ts";
import { isNbdUri } from "../nbd/uri.ts";
import type { StreamExportOptions } from "./options.ts";

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
/** Bytes read ahead at a time for the probes. */
const PREFETCH_BYTES = 8 * 1024 * 1024;
/** Probes read at a time (one system call where the source batches its reads). */
const PROBE_BATCH = 256;
/** Clusters of this size and more are probed first (smaller ones are read whole). */
const PROBE_MIN_CLUSTER = 4 * PROBE_BYTES;

/** Pass 1 without a base: the candidate clusters that hold a non-zero byte. */
async function planNonZero(
  source: DiskSource,
  candidates: Candidates,
  clusterSize: number,
  onRead: (bytes: number) => void,
): Promise<ClusterSet> {
  if (candidates.trusted && candidates.set !== null) return candidates.set;
  const out = new ClusterSet(candidates.clusters, clusterSize);
  // A remote source is scanned in large reads: a probe per cluster would be a round trip
  // each; so is a source read with O_DIRECT, unless its probes go to the device
  // together (one at a time, each would wait for the device).
  if (
    clusterSize >= PROBE_MIN_CLUSTER && !source.remote && (!source.direct || source.batchedReads)
  ) {
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
 * known from one small read; only from a zero probe on are the clusters read whole
 * (4 MiB at a time) and tested. A fully allocated disk is decided from 1/16 of its
 * bytes at 64 KiB clusters; the decisions are the same as a full read's. The probes
 * go in batches of {@link PROBE_BATCH}, one system call each where the source can
 * (`readManySync`, io_uring), else one read each.
 */
async function probeNonZero(
  source: DiskSource,
  candidates: Candidates,
  cs: number,
  out: ClusterSet,
  onRead: (bytes: number) => void,
): Promise<void> {
  const size = PROBE_BATCH * PROBE_BYTES;
  const probes = source.direct ? alignedBuffer(size) : new Uint8Array(size); // O_DIRECT: aligned
  const probeIsZero = zeroTest(probes);
  const positions = new Float64Array(PROBE_BATCH);
  const window = new Uint8Array(Math.max(cs, Math.floor(CHUNK_SIZE / cs) * cs));
  const windowZero = zeroTest(window);
  const span = window.length / cs;
  let sinceYield = 0;
  let ahead = 0; // read ahead up to here
  for (const [a, b] of candidateRuns(candidates)) {
    for (let c = a; c <= b;) {
      const n = Math.min(PROBE_BATCH, b - c + 1);
      // Probes are small reads 64 KiB apart, which the kernel does not read ahead by
      // itself: on a cold disk each would be one request (measured 52 s for 1 GiB on a
      // loop device, against 7.5 s for one sequential read).
      if ((c + n) * cs + PREFETCH_BYTES / 2 > ahead) {
        const from = Math.max(ahead, c * cs);
        ahead = Math.min((b + 1) * cs, (c + n) * cs + PREFETCH_BYTES);
        source.prefetch?.(from, ahead - from);
      }
      for (let i = 0; i < n; i++) positions[i] = (c + i) * cs;
      await readProbes(source, probes, positions, n);
      let i = 0;
      while (i < n) {
        if (!probeIsZero(i * PROBE_BYTES, (i + 1) * PROBE_BYTES)) {
          out.add(c + i++);
          onRead(cs);
          sinceYield += cs;
          continue;
        }
        // A zero probe: the clusters from here are read whole (past this batch too).
        const first = c + i;
        const count = Math.min(b - first + 1, span);
        await source.readAt(window.subarray(0, count * cs), first * cs);
        for (let k = 0; k < count; k++) {
          if (!windowZero(k * cs, (k + 1) * cs)) out.add(first + k);
        }
        onRead(count * cs);
        i += count;
      }
      c += i;
      if (sinceYield >= YIELD_BYTES) {
        sinceYield = 0;
        await yieldToEventLoop();
      }
    }
  }
}

/** Fills the probe slots: in one batch where the source can, else one read each. */
async function readProbes(
  source: DiskSource,
  probes: Uint8Array,
  positions: Float64Array,
  count: number,
): Promise<void> {
  if (source.readManySync) return source.readManySync(probes, PROBE_BYTES, positions, count);
  for (let i = 0; i < count; i++) {
    const slot = probes.subarray(i * PROBE_BYTES, (i + 1) * PROBE_BYTES);
    if (source.readAtSync) source.readAtSync(slot, positions[i]);
    else await source.readAt(slot, positions[i]);
  }
}

/** Opens a source or base: a file or device, or an NBD export (`nbd://…`). */
export async function openSource(
  path: string,
  options: StreamExportOptions,
  direct = options.direct,
): Promise<DiskSource> {
  if (!isNbdUri(path)) return await openDiskSource(path, { direct });
  const { NbdSource } = await import("../nbd/source.ts");
  return await NbdSource.open(path, { ...options.nbd, signal: options.signal });
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
 * size and the exact size before anything is read (to refuse a disk the format cannot
 * hold).
 */
export async function planExport(
  source: string | DiskSource,
  options: StreamExportOptions,
  cs: number,
  check: (virtualSize: number, size: number) => void,
): Promise<ExportPlan> {
  if (options.baseAllocation !== undefined && options.base === undefined) {
    throw new UsageError("a base allocation needs a base disk (--base-allocation needs --diff)");
  }
  const progress = options.progress;
  const stopped = (err: unknown) =>
    err instanceof InterruptedError
      ? err.retell(
        `export of ${
          typeof source === "string" ? source : source.path
        } interrupted by ${err.signal} while reading what to export: ` +
          `nothing was written`,
      )
      : err;
  // Opening an NBD source waits for its server: a signal stops that too.
  const src = typeof source === "string"
    ? await openSource(source, options).catch((err) => {
      throw stopped(err);
    })
    : source;
  try {
    const virtualSize = alignUp(src.size, 512);
    check(virtualSize, src.size);
    const hint = options.allocation &&
      hintClusters(options.allocation, src.size, cs, "the allocation hint", src.path);
    const sourceCandidates = await candidatesOf(src, virtualSize, cs, hint, options.zeroCheck);
    let scanned = 0;
    const onRead = (bytes: number) => {
      options.signal?.throwIfAborted();
      scanned += bytes;
      progress?.update(scanned);
    };
    let clusters: ClusterSet;
    if (options.base !== undefined) {
      clusters = await planAgainstBase(
        src,
        options.base,
        options.baseAllocation,
        options,
        sourceCandidates,
        cs,
        progress,
        onRead,
        options.direct,
      );
    } else {
      const estimate = sourceCandidates.trusted ? 0 : candidateCount(sourceCandidates) * cs;
      if (estimate > 0) progress?.setTotal(2 * estimate);
      clusters = await planNonZero(src, sourceCandidates, cs, onRead);
    }
    options.signal?.throwIfAborted();
    return { src, virtualSize, clusters, scanned };
  } catch (err) {
    src.close();
    throw stopped(err);
  }
}

/** Pass 1 with a base: the clusters that differ from it (lib/diff.ts). */
async function planAgainstBase(
  src: DiskSource,
  basePath: string,
  baseAllocation: Allocation | undefined,
  options: StreamExportOptions,
  sourceCandidates: Candidates,
  cs: number,
  progress: ProgressSink | undefined,
  onRead: (bytes: number) => void,
  direct?: boolean,
): Promise<ClusterSet> {
  const base = await openSource(basePath, options, direct);
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
      baseCandidates: await candidatesOf(base, baseLimit, cs, baseHint),
      onRead,
    };
    const estimate = diffScanBytes(input);
    if (estimate > 0) progress?.setTotal(2 * estimate);
    return await planDiff(input);
  } finally {
    base.close();
  }
}
