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
 * @module
 */
import {
  candidateCount,
  candidateRuns,
  type Candidates,
  isCandidate,
  scanWindows,
} from "./scan.ts";
import { unionRuns } from "../alloc/runs.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import type { DiskSource } from "../io/disk_source.ts";
import { sameTest, zeroTest } from "../zero.ts";

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
