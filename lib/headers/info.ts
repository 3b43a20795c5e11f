/**
 * `diskstream info`: a summary of a qcow2 or VHD image and its backing/parent chain,
 * as data ({@link ImageInfo}, whose snake_case fields are the `--json` output) and as
 * text for people.
 *
 * @module
 */
import type { ClusterSet } from "../alloc/cluster_set.ts";
import { combineChain, type ImageLayer, readImageChain } from "./image_allocation.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
} from "../qcow2/constants.ts";
import { formatBytes } from "../size.ts";
import { VHD_EPOCH_MS } from "../vhd/constants.ts";
import { diskTypeName, formatUuid } from "../vhd/footer.ts";

/** qcow2-specific facts of one file. */
export interface Qcow2InfoJson {
  compression_type: "deflate" | "zstd";
  normal_clusters: number;
  compressed_clusters: number;
  zero_clusters: number;
  unallocated_clusters: number;
  dirty: boolean;
  corrupt: boolean;
  lazy_refcounts: boolean;
  extended_l2: boolean;
  external_data_file: string | null;
  encryption: "none" | "aes" | "luks" | string;
  refcount_bits: number;
  snapshots: number;
  l1_size: number;
  l2_tables: number;
}

/** VHD-specific facts of one file. */
export interface VhdInfoJson {
  disk_type: string;
  /** Null for a fixed disk. */
  max_table_entries: number | null;
  creator_application: string;
  creator_version: string;
  creator_host_os: string;
  uuid: string;
  timestamp: string;
  saved_state: boolean;
  parent_uuid: string | null;
  parent_unicode_name: string | null;
}

/** What `info` says about one file of a chain. */
export interface LayerInfo {
  path: string;
  format: "qcow2" | "vhd" | "raw";
  /** qcow2 `2`/`3`, VHD `1.0`; empty for raw. */
  format_version: string;
  virtual_size: number;
  /** qcow2 cluster size or VHD block size (2 MiB for fixed VHD), in bytes. */
  cluster_size: number;
  /** Clusters (blocks) that read data from this file. */
  allocated_clusters: number;
  /** Guest bytes those clusters cover (clipped at the virtual size). */
  allocated_bytes: number;
  /** `allocated_bytes` as a percentage of the virtual size, two decimals. */
  allocated_percent: number;
  /** The backing file (qcow2) or parent (VHD) as the image names it. */
  backing_file: string | null;
  backing_format: string | null;
  /** Where it was found; null when missing (or when there is none). */
  backing_path: string | null;
  qcow2?: Qcow2InfoJson;
  vhd?: VhdInfoJson;
}

/** What `info` says about an image: the top file, the files below, and their union. */
export interface ImageInfo extends LayerInfo {
  /** The files below the image, nearest first. */
  chain: LayerInfo[];
  /** False when a backing file or parent is missing (the chain totals are then null). */
  chain_complete: boolean;
  /** Clusters of the image (at its cluster size) that read data from any file of the chain. */
  chain_allocated_clusters: number | null;
  chain_allocated_bytes: number | null;
  chain_allocated_percent: number | null;
}

/**
 * Reads the image at `path` and the files below it (tables only) and summarises them.
 * A missing backing file or parent does not fail: it shows as `backing_path: null`
 * with `chain_complete: false`.
 *
 * @example Summarise a VHD built by hand
 * ```ts
 * import { buildVhdFooter, formatImageInfo, readImageInfo } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * // A 1 MiB fixed VHD: the data, then the footer.
 * const dir = await Deno.makeTempDir();
 * const path = `${dir}/fixed.vhd`;
 * const footer = buildVhdFooter({ diskType: 2, currentSize: 1 << 20 });
 * await Deno.writeFile(path, new Uint8Array(1 << 20));
 * await Deno.writeFile(path, footer, { append: true });
 *
 * const info = await readImageInfo(path);
 * assert.equal(info.format, "vhd");
 * assert.equal(info.vhd?.disk_type, "fixed");
 * assert.equal(info.virtual_size, 1 << 20);
 * assert.match(formatImageInfo(info), /^format: vhd, version 1\.0, fixed$/m);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function readImageInfo(path: string): Promise<ImageInfo> {
  const layers = await readImageChain(path, true);
  const [top, ...below] = layers.map(layerInfo);
  const complete = layers.at(-1)!.backing === undefined;
  const combined = complete ? combineChain(layers) : null;
  const bytes = combined ? coveredBytes(combined.clusters, combined.virtualSize) : null;
  return {
    ...top,
    chain: below,
    chain_complete: complete,
    chain_allocated_clusters: combined ? combined.clusters.count : null,
    chain_allocated_bytes: bytes,
    chain_allocated_percent: bytes === null ? null : percent(bytes, top.virtual_size),
  };
}

function layerInfo(l: ImageLayer): LayerInfo {
  const allocated = coveredBytes(l.data, l.virtualSize);
  const info: LayerInfo = {
    path: l.path,
    format: l.format,
    format_version: l.qcow2
      ? String(l.qcow2.header.version)
      : l.vhd
      ? `${l.vhd.footer.fileFormatVersion >>> 16}.${l.vhd.footer.fileFormatVersion & 0xffff}`
      : "",
    virtual_size: l.virtualSize,
    cluster_size: l.clusterSize,
    allocated_clusters: l.data.count,
    allocated_bytes: allocated,
    allocated_percent: percent(allocated, l.virtualSize),
    backing_file: l.backing?.name ?? null,
    backing_format: l.backing?.format ?? null,
    backing_path: l.backing?.path ?? null,
  };
  if (l.qcow2) {
    const { header: h, counts } = l.qcow2;
    info.qcow2 = {
      compression_type: h.compressionType === COMPRESSION_ZSTD ? "zstd" : "deflate",
      normal_clusters: counts.normal,
      compressed_clusters: counts.compressed,
      zero_clusters: counts.zero,
      unallocated_clusters: counts.unallocated,
      dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
      lazy_refcounts: (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
      extended_l2: (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n,
      external_data_file: h.dataFile ?? null,
      encryption: ["none", "aes", "luks"][h.cryptMethod] ?? `method ${h.cryptMethod}`,
      refcount_bits: h.refcountBits,
      snapshots: h.nbSnapshots,
      l1_size: h.l1Size,
      l2_tables: l.qcow2.l2Tables,
    };
  }
  if (l.vhd) {
    const { footer: f, header: d } = l.vhd;
    const differencing = d !== null && l.backing !== undefined;
    info.vhd = {
      disk_type: diskTypeName(f.diskType),
      max_table_entries: d?.maxTableEntries ?? null,
      creator_application: f.creatorApplication.replace(/\0+$/, ""),
      creator_version: `0x${f.creatorVersion.toString(16).padStart(8, "0")}`,
      creator_host_os: f.creatorHostOs.replace(/\0+$/, ""),
      uuid: formatUuid(f.uniqueId),
      timestamp: new Date(VHD_EPOCH_MS + f.timestamp * 1000).toISOString(),
      saved_state: f.savedState,
      parent_uuid: differencing ? formatUuid(d.parentUuid) : null,
      parent_unicode_name: differencing ? d.parentUnicodeName : null,
    };
  }
  return info;
}

/** Guest bytes covered by the clusters of `set`, the last one clipped at `virtualSize`. */
function coveredBytes(set: ClusterSet, virtualSize: number): number {
  const cs = set.clusterSize;
  let bytes = set.count * cs;
  const last = Math.ceil(virtualSize / cs) - 1;
  if (last >= 0 && set.has(last)) bytes -= (last + 1) * cs - virtualSize;
  return bytes;
}

function percent(part: number, whole: number): number {
  return whole === 0 ? 0 : Math.round((part / whole) * 10000) / 100;
}

function size(bytes: number): string {
  return bytes < 1024 ? `${bytes} bytes` : `${formatBytes(bytes)} (${bytes} bytes)`;
}

function yesNo(b: boolean): string {
  return b ? "yes" : "no";
}

/** One line about a file of the chain below the image. */
function layerLine(l: LayerInfo): string {
  const kind = l.format === "raw"
    ? "raw"
    : `${l.format} v${l.format_version}${l.vhd ? ` ${l.vhd.disk_type}` : ""}`;
  return `${l.path}: ${kind}, ${formatBytes(l.virtual_size)}, ${formatBytes(l.cluster_size)} ${
    l.format === "vhd" ? "blocks" : "clusters"
  }, ${formatBytes(l.allocated_bytes)} allocated (${l.allocated_percent}%)`;
}

/**
 * The summary as text for people, one fact per line, ending in a newline.
 *
 * @example Print what `diskstream info` prints
 * ```ts
 * import { buildVhdFooter, formatImageInfo, readImageInfo } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const path = `${dir}/fixed.vhd`;
 * await Deno.writeFile(path, new Uint8Array(4 << 20));
 * await Deno.writeFile(path, buildVhdFooter({ diskType: 2, currentSize: 4 << 20 }), { append: true });
 * const text = formatImageInfo(await readImageInfo(path));
 * assert.match(text, /^virtual size: 4\.00 MiB \(4194304 bytes\)$/m);
 * assert.match(text, /^block size: 2\.00 MiB/m);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function formatImageInfo(info: ImageInfo): string {
  const unit = info.format === "vhd" ? "block" : "cluster";
  const lines = [`image: ${info.path}`];
  lines.push(
    `format: ${info.format}, version ${info.format_version}${
      info.vhd ? `, ${info.vhd.disk_type}` : ""
    }`,
  );
  lines.push(`virtual size: ${size(info.virtual_size)}`);
  lines.push(`${unit} size: ${size(info.cluster_size)}`);
  const total = Math.ceil(info.virtual_size / info.cluster_size);
  lines.push(
    `allocated: ${
      size(info.allocated_bytes)
    }, ${info.allocated_percent}% of the disk, in ${info.allocated_clusters} of ${total} ${unit}s`,
  );
  if (info.backing_file !== null) {
    const what = info.format === "vhd" ? "parent" : "backing file";
    const fmt = info.backing_format && info.format !== "vhd"
      ? ` (format ${info.backing_format})`
      : "";
    lines.push(
      `${what}: ${info.backing_file}${fmt} → ${info.backing_path ?? "NOT FOUND"}`,
    );
    if (info.chain_allocated_bytes !== null) {
      lines.push(
        `allocated with the ${what === "parent" ? "parent" : "backing"} chain: ${
          size(info.chain_allocated_bytes)
        }, ${info.chain_allocated_percent}% of the disk, in ${info.chain_allocated_clusters} ${unit}s`,
      );
    }
  }
  if (info.chain.length > 0) {
    lines.push("chain:");
    info.chain.forEach((l, i) => {
      lines.push(`  ${i + 1}. ${layerLine(l)}`);
      if (l.backing_file !== null && l.backing_path === null) {
        lines.push(
          `     ${l.format === "vhd" ? "parent" : "backing file"} ${l.backing_file} NOT FOUND`,
        );
      }
    });
  }
  if (info.qcow2) {
    const q = info.qcow2;
    lines.push(
      `features: compression ${q.compression_type}; ${q.compressed_clusters} compressed clusters; ${q.zero_clusters} zero clusters; dirty ${
        yesNo(q.dirty)
      }; corrupt ${yesNo(q.corrupt)}; lazy refcounts ${yesNo(q.lazy_refcounts)}; extended L2 ${
        yesNo(q.extended_l2)
      }`,
    );
    lines.push(
      `details: refcount bits ${q.refcount_bits}; encryption ${q.encryption}; snapshots ${q.snapshots}; external data file ${
        q.external_data_file ?? "none"
      }; L1 entries ${q.l1_size}; L2 tables ${q.l2_tables}`,
    );
  }
  if (info.vhd) {
    const v = info.vhd;
    lines.push(
      `details: creator ${JSON.stringify(v.creator_application)} ${v.creator_version} on ${
        JSON.stringify(v.creator_host_os)
      }; created ${v.timestamp}; uuid ${v.uuid}; saved state ${yesNo(v.saved_state)}${
        v.max_table_entries === null ? "" : `; BAT entries ${v.max_table_entries}`
      }${v.parent_uuid === null ? "" : `; parent uuid ${v.parent_uuid}`}`,
    );
  }
  return lines.join("\n") + "\n";
}
