/**
 * The first pass of an export: reading the clusters that may matter, window by
 * window (consecutive clusters coalesced into one read). Used by the plain export
 * (find non-zero clusters) and by diffs (compare with the base).
 *
 * Sources that read synchronously (files and devices) are read in 1 MiB windows: the
 * first input with blocking reads on the main thread while the others (a diff's base)
 * are read on Deno's I/O threads, so the two disks are read at the same time on two
 * processors. Measured, blocking reads cost the CPU time of `cat` (the window stays in
 * the processor's cache for the comparison, no thread hand-off per read), while
 * asynchronous 4 MiB reads of both cost twice as much. Other sources (network
 * transports) are read asynchronously, the next window of every input while the
 * current one is examined.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import { ClusterSet } from "../alloc/cluster_set.ts";
import type { DiskSource } from "../io/disk_source.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { allRuns, extentRuns, type Run, setRuns } from "../alloc/runs.ts";

/** Window of a synchronous scan: small enough to stay in the processor's cache. */
const SYNC_WINDOW = 1024 * 1024;
/**
 * Window of a scan of a source read with O_DIRECT: without readahead each read is one
 * request to the device, so the requests are large.
 */
const DIRECT_WINDOW = 8 * 1024 * 1024;
/** Bytes read between two yields to the event loop in a synchronous scan. */
export const YIELD_BYTES = 64 * 1024 * 1024;

/** Lets timers, signals and progress run during long synchronous work. */
export function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** One input of a scan. */
export interface ScanInput {
  source: DiskSource;
  /** Bytes at or past this offset read as zeros (e.g. the source size). */
  limit: number;
  /** Which clusters of the runs to read; the others' bytes in the buffer are stale. */
  wants(cluster: number): boolean;
}

/** A window of a scan: the parts of the runs that lie in `[first, first + span)`. */
export interface ScanWindow {
  /** First cluster of the window (byte 0 of each buffer). */
  first: number;
  /** The parts of the scanned runs inside the window, ascending. */
  parts: Run[];
  /** One buffer per input: cluster c at `(c - first) * clusterSize`. */
  buffers: Uint8Array[];
}

/** Cuts ascending runs into windows of at most `span` clusters. */
function* windowsOf(runs: Iterable<Run>, span: number): Generator<{ first: number; parts: Run[] }> {
  let first = -1;
  let parts: Run[] = [];
  for (const run of runs) {
    let [a, b] = run;
    while (a <= b) {
      if (first >= 0 && a >= first + span) {
        yield { first, parts };
        first = -1;
        parts = [];
      }
      if (first < 0) first = a;
      const end = Math.min(b, first + span - 1);
      parts.push([a, end]);
      a = end + 1;
    }
  }
  if (first >= 0) yield { first, parts };
}

/** The wanted clusters of `parts` as maximal runs `[first, last]`. */
function* wantedRuns(input: ScanInput, parts: Run[]): Generator<Run> {
  for (const [a, b] of parts) {
    for (let c = a; c <= b;) {
      if (!input.wants(c)) {
        c++;
        continue;
      }
      let end = c;
      while (end < b && input.wants(end + 1)) end++;
      yield [c, end];
      c = end + 1;
    }
  }
}

async function readWindow(
  input: ScanInput,
  buf: Uint8Array,
  first: number,
  parts: Run[],
  clusterSize: number,
): Promise<number> {
  let bytes = 0;
  for (const [c, end] of wantedRuns(input, parts)) {
    const at = (c - first) * clusterSize;
    const len = (end - c + 1) * clusterSize;
    await input.source.readAt(buf.subarray(at, at + len), c * clusterSize, input.limit);
    bytes += len;
  }
  return bytes;
}

function readWindowSync(
  input: ScanInput,
  buf: Uint8Array,
  first: number,
  parts: Run[],
  clusterSize: number,
): number {
  let bytes = 0;
  for (const [c, end] of wantedRuns(input, parts)) {
    const at = (c - first) * clusterSize;
    const len = (end - c + 1) * clusterSize;
    input.source.readAtSync!(buf.subarray(at, at + len), c * clusterSize, input.limit);
    bytes += len;
  }
  return bytes;
}

/** {@link scanWindows} for inputs that all read synchronously (see the module notes). */
async function scanWindowsSync(
  runs: Iterable<Run>,
  clusterSize: number,
  inputs: ScanInput[],
  visit: (window: ScanWindow) => void,
  onRead: (bytes: number) => void,
  windowBytes: number,
): Promise<void> {
  const span = Math.max(1, Math.floor(windowBytes / clusterSize));
  const buffers = inputs.map(() => new Uint8Array(span * clusterSize));
  let sinceYield = 0;
  for (const { first, parts } of windowsOf(runs, span)) {
    let bytes = 0;
    // The other inputs (a diff's base) are read on Deno's I/O threads meanwhile.
    const others = inputs.slice(1).map((input, k) =>
      readWindow(input, buffers[k + 1], first, parts, clusterSize)
    );
    bytes += readWindowSync(inputs[0], buffers[0], first, parts, clusterSize);
    for (const n of await Promise.all(others)) bytes += n;
    onRead(bytes);
    visit({ first, parts, buffers });
    if ((sinceYield += bytes) >= YIELD_BYTES) {
      sinceYield = 0;
      await yieldToEventLoop();
    }
  }
}

/**
 * Reads `runs` of clusters from every input window by window and calls `visit` for
 * each window (see the module notes for how). `onRead` gets the bytes read.
 */
export async function scanWindows(
  runs: Iterable<Run>,
  clusterSize: number,
  inputs: ScanInput[],
  visit: (window: ScanWindow) => void,
  onRead: (bytes: number) => void = () => {},
  windowBytes?: number,
): Promise<void> {
  if (inputs.every((input) => input.source.readAtSync !== undefined)) {
    const direct = inputs.some((input) => input.source.direct);
    windowBytes ??= direct ? DIRECT_WINDOW : SYNC_WINDOW;
    return scanWindowsSync(runs, clusterSize, inputs, visit, onRead, windowBytes);
  }
  windowBytes ??= CHUNK_SIZE;
  const span = Math.max(1, Math.floor(windowBytes / clusterSize));
  const buffers = [0, 1].map(() => inputs.map(() => new Uint8Array(span * clusterSize)));
  const read = (w: { first: number; parts: Run[] }, slot: number) =>
    Promise.all(
      inputs.map((input, k) => readWindow(input, buffers[slot][k], w.first, w.parts, clusterSize)),
    );
  const windows = windowsOf(runs, span);
  let cur = windows.next();
  let pending = cur.done ? null : read(cur.value, 0);
  let slot = 0;
  while (!cur.done) {
    const done = await pending!;
    onRead(done.reduce((s, n) => s + n, 0));
    const next = windows.next();
    pending = next.done ? null : read(next.value, 1 - slot);
    try {
      visit({ first: cur.value.first, parts: cur.value.parts, buffers: buffers[slot] });
    } catch (err) {
      await pending?.catch(() => {});
      throw err;
    }
    cur = next;
    slot = 1 - slot;
  }
}

/** The clusters of a disk that may hold data, and whether that is taken on trust. */
export interface Candidates {
  /** Clusters of the disk (`ceil(size / clusterSize)`). */
  clusters: number;
  /** The clusters that may hold data; null = every cluster. */
  set: ClusterSet | null;
  /** True for a hint taken as it is (no --zero-check): its clusters are data unread. */
  trusted: boolean;
}

/**
 * The candidate clusters of `source` (its first `size` bytes): the `hint` when there
 * is one (trusted unless `zeroCheck`), else the data extents of a regular file when
 * the source knows its data extents (hole detection, block status; a remote
 * source's are trusted unless `zeroCheck`), else every cluster.
 */
export async function candidatesOf(
  source: DiskSource,
  size: number,
  clusterSize: number,
  hint?: ClusterSet,
  zeroCheck = false,
): Promise<Candidates> {
  const clusters = Math.ceil(size / clusterSize);
  if (hint !== undefined) return { clusters, set: hint, trusted: !zeroCheck };
  const extents = await source.extents(size);
  if (extents === null) return { clusters, set: null, trusted: false };
  const set = new ClusterSet(clusters, clusterSize);
  for (const [first, last] of extentRuns(extents, clusterSize, clusters)) set.addRange(first, last);
  return { clusters, set, trusted: source.remote === true && !zeroCheck };
}

/** True when cluster `i` is a candidate. */
export function isCandidate(c: Candidates, i: number): boolean {
  return c.set === null ? i < c.clusters : c.set.has(i);
}

/** The candidate clusters as ascending runs. */
export function candidateRuns(c: Candidates): Iterable<Run> {
  return c.set === null ? allRuns(c.clusters) : setRuns(c.set);
}

/** Number of candidate clusters. */
export function candidateCount(c: Candidates): number {
  return c.set === null ? c.clusters : c.set.count;
}
