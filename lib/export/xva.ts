/**
 * `xva extract -f qcow2|vhd` from an XVA file: one pass over the file verifies every
 * checksum and indexes the disks' members (the plan comes from the tar headers), then
 * each disk is exported straight from the members in place — no temporary raw file.
 *
 * @module
 */
import { describeIoError, DiskstreamError } from "../errors.ts";
import type { ProgressSink } from "../progress.ts";
import { XvaDiskSource } from "../xva/disk_source.ts";
import { indexXvaFile } from "../xva/xva.ts";
import {
  makeOutputDir,
  outputPaths,
  refuseExisting,
  removeCreated,
  type XvaExtracted,
  type XvaExtractResult,
} from "../import/xva.ts";
import { exportQcow2 } from "./export.ts";
import { exportVhd } from "./vhd.ts";

/** Options of {@link extractXvaFileAs}. */
export interface XvaConvertOptions {
  /** The refs of the disks to extract (default: every disk in the file). */
  disks?: string[];
  /** Do not verify the checksums. */
  ignoreChecksums?: boolean;
  /** Receives progress: the verifying pass, then each export. */
  progress?: ProgressSink;
  /**
   * Stops the extraction when aborted (with an `InterruptedError` as its reason): the
   * files it created are removed and the error says so.
   */
  signal?: AbortSignal;
}

/**
 * The progress of one disk's export as a slice of the extraction's: the export's own
 * work (which it sizes itself) scaled to the disk's virtual size, from `base` on.
 */
function slice(outer: ProgressSink, base: number, disk: { virtualSize: number }): ProgressSink {
  let total = 0;
  let part = 0; // never backwards, though the export may size its work again
  return {
    setTotal: (t) => total = t,
    update: (done) => {
      part = Math.max(part, total > 0 ? Math.min(1, done / total) : 0);
      outer.update(base + part * disk.virtualSize);
    },
    finish: () => outer.update(base + disk.virtualSize),
  };
}

/**
 * Writes the disks of the XVA file at `path` into `dir` as `format` images
 * (`Ref:3` → `Ref_3.qcow2`), each a valid qcow2 v3 or dynamic VHD holding the non-zero
 * clusters of its members. Refuses what `extractXva` refuses.
 *
 * @example
 * ```ts
 * import { exportTar } from "@diskstream/diskstream";
 * import { extractXvaFileAs } from "./xva.ts";
 * import { tarHeader } from "../xva/tar.ts";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(3 << 20);
 * disk.fill(3, 2 << 20, (2 << 20) + 10);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
 * const xml = new TextEncoder().encode(`<value><struct>${m("objects", "<array><data>" +
 *   `<value><struct>${m("class", "VDI")}${m("id", "Ref:5")}` +
 *   `${m("snapshot", `<struct>${m("virtual_size", String(3 << 20))}</struct>`)}</struct></value>` +
 *   "</data></array>")}</struct></value>`);
 * const ova = [tarHeader("ova.xml", xml.length), xml, new Uint8Array(512 - (xml.length % 512))];
 * const members = (await exportTar(`${dir}/disk.raw`, { prefix: "Ref:5" })).stream;
 * await Deno.writeFile(`${dir}/vm.xva`, ReadableStream.from((async function* () {
 *   yield* ova;
 *   yield* members;
 * })()));
 * const r = await extractXvaFileAs(`${dir}/vm.xva`, `${dir}/out`, "qcow2");
 * assert.equal(r.extracted[0].path, `${dir}/out/Ref_5.qcow2`);
 * assert.equal(r.extracted[0].dataBytes, 65536); // one 64 KiB cluster holds data
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function extractXvaFileAs(
  path: string,
  dir: string,
  format: "qcow2" | "vhd",
  options: XvaConvertOptions = {},
): Promise<XvaExtractResult> {
  const wanted = options.disks && new Set(options.disks);
  const progress = options.progress;
  // The work: the file's bytes (the verifying pass), then each disk's bytes (its export).
  // A missing or unreadable XVA is named like any input, before anything is made.
  const fileSize = await Deno.stat(path).then((s) => s.size, (err) => {
    throw describeIoError(err, path, "open");
  });
  const index = await indexXvaFile(path, wanted, {
    ignoreChecksums: options.ignoreChecksums,
    onManifest: (m) =>
      progress?.setTotal(
        m.disks.reduce((t, d) => (wanted && !wanted.has(d.ref) ? t : t + d.virtualSize), fileSize),
      ),
    onProgress: (b) => {
      options.signal?.throwIfAborted();
      progress?.update(b);
    },
  });
  // A disk of 0 bytes has no member (XAPI writes none): it is an empty image.
  for (const disk of index.manifest.disks) {
    if (disk.virtualSize !== 0 || (wanted && !wanted.has(disk.ref))) continue;
    if (index.disks.some((d) => d.disk.ref === disk.ref)) continue;
    index.disks.push({ disk, members: [], verified: { xxhash: 0, sha1: 0 } });
  }
  for (const ref of options.disks ?? []) {
    if (!index.manifest.disks.some((d) => d.ref === ref)) {
      throw new DiskstreamError(`--disk ${ref}: ova.xml names no such disk`);
    }
    if (!index.disks.some((d) => d.disk.ref === ref)) {
      throw new DiskstreamError(`the XVA holds no member of ${ref}`);
    }
  }
  // Disks ova.xml names that have no member here are not exported: less work.
  progress?.setTotal(index.disks.reduce((t, d) => t + d.disk.virtualSize, fileSize));
  await makeOutputDir(dir);
  const paths = await outputPaths(dir, index.disks.map((d) => d.disk.ref), format);
  const extracted: XvaExtracted[] = [];
  const created: string[] = []; // removed if a later disk fails
  let exported = fileSize;
  for (const { disk, members, verified } of index.disks) {
    const out = paths.get(disk.ref)!;
    await refuseExisting(out);
    const src = await XvaDiskSource.open(path, disk.virtualSize, members);
    try {
      const opts = {
        signal: options.signal,
        progress: progress && slice(progress, exported, disk),
      };
      const planned = format === "qcow2"
        ? await exportQcow2(src, opts)
        : await exportVhd(src, opts);
      created.push(out);
      await planned.writeTo({ kind: "path", path: out });
      extracted.push({
        ref: disk.ref,
        name: disk.name,
        path: out,
        virtualSize: disk.virtualSize,
        // Whole clusters of the image, but never more than the disk.
        dataBytes: Math.min(
          disk.virtualSize,
          planned.clusters.count * planned.clusters.clusterSize,
        ),
        verified,
      });
      exported += disk.virtualSize;
    } catch (err) {
      await removeCreated(created, err);
      throw err;
    } finally {
      src.close();
    }
  }
  progress?.finish();
  const seen = new Set(index.disks.map((d) => d.disk.ref));
  const absent = index.manifest.disks.map((d) => d.ref).filter((r) =>
    !seen.has(r) && (!wanted || wanted.has(r))
  );
  return { manifest: index.manifest, extracted, absent };
}
