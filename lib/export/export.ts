/**
 * Export: a raw disk (regular file or block device) as an image stream, without a
 * temporary file and without seeking the output. First the plan — which clusters
 * to write: the non-zero ones (pass 1 reads the data extents, or everything), the
 * hinted ones (`allocation`), or those that differ from a base disk (`base`) — then
 * pass 2 writes the image from the plan, reading the planned clusters straight into
 * the output chunks or copying them in the kernel. The plan and pass 2 are shared by
 * the formats: qcow2 here (the layout of QEMU's `qcow2-to-stdout.py`), VHD in
 * vhd.ts (2 MiB blocks).
 *
 * @module
 */
import { setRuns } from "../alloc/runs.ts";
import {
  checkGeometry,
  DEFAULT_CLUSTER_SIZE,
  DEFAULT_REFCOUNT_BITS,
  l1Geometry,
  streamLayout,
} from "../qcow2/layout.ts";
import { countL2Tables, qcow2Chunks, qcow2MetadataChunks } from "../qcow2/writer.ts";
import type { ExportOptions, Qcow2Export } from "./options.ts";
import type { DiskSource } from "../io/endpoint.ts";
import { planExport } from "./plan.ts";
import { plannedExport } from "./pass2.ts";

export type { ExportOptions, PlannedExport, Qcow2Export, StreamExportOptions } from "./options.ts";
export { type ExportPlan, planExport } from "./plan.ts";
export { type ImageWriter, plannedExport, type SourceRange } from "./pass2.ts";

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
  source: string | DiskSource,
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
