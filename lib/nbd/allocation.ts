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
 *
 * @example The allocation of a qcow2 served by qemu-nbd, in 1 MiB clusters
 * ```ts
 * import { nbdAllocation } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const image = `${dir}/disk.qcow2`;
 * await new Deno.Command("qemu-img", { args: ["create", "-q", "-f", "qcow2", image, "8M"] })
 *   .output();
 * await new Deno.Command("qemu-io", { args: ["-c", "write -P 1 3M 4k", image] }).output();
 * const socket = `${dir}/nbd.sock`;
 * const server = new Deno.Command("qemu-nbd", {
 *   args: ["-t", "-r", "-f", "qcow2", "-k", socket, image],
 * }).spawn();
 * while (!(await Deno.stat(socket).catch(() => null))) {
 *   await new Promise((r) => setTimeout(r, 20));
 * }
 * const alloc = await nbdAllocation(`nbd+unix:///?socket=${socket}`, 1 << 20);
 * assert.equal(alloc.virtualSize, 8 << 20);
 * assert.deepEqual([...alloc.clusters.runs()], [[3, 3]]);
 * server.kill();
 * await server.status;
 * await Deno.remove(dir, { recursive: true });
 * ```
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
