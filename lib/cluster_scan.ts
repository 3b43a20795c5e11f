/**
 * The first pass of an export: reading the clusters that may matter, window by
 * window (a few megabytes at a time, consecutive clusters coalesced into one read),
 * with the next window read while the current one is examined. Used by the plain
 * export (find non-zero clusters) and by diffs (compare with the base).
 *
 * @module
 */
import { ClusterSet } from "./cluster_set.ts";
import type { DiskSource } from "./disk_source.ts";
import { CHUNK_SIZE } from "./io.ts";
import { dataExtents } from "./seek_data.ts";

/** Consecutive clusters `[first, last]`, both inclusive. */
export type Run = readonly [first: number, last: number];

/**
 * Cluster runs covering the byte extents `[start, end)` (ascending), rounded outwards
 * to whole clusters (a partial last cluster counts), merged, clipped to `clusters`.
 */
export function* extentRuns(
  extents: Iterable<readonly [number, number]>,
  clusterSize: number,
  clusters: number,
): Generator<Run> {
  let cur: [number, number] | null = null;
  for (const [start, end] of extents) {
    if (end <= start) continue;
    const first = Math.floor(start / clusterSize);
    const last = Math.min(clusters - 1, Math.ceil(end / clusterSize) - 1);
    if (first > last) continue;
    if (cur !== null && first <= cur[1] + 1) {
      cur[1] = Math.max(cur[1], last);
      continue;
    }
    if (cur !== null) yield cur;
    cur = [first, last];
  }
  if (cur !== null) yield cur;
}

/** The maximal runs of `set`, ascending; skips empty and full words at once. */
export function* setRuns(set: ClusterSet): Generator<Run> {
  for (let i = set.nextSet(0); i >= 0;) {
    const end = set.nextClear(i);
    yield [i, end - 1];
    i = end < set.length ? set.nextSet(end) : -1;
  }
}

/** All of `clusters` as one run (nothing when there are none). */
export function* allRuns(clusters: number): Generator<Run> {
  if (clusters > 0) yield [0, clusters - 1];
}

/** The union of two ascending run lists, ascending and merged. */
export function* unionRuns(a: Iterable<Run>, b: Iterable<Run>): Generator<Run> {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  let ra = ia.next();
  let rb = ib.next();
  let cur: [number, number] | null = null;
  while (!ra.done || !rb.done) {
    let next: Run;
    if (rb.done || (!ra.done && ra.value[0] <= rb.value[0])) {
      next = ra.value as Run;
      ra = ia.next();
    } else {
      next = rb.value;
      rb = ib.next();
    }
    if (cur !== null && next[0] <= cur[1] + 1) {
      cur[1] = Math.max(cur[1], next[1]);
    } else {
      if (cur !== null) yield cur;
      cur = [next[0], next[1]];
    }
  }
  if (cur !== null) yield cur;
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

async function readWindow(
  input: ScanInput,
  buf: Uint8Array,
  first: number,
  parts: Run[],
  clusterSize: number,
): Promise<number> {
  let bytes = 0;
  for (const [a, b] of parts) {
    for (let c = a; c <= b;) {
      if (!input.wants(c)) {
        c++;
        continue;
      }
      let end = c;
      while (end < b && input.wants(end + 1)) end++;
      const at = (c - first) * clusterSize;
      const len = (end - c + 1) * clusterSize;
      await input.source.readAt(buf.subarray(at, at + len), c * clusterSize, input.limit);
      bytes += len;
      c = end + 1;
    }
  }
  return bytes;
}

/**
 * Reads `runs` of clusters from every input window by window and calls `visit` for
 * each window, reading the next window meanwhile. `onRead` gets the bytes read.
 */
export async function scanWindows(
  runs: Iterable<Run>,
  clusterSize: number,
  inputs: ScanInput[],
  visit: (window: ScanWindow) => void,
  onRead: (bytes: number) => void = () => {},
  windowBytes = CHUNK_SIZE,
): Promise<void> {
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
 * hole detection is available, else every cluster.
 */
export function candidatesOf(
  source: DiskSource,
  size: number,
  clusterSize: number,
  hint?: ClusterSet,
  zeroCheck = false,
): Candidates {
  const clusters = Math.ceil(size / clusterSize);
  if (hint !== undefined) return { clusters, set: hint, trusted: !zeroCheck };
  const extents = source.isFile ? dataExtents(source.path, Math.min(size, source.size)) : null;
  if (extents === null) return { clusters, set: null, trusted: false };
  const set = new ClusterSet(clusters, clusterSize);
  for (const [first, last] of extentRuns(extents, clusterSize, clusters)) set.addRange(first, last);
  return { clusters, set, trusted: false };
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
