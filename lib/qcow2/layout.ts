/**
 * The streaming qcow2 layout (formats.md, "The streaming layout"): every item cluster
 * aligned, no gaps, in this order — header cluster, refcount table, refcount blocks,
 * L1 table, the non-empty L2 tables in L1 order, the data clusters in ascending guest
 * order. Everything here is arithmetic on counts, so the whole layout is known before
 * the first byte is written.
 *
 * @module
 */
import { divCeil, isPowerOfTwo, log2 } from "../bytes.ts";
import { LimitError, UsageError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import {
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MIN_CLUSTER_BITS,
} from "./constants.ts";

/** Default cluster size of the output (QEMU's). */
export const DEFAULT_CLUSTER_SIZE = 65536;
/** Default refcount width in bits (QEMU's). */
export const DEFAULT_REFCOUNT_BITS = 16;

/** Where everything of a streamed qcow2 image goes. Offsets and sizes in bytes. */
export interface StreamLayout {
  /** Virtual size (the header's `size`): the source size rounded up to 512. */
  virtualSize: number;
  clusterSize: number;
  clusterBits: number;
  refcountBits: number;
  /** log2 of refcountBits (the header's `refcount_order`). */
  refcountOrder: number;
  /** Guest clusters of the disk: `ceil(virtualSize / clusterSize)`. */
  guestClusters: number;
  /** L1 entries (the header's `l1_size`). */
  l1Size: number;
  /** Clusters of the L1 table. */
  l1Clusters: number;
  /** Non-empty L2 tables (one cluster each). */
  l2Tables: number;
  /** Data clusters written. */
  dataClusters: number;
  /** Clusters of the refcount table (the header's `refcount_table_clusters`). */
  refcountTableClusters: number;
  /** Refcount blocks (one cluster each). */
  refcountBlocks: number;
  /** Every cluster of the file; each one has refcount 1. */
  totalClusters: number;
  refcountTableOffset: number;
  refcountBlockOffset: number;
  /** The header's `l1_table_offset`: 0 when the L1 table is empty (no clusters). */
  l1TableOffset: number;
  l2TableOffset: number;
  dataOffset: number;
  /** Size of the whole stream: `totalClusters * clusterSize`. */
  fileSize: number;
}

/** The counts that decide a layout. */
export interface LayoutInput {
  virtualSize: number;
  clusterSize: number;
  refcountBits: number;
  /** Number of non-empty L2 tables (L1 entries that map at least one data cluster). */
  l2Tables: number;
  /** Number of data clusters. */
  dataClusters: number;
}

/** Refuses a cluster size or refcount width QEMU would not open. */
export function checkGeometry(clusterSize: number, refcountBits: number): void {
  if (
    !isPowerOfTwo(clusterSize) || log2(clusterSize) < MIN_CLUSTER_BITS ||
    log2(clusterSize) > MAX_CLUSTER_BITS
  ) {
    throw new UsageError(
      `cluster size ${clusterSize} is not a power of two from 512 to 2M (-c 512 … -c 2M)`,
    );
  }
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) {
    throw new UsageError(
      `refcount width ${refcountBits} is not one of 1, 2, 4, 8, 16, 32, 64 bits (-r)`,
    );
  }
}

/** Guest clusters and L1 entries of a disk, refusing one QEMU's L1 limit cannot map. */
export function l1Geometry(
  virtualSize: number,
  clusterSize: number,
): { guestClusters: number; l1Size: number } {
  const guestClusters = divCeil(virtualSize, clusterSize);
  const l1Size = divCeil(guestClusters, clusterSize / 8);
  if (l1Size * 8 > MAX_L1_BYTES) {
    const max = 2 ** 19 * clusterSize * clusterSize;
    throw new LimitError(
      `image too large for ${
        formatBytes(clusterSize)
      } clusters: a ${virtualSize}-byte disk needs an L1 table of ${
        formatBytes(l1Size * 8)
      }, above QEMU's 32 MiB limit (the largest disk at this cluster size is ${
        formatBytes(max)
      }); use a larger cluster size (-c)`,
    );
  }
  return { guestClusters, l1Size };
}

/**
 * Computes the layout. The refcount blocks count themselves and the refcount table,
 * so their number is iterated until it stops growing, exactly as QEMU's script does.
 */
export function streamLayout(input: LayoutInput): StreamLayout {
  const { virtualSize, clusterSize: cs, refcountBits, l2Tables, dataClusters } = input;
  checkGeometry(cs, refcountBits);
  const { guestClusters, l1Size } = l1Geometry(virtualSize, cs);
  const perTable = cs / 8;
  const perBlock = (cs * 8) / refcountBits;
  const l1Clusters = divCeil(l1Size, perTable);
  const base = 1 + l1Clusters + l2Tables + dataClusters;
  let blocks = divCeil(base, perBlock);
  let tables = divCeil(blocks, perTable);
  for (;;) {
    const next = divCeil(base + tables + blocks, perBlock);
    if (next <= blocks) break;
    blocks = next;
    tables = divCeil(blocks, perTable);
  }
  if (tables * cs > MAX_REFCOUNT_TABLE_BYTES) {
    throw new LimitError(
      `image too large for ${formatBytes(cs)} clusters with ${refcountBits}-bit refcounts: ` +
        `its refcount table would take ${formatBytes(tables * cs)}, above QEMU's 8 MiB limit; ` +
        `use a larger cluster size (-c) or fewer refcount bits (-r)`,
    );
  }
  const refcountTableOffset = cs;
  const refcountBlockOffset = refcountTableOffset + tables * cs;
  const l1At = refcountBlockOffset + blocks * cs;
  const l2TableOffset = l1At + l1Clusters * cs;
  const dataOffset = l2TableOffset + l2Tables * cs;
  const totalClusters = base + tables + blocks;
  return {
    virtualSize,
    clusterSize: cs,
    clusterBits: log2(cs),
    refcountBits,
    refcountOrder: log2(refcountBits),
    guestClusters,
    l1Size,
    l1Clusters,
    l2Tables,
    dataClusters,
    refcountTableClusters: tables,
    refcountBlocks: blocks,
    totalClusters,
    refcountTableOffset,
    refcountBlockOffset,
    l1TableOffset: l1Clusters === 0 ? 0 : l1At,
    l2TableOffset,
    dataOffset,
    fileSize: totalClusters * cs,
  };
}
