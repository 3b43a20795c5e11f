/**
 * Export to VHD: a raw disk as a dynamic VHD stream in the layout `vhd-tool stream
 * --destination-format vhd` writes (lib/vhd/writer.ts), planned by the same pass 1
 * as the qcow2 export at the granularity of the VHD's 2 MiB blocks, and written by
 * the same pass 2 (kernel copies of the data when possible).
 *
 * @module
 */
import { setRuns } from "../alloc/runs.ts";
import type { DiskSource } from "../io/endpoint.ts";
import {
  planExport,
  type PlannedExport,
  plannedExport,
  type StreamExportOptions,
} from "./export.ts";
import { DEFAULT_BLOCK_SIZE } from "../vhd/constants.ts";
import {
  vhdChunks,
  type VhdFooterFields,
  vhdHead,
  type VhdLayout,
  vhdLayout,
  vhdStreamFooter,
} from "../vhd/writer.ts";

/** Options of {@link exportVhd}: those of every export plus the footer's fields. */
export interface VhdExportOptions extends StreamExportOptions, VhdFooterFields {}

/** A planned VHD export (see {@link exportVhd}); `clusters` are its 2 MiB blocks. */
export type VhdExport = PlannedExport<VhdLayout>;

/**
 * Plans the export of the raw disk at `source` as a dynamic VHD (2 MiB blocks) and
 * returns the image as a stream of large chunks, with its layout. The layout is
 * vhd-tool's: footer copy at 0, dynamic header at 512, BAT at 2048 (padded to a
 * sector), each written block as an all-ones sector bitmap and its 2 MiB of data in
 * ascending order, the footer last; no batmap.
 *
 * A block is written when any byte of it is planned: without `allocation` the blocks
 * holding a non-zero byte; with it the hinted blocks (a hint at any cluster size,
 * rounded outwards to blocks; `zeroCheck` drops the all-zero ones); with `base` the
 * blocks that differ from the base disk. A diff is an ordinary dynamic VHD holding
 * the changed blocks whole: apply it onto a copy of the base with `importImage(...,
 * { delta: true })` (`import --delta`).
 *
 * The footer's `current_size` is the source size rounded up to 512 and its creator
 * application `qem2`, so that QEMU sizes the disk by `current_size`, as Hyper-V,
 * XenServer and vhd-tool do (vhd-tool itself writes `caml`, which QEMU sizes by CHS
 * geometry, losing the end of most disks; see `VhdFooterFields`). A disk above
 * 2040 GiB is refused (`LimitError`); other errors as for
 * `exportQcow2`. Memory: one bit per block and a few chunk buffers.
 *
 * @example Export a sparse disk as a VHD and read its layout
 * ```ts
 * import { exportVhd } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = `${dir}/disk.raw`;
 * // A 64 MiB disk with 1 MiB of data at 16 MiB (block 8) and 1 byte at 63 MiB (block 31).
 * const file = await Deno.open(disk, { write: true, create: true });
 * await file.truncate(64 << 20);
 * await file.seek(16 << 20, Deno.SeekMode.Start);
 * await file.write(new Uint8Array(1 << 20).fill(0xab));
 * await file.seek(63 << 20, Deno.SeekMode.Start);
 * await file.write(new Uint8Array([1]));
 * file.close();
 *
 * const exported = await exportVhd(disk);
 * assert.deepEqual([...exported.clusters], [8, 31]);
 * assert.equal(exported.layout.firstBlockOffset, 2048 + 512); // 32 BAT entries, one sector
 * await exported.writeTo({ kind: "path", path: `${dir}/disk.vhd` });
 * const vhd = await Deno.readFile(`${dir}/disk.vhd`);
 * assert.equal(vhd.length, exported.layout.fileSize); // head + 2 × (512 + 2 MiB) + footer
 * assert.equal(new TextDecoder().decode(vhd.subarray(0, 8)), "conectix");
 * assert.deepEqual(vhd.subarray(0, 512), vhd.subarray(vhd.length - 512)); // footer copy
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @example Stream only the blocks that differ from a base disk
 * ```ts
 * import { exportVhd, importImage } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const base = new Uint8Array(8 << 20).fill(1);
 * const next = base.slice().fill(2, 5 << 20, (5 << 20) + 10); // block 2 changes
 * await Deno.writeFile(`${dir}/base.raw`, base);
 * await Deno.writeFile(`${dir}/next.raw`, next);
 *
 * const diff = await exportVhd(`${dir}/next.raw`, { base: `${dir}/base.raw` });
 * assert.deepEqual([...diff.clusters], [2]);
 * await Deno.writeFile(`${dir}/copy.raw`, base);
 * await importImage(diff.stream, `${dir}/copy.raw`, { delta: true });
 * assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), next);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exportVhd(
  source: string | DiskSource,
  options: VhdExportOptions = {},
): Promise<VhdExport> {
  const bs = DEFAULT_BLOCK_SIZE;
  const plan = await planExport(source, options, bs, (size) => vhdLayout(size, 0));
  const { src, clusters: blocks } = plan;
  return plannedExport(plan, options, (virtualSize) => {
    const layout = vhdLayout(virtualSize, blocks.count, bs);
    const footer = vhdStreamFooter(layout, options);
    const bitmap = new Uint8Array(layout.bitmapBytes).fill(0xff);
    return {
      layout,
      fileSize: layout.fileSize,
      chunks: (writerOptions) => vhdChunks(layout, blocks, src, footer, writerOptions),
      *pieces() {
        yield vhdHead(layout, blocks, footer);
        for (const [first, last] of setRuns(blocks)) {
          for (let i = first; i <= last; i++) {
            yield bitmap;
            yield { offset: i * bs, length: bs };
          }
        }
        yield footer;
      },
    };
  });
}
