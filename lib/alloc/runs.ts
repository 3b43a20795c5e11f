/**
 * Runs of consecutive clusters: the shape in which cluster sets, extents and
 * allocation hints are walked by the writers and the export plan.
 *
 * @module
 */
import type { ClusterSet } from "./cluster_set.ts";

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
