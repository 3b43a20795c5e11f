/**
 * The allocation of a remote export, for a local device that holds the same bytes
 * (vhd-tool's `nbdhybrid` case: XAPI serves a VDI over NBD while its data is also on
 * a local device): `NBD_CMD_BLOCK_STATUS` over `base:allocation` says which
 * clusters may hold data; the export's data is never read.
 *
 * @module
 */
import type { Allocation } from "../alloc/allocation.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { extentRuns } from "../alloc/runs.ts";
import { NbdError } from "../errors.ts";
import { NbdExport, type NbdOptions } from "./client.ts";

/**
 * The clusters of `clusterSize` bytes of the export at `uri` that may hold data
 * (extents flagged zero are left out; a cluster partly data counts), with the
 * export's size as the virtual size. Fails with an {@link NbdError} when the server
 * offers no block status (then nothing is known of the allocation).
 */
export async function nbdAllocation(
  uri: string,
  clusterSize: number,
  options: NbdOptions = {},
): Promise<Allocation> {
  const nbd = await NbdExport.open(uri, { ...options, connections: 1 });
  try {
    const extents = await nbd.extents();
    if (extents === null) {
      throw new NbdError(
        `${uri}: the server offers no block status (base:allocation), so it cannot give an allocation`,
      );
    }
    const count = Math.ceil(nbd.size / clusterSize);
    const clusters = new ClusterSet(count, clusterSize);
    for (const [first, last] of extentRuns(extents, clusterSize, count)) {
      clusters.addRange(first, last);
    }
    return { virtualSize: nbd.size, clusters };
  } finally {
    await nbd.close();
  }
}
