/**
 * Planning a diff export (`--diff BASE`): which clusters of SOURCE must be written so
 * that the image, with BASE as its backing file, reads exactly as SOURCE (compat.md).
 *
 * For each cluster of SOURCE, with S = clusters SOURCE may hold data in (its
 * allocation hint, else its data extents, else all) and B = the same for BASE:
 * - in S and B: exported when the bytes differ (a cluster that became zero is
 *   exported as a zero data cluster);
 * - only in S: exported when non-zero (unread when S is a trusted hint);
 * - only in B (SOURCE reads zeros there): exported when BASE's bytes are non-zero
 *   (unread when B is a hint: the base holds data there);
 * - in neither: unchanged, left out.
 * BASE past its end reads as zeros (as a backing file does), so a short last base
 * cluster compares equal when SOURCE holds the same bytes and zeros after them, and
 * clusters beyond BASE's size are exported when non-zero.
 *
 * Two plain files or devices are scanned by diff_scan.ts (on two threads when there
 * are 128 MiB or more to read); other disks (network exports, `--direct`, views of
 * other files) window by window by scan.ts.
 *
 * @module
 */
import {
  candidateCount,
  candidateRuns,
  type Candidates,
  isCandidate,
  scanWindows,
} from "./scan.ts";
import { type Run, unionRuns } from "../alloc/runs.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { type DiskSource, type SharedFile, sharedFileOf } from "../io/disk_source.ts";
import { sameTest, zeroTest } from "../zero.ts";
import { BASE_DATA, COMPARE, planDiffJob, runDiffJob, SOURCE_DATA } from "./diff_scan.ts";

/** Below this many bytes to read, a diff is scanned on one thread (a worker's start costs more). */
const HELPER_MIN_BYTES = 128 * 1024 * 1024;

/** What {@link planDiff} needs. */
export interface DiffPlanInput {
  source: DiskSource;
  base: DiskSource;
  clusterSize: number;
  /** Virtual size of the export (SOURCE's size rounded up to 512). */
  virtualSize: number;
  /** SOURCE's candidate clusters. */
  sourceCandidates: Candidates;
  /** BASE's candidate clusters (within BASE's size and the virtual size). */
  baseCandidates: Candidates;
  /** Called with the bytes read as the scan advances. */
  onRead?: (bytes: number) => void;
}

/** Where a cluster is: in SOURCE's candidates, in BASE's, or both. */
type Where = readonly [first: number, last: number, inSource: boolean, inBase: boolean];

/** The clusters of two ascending run lists, cut where membership changes, ascending. */
function* overlay(a: Iterable<Run>, b: Iterable<Run>): Generator<Where> {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  const next = (it: Iterator<Run>): [number, number] | null => {
    const r = it.next();
    return r.done ? null : [r.value[0], r.value[1]];
  };
  let ra = next(ia);
  let rb = next(ib);
  while (ra !== null || rb !== null) {
    const from = Math.min(ra?.[0] ?? Infinity, rb?.[0] ?? Infinity);
    const inA = ra !== null && ra[0] === from;
    const inB = rb !== null && rb[0] === from;
    // Up to where a run ends or the other one starts.
    let to = Infinity;
    if (ra !== null) to = Math.min(to, inA ? ra[1] : ra[0] - 1);
    if (rb !== null) to = Math.min(to, inB ? rb[1] : rb[0] - 1);
    yield [from, to, inA, inB];
    if (inA) ra = to === ra![1] ? next(ia) : [to + 1, ra![1]];
    if (inB) rb = to === rb![1] ? next(ib) : [to + 1, rb![1]];
  }
}

/**
 * The candidate clusters with what decides each (see the module notes): `[first,
 * last, mode]` to read, and through `always` those exported unread (trusted hints).
 */
function* diffRuns(
  S: Candidates,
  B: Candidates,
  always: (first: number, last: number) => void,
): Generator<readonly [number, number, number]> {
  let cur: [number, number, number] | null = null;
  for (const [first, last, s, b] of overlay(candidateRuns(S), candidateRuns(B))) {
    const mode = s && b ? COMPARE : s ? (S.trusted ? 0 : SOURCE_DATA) : B.trusted ? 0 : BASE_DATA;
    if (mode === 0) {
      always(first, last);
      continue;
    }
    if (cur !== null && cur[2] === mode && cur[1] + 1 === first) {
      cur[1] = last;
      continue;
    }
    if (cur !== null) yield cur;
    cur = [first, last, mode];
  }
  if (cur !== null) yield cur;
}

/** Bytes the diff scan will read at most (for progress). */
export function diffScanBytes(input: DiffPlanInput): number {
  const s = candidateCount(input.sourceCandidates);
  const b = candidateCount(input.baseCandidates);
  const both = Math.min(s, b);
  return ((input.sourceCandidates.trusted ? both : s) + (input.baseCandidates.trusted ? both : b)) *
    input.clusterSize;
}

/** The clusters of SOURCE that differ from BASE (see the module notes). */
export async function planDiff(input: DiffPlanInput): Promise<ClusterSet> {
  const { clusterSize: cs, sourceCandidates: S, baseCandidates: B } = input;
  const guest = Math.ceil(input.virtualSize / cs);
  const out = new ClusterSet(guest, cs);
  const inS = (c: number) => isCandidate(S, c);
  const inB = (c: number) => c < B.clusters && isCandidate(B, c);
  const baseLimit = Math.min(input.base.size, input.virtualSize);
  // Two plain files or devices: on two threads (diff_scan.ts).
  const files = [sharedFileOf(input.source), sharedFileOf(input.base)];
  const planned = files[0] && files[1]
    ? planDiffJob(
      diffRuns(S, B, (first, last) => out.addRange(first, last)),
      cs,
      [input.source.size, baseLimit],
    )
    : null;
  if (planned !== null) {
    const { clusters } = await runDiffJob(
      planned.job,
      [input.source, input.base],
      planned.bytes >= HELPER_MIN_BYTES ? files as SharedFile[] : null,
      input.onRead ?? (() => {}),
    );
    for (const c of clusters) out.add(c);
    return out;
  }
  await scanWindows(
    unionRuns(candidateRuns(S), candidateRuns(B)),
    cs,
    [
      {
        source: input.source,
        limit: input.source.size,
        wants: (c) => inS(c) && (inB(c) || !S.trusted),
      },
      { source: input.base, limit: baseLimit, wants: (c) => inB(c) && (inS(c) || !B.trusted) },
    ],
    ({ first, parts, buffers: [src, base] }) => {
      const srcZero = zeroTest(src);
      const baseZero = zeroTest(base);
      const same = sameTest(src, base);
      for (const [a, b] of parts) {
        for (let c = a; c <= b; c++) {
          const s = inS(c);
          const bb = inB(c);
          const at = (c - first) * cs;
          const end = at + cs;
          if (
            s && bb
              ? !same(at, end)
              : s
              ? S.trusted || !srcZero(at, end)
              : bb && (B.trusted || !baseZero(at, end))
          ) {
            out.add(c);
          }
        }
      }
    },
    input.onRead,
  );
  return out;
}
