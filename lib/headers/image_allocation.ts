/**
 * Allocation read straight from an image file's metadata (qcow2 or VHD): the "hybrid"
 * hint, metadata from the image, bytes from the device. Detects the format from the
 * file itself, follows the backing (qcow2) or parent (VHD) chain with loop detection,
 * and combines the layers the way a reader of the image sees them.
 *
 * @module
 */
import type { Allocation } from "../alloc/allocation.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import {
  CorruptImageError,
  describeIoError,
  DiskstreamError,
  UnsupportedError,
} from "../errors.ts";
import { ImageFile, inFile, isImagePath, rawDataClusters } from "../io/image_file.ts";
import { isQcow2 } from "../qcow2/header.ts";
import { qcow2BackingPath, type Qcow2Map, readQcow2Map } from "../qcow2/image.ts";
import { FOOTER_SIZE } from "../vhd/constants.ts";
import { isVhdFooter } from "../vhd/footer.ts";
import { readVhdMap, type VhdMap } from "../vhd/image.ts";

/** The formats a layer of a chain can have (raw only as a qcow2 backing file). */
export type ImageFormat = "qcow2" | "vhd" | "raw";

/** The file below a layer: its backing file (qcow2) or parent (VHD). */
export interface BackingRef {
  /** The name as the image stores it. */
  name: string;
  /** The format the image names for it (qcow2's backing format), when it names one. */
  format?: string;
  /** The path it resolves to; undefined when no candidate exists. */
  path?: string;
  /** Every path tried. */
  tried: string[];
}

/** One file of a chain and what its metadata says. */
export interface ImageLayer {
  path: string;
  format: ImageFormat;
  virtualSize: number;
  /** The granularity of `data`: qcow2 cluster size, VHD block size. */
  clusterSize: number;
  /** Clusters that read data from this file. */
  data: ClusterSet;
  /** Clusters that read as zeros whatever lies below (qcow2 ZERO entries); null if none. */
  zero: ClusterSet | null;
  backing?: BackingRef;
  /** The qcow2 details, for a qcow2 layer. */
  qcow2?: Qcow2Map;
  /** The VHD details, for a VHD layer. */
  vhd?: VhdMap;
}

/** Longest chain followed before giving up. */
export const MAX_CHAIN_DEPTH = 256;

/**
 * Reads one layer. `format` is what the layer above says it is (qcow2 backing format);
 * without it the file is probed, and a file that is neither qcow2 nor VHD is refused
 * (`allowRaw` false, the top of a chain) or taken as raw (a backing file). Raw layers
 * use `rawClusterSize` as their granularity. A VHD's parent is looked up next to the
 * file first, then in `searchDirs` (vhd-tool's `--path`).
 */
export async function readImageLayer(
  path: string,
  format?: string,
  allowRaw = false,
  rawClusterSize = 65536,
  searchDirs: string[] = [],
): Promise<ImageLayer> {
  const file = await ImageFile.open(path);
  try {
    const head = await file.readAt(0, Math.min(file.size, 512), "image header");
    const kind = format === undefined ? await probe(file, head) : normalizeFormat(format, path);
    if (kind === "qcow2") {
      const map = await readQcow2Map(file);
      const h = map.header;
      const backingPath = qcow2BackingPath(path, h);
      return {
        path,
        format: "qcow2",
        virtualSize: h.size,
        clusterSize: h.clusterSize,
        data: map.data,
        zero: map.zero,
        backing: backingPath === undefined ? undefined : {
          name: h.backingFile!,
          format: h.backingFormat,
          path: await isImagePath(backingPath) ? backingPath : undefined,
          tried: [backingPath],
        },
        qcow2: map,
      };
    }
    if (kind === "vhd") {
      const map = await readVhdMap(file, searchDirs);
      return {
        path,
        format: "vhd",
        virtualSize: map.footer.currentSize,
        clusterSize: map.blockSize,
        data: map.data,
        zero: null,
        backing: map.parent && { ...map.parent, format: "vpc" },
        vhd: map,
      };
    }
    if (!allowRaw) {
      throw new UnsupportedError(`not a qcow2 or VHD image: ${describeUnknown(kind)}`);
    }
    return readRaw(path, file.size, rawClusterSize);
  } catch (err) {
    throw inFile(path, err);
  } finally {
    file.close();
  }
}

/** What a probe found: qcow2, VHD, or the first bytes of something else. */
type Probe = "qcow2" | "vhd" | "raw" | { unknown: Uint8Array; size: number };

async function probe(file: ImageFile, head: Uint8Array): Promise<Probe> {
  if (isQcow2(head)) return "qcow2";
  if (isVhdFooter(head)) return "vhd";
  if (file.size >= FOOTER_SIZE) {
    const tail = await file.readAt(file.size - FOOTER_SIZE, FOOTER_SIZE, "VHD footer");
    if (isVhdFooter(tail)) return "vhd";
  }
  return { unknown: head, size: file.size };
}

function normalizeFormat(format: string, path: string): Probe {
  switch (format) {
    case "qcow2":
      return "qcow2";
    case "vpc":
    case "vhd":
      return "vhd";
    case "raw":
      return "raw";
    default:
      throw new UnsupportedError(`${path}: backing file format '${format}' is not supported`);
  }
}

const MAGICS: [string, number, string][] = [
  ["KDMV", 0, "a VMDK image"],
  ["# Disk DescriptorFile", 0, "a VMDK descriptor"],
  ["vhdxfile", 0, "a VHDX image"],
  ["QED\0", 0, "a QED image"],
  ["LUKS\xba\xbe", 0, "a LUKS volume"],
  ["\x7f\x10\xda\xbe", 64, "a VirtualBox VDI image"],
];

/** A short description of what a file that is neither qcow2 nor VHD starts with. */
function describeUnknown(p: Probe): string {
  if (typeof p === "string") return `it is ${p}`;
  const { unknown: head, size } = p;
  if (size === 0) return "the file is empty";
  const text = new TextDecoder("latin1").decode(head);
  for (const [magic, at, what] of MAGICS) {
    if (text.startsWith(magic, at)) return `found ${what} (only qcow2 and VHD are read)`;
  }
  if (head.every((b) => b === 0)) {
    return `no image header: the first ${head.length} bytes are zeros (raw disk data?)`;
  }
  const hex = Array.from(head.subarray(0, 8), (b) => b.toString(16).padStart(2, "0")).join(" ");
  return `no qcow2 magic at offset 0 and no VHD footer (found bytes ${hex}${
    /^[\x20-\x7e]{4}/.test(text) ? `, ${JSON.stringify(text.slice(0, 8))}` : ""
  })`;
}

function readRaw(path: string, size: number, clusterSize: number): ImageLayer {
  const data = rawDataClusters(path, size, clusterSize);
  return { path, format: "raw", virtualSize: size, clusterSize, data, zero: null };
}

async function identity(path: string): Promise<string> {
  try {
    return await Deno.realPath(path);
  } catch {
    return path;
  }
}

/**
 * Reads the image at `path` and every file below it, top first. Throws a
 * {@link DiskstreamError} for a missing backing file or parent (unless `allowMissing`:
 * the chain then ends with the layer whose `backing.path` is undefined) and a
 * {@link CorruptImageError} for a loop in the chain. VHD parents are looked up next
 * to each child first, then in `searchDirs`.
 */
export async function readImageChain(
  path: string,
  allowMissing = false,
  searchDirs: string[] = [],
): Promise<ImageLayer[]> {
  const layers: ImageLayer[] = [];
  const seen = new Map<string, string>();
  let current = path;
  let format: string | undefined;
  for (;;) {
    const id = await identity(current);
    if (seen.has(id)) {
      const names = [...layers.map((l) => l.path), current].join(" → ");
      throw new CorruptImageError(`loop in the backing chain: ${names}`);
    }
    seen.set(id, current);
    if (layers.length >= MAX_CHAIN_DEPTH) {
      throw new UnsupportedError(
        `${path}: backing chain longer than ${MAX_CHAIN_DEPTH} images`,
      );
    }
    const layer = await readImageLayer(
      current,
      format,
      layers.length > 0,
      layers[0]?.clusterSize,
      searchDirs,
    );
    layers.push(layer);
    const b = layer.backing;
    if (b === undefined) return layers;
    if (b.path === undefined) {
      if (allowMissing) return layers;
      const kind = layer.format === "vhd" ? "parent" : "backing file";
      throw new DiskstreamError(
        `${kind} ${JSON.stringify(b.name)} of ${layer.path} not found (tried ${
          b.tried.join(", ") || "nothing: no locator holds a path"
        })`,
      );
    }
    current = b.path;
    format = b.format;
  }
}

/**
 * Combines a chain (top first) into what a reader of the top image sees, at the top
 * layer's cluster size: a cluster holds data when it reads data from some layer,
 * looking down from the top until a layer has data for it or reads it as zeros.
 * Clusters of a different size map onto the top's by bytes (partial overlap counts).
 */
export function combineChain(layers: ImageLayer[]): Allocation {
  let acc: ClusterSet | null = null;
  for (let i = layers.length - 1; i >= 0; i--) {
    const l = layers[i];
    const set: ClusterSet = acc === null
      ? new ClusterSet(Math.ceil(l.virtualSize / l.clusterSize), l.clusterSize)
      : acc.remap(l.clusterSize, l.virtualSize);
    if (l.zero) { for (const c of l.zero) set.delete(c); }
    set.addAll(l.data);
    acc = set;
  }
  return { virtualSize: layers[0].virtualSize, clusters: acc!, files: layers.map((l) => l.path) };
}

/**
 * Reads which clusters of the image at `path` hold data, following its backing or
 * parent chain, at the image's own cluster (qcow2) or block (VHD) size: what
 * `diskstream headers` prints. Only metadata is read.
 *
 * @example Read the allocation of a VHD built by hand
 * ```ts
 * import {
 *   buildVhdDynamicHeader,
 *   buildVhdFooter,
 *   formatAllocation,
 *   readImageAllocation,
 * } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * // A 4 MiB dynamic VHD (two 2 MiB blocks) whose second block is allocated.
 * const footer = buildVhdFooter({ diskType: 3, currentSize: 4 << 20 });
 * const header = buildVhdDynamicHeader({ tableOffset: 1536, maxTableEntries: 2 });
 * const bat = new Uint8Array(512).fill(0xff);
 * new DataView(bat.buffer).setUint32(4, 4); // block 1 at sector 4 (byte 2048)
 * const block = new Uint8Array(512 + (2 << 20)).fill(0xff);
 * const dir = await Deno.makeTempDir();
 * const path = `${dir}/disk.vhd`;
 * for (const part of [footer, header, bat, block, footer]) {
 *   await Deno.writeFile(path, part, { append: true });
 * }
 *
 * const allocation = await readImageAllocation(path);
 * assert.equal(
 *   formatAllocation(allocation),
 *   '{"virtual_size":4194304,"cluster_bits":21,"data_clusters":[[1,1]]}',
 * );
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function readImageAllocation(
  path: string,
  searchDirs: string[] = [],
): Promise<Allocation> {
  return combineChain(await readImageChain(path, false, searchDirs));
}

/**
 * What changed in the image at `path` since its ancestor `base` (vhd-tool's
 * `--relative-to`): the clusters that read data from a layer above `base` in the chain
 * of `path`, at the image's own cluster or block size. Refuses a `base` that is not in
 * the chain. VHD parents are looked up next to each child first, then in `searchDirs`.
 */
export async function readAllocationAbove(
  path: string,
  base: string,
  searchDirs: string[] = [],
): Promise<Allocation> {
  const layers = await readImageChain(path, false, searchDirs);
  // A base that does not exist is that, not "not in the chain".
  await Deno.stat(base).catch((err) => {
    throw describeIoError(err, base, "read the base image");
  });
  const baseId = await identity(base);
  const at = (await Promise.all(layers.map((l) => identity(l.path)))).indexOf(baseId);
  if (at < 0) {
    throw new DiskstreamError(
      `${base} is not in the parent chain of ${path} (${
        layers.map((l) => l.path).join(" → ")
      }): cannot tell what changed since it`,
    );
  }
  if (at === 0) {
    const top = layers[0];
    const none = new ClusterSet(Math.ceil(top.virtualSize / top.clusterSize), top.clusterSize);
    return { virtualSize: top.virtualSize, clusters: none, files: [top.path] };
  }
  // The base and what lies under it are read too (to find the base): keep them all.
  return { ...combineChain(layers.slice(0, at)), files: layers.map((l) => l.path) };
}
