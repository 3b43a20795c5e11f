/**
 * Allocation JSON: which clusters of a disk may hold data. Three inputs are told
 * apart automatically (compat.md): vhd-tool's legacy list
 * `{"virtual_size":N,"cluster_bits":B,"data_clusters":[0,1,2]}`, the inclusive
 * interval form `{"…","data_clusters":[[0,2],[13,15]]}`, and `qemu-img map
 * --output=json` extents (optionally with `qemu-img info --output=json`). Output is
 * always compact JSON with keys in that order and no trailing newline.
 *
 * @module
 */
import { ClusterSet } from "./cluster_set.ts";
import { DiskstreamError } from "../errors.ts";

/** Which clusters of a disk of `virtualSize` bytes hold data, at `clusters.clusterSize`. */
export interface Allocation {
  /** Virtual size of the disk in bytes. */
  virtualSize: number;
  /** The clusters that may hold data. */
  clusters: ClusterSet;
}

/** What `qemu-img info --output=json` says, the part an allocation needs. */
export interface ImageInfoJson {
  "virtual-size": number;
  "cluster-size"?: number;
}

/** Raised for allocation JSON that is not one of the three accepted shapes. */
export class AllocationJsonError extends DiskstreamError {}

/**
 * Parses allocation JSON of any of the three shapes and maps it onto clusters of
 * `clusterSize` bytes (a hint cluster covering part of an output cluster marks the
 * whole output cluster; the final partial cluster is kept). `info` gives the virtual
 * size for `qemu-img map` input; without it the end of the last extent is used.
 * `where` names the input in error messages.
 */
export function parseAllocation(
  text: string,
  clusterSize: number,
  where = "allocation JSON",
  info?: ImageInfoJson,
): Allocation {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new AllocationJsonError(`${where}: not valid JSON (${(err as Error).message})`);
  }
  if (Array.isArray(json)) return fromQemuMap(json, clusterSize, where, info);
  if (json === null || typeof json !== "object") {
    throw new AllocationJsonError(`${where}: expected an object or a qemu-img map list`);
  }
  const obj = json as Record<string, unknown>;
  const virtualSize = obj.virtual_size;
  const bits = obj.cluster_bits;
  const list = obj.data_clusters;
  if (!Number.isSafeInteger(virtualSize) || (virtualSize as number) < 0) {
    throw new AllocationJsonError(`${where}: "virtual_size" must be a non-negative integer`);
  }
  if (!Number.isInteger(bits) || (bits as number) < 9 || (bits as number) > 30) {
    throw new AllocationJsonError(`${where}: "cluster_bits" must be an integer from 9 to 30`);
  }
  if (!Array.isArray(list)) {
    throw new AllocationJsonError(`${where}: "data_clusters" must be a list`);
  }
  const vs = virtualSize as number;
  const hintSize = 2 ** (bits as number);
  const hintClusters = Math.ceil(vs / hintSize);
  const clusters = new ClusterSet(Math.ceil(vs / clusterSize), clusterSize);
  const mark = (first: number, last: number, index: number) => {
    if (
      !Number.isSafeInteger(first) || !Number.isSafeInteger(last) || first < 0 || last < first
    ) {
      throw new AllocationJsonError(
        `${where}: data_clusters[${index}] is not a cluster number or a [first, last] pair`,
      );
    }
    if (last >= hintClusters) {
      throw new AllocationJsonError(
        `${where}: data_clusters[${index}] names cluster ${last}, past the end of a ${vs}-byte disk (${hintClusters} clusters of ${hintSize} bytes)`,
      );
    }
    const start = first * hintSize;
    clusters.addBytes(start, Math.min((last + 1) * hintSize, vs) - start);
  };
  list.forEach((item, index) => {
    if (Array.isArray(item)) {
      if (item.length !== 2) {
        throw new AllocationJsonError(`${where}: data_clusters[${index}] must be [first, last]`);
      }
      mark(item[0], item[1], index);
    } else {
      mark(item as number, item as number, index);
    }
  });
  return { virtualSize: vs, clusters };
}

function fromQemuMap(
  list: unknown[],
  clusterSize: number,
  where: string,
  info?: ImageInfoJson,
): Allocation {
  let end = 0;
  const extents: [number, number][] = [];
  list.forEach((e, index) => {
    const ext = e as Record<string, unknown>;
    if (
      ext === null || typeof ext !== "object" || !Number.isSafeInteger(ext.start) ||
      !Number.isSafeInteger(ext.length) || (ext.start as number) < 0 || (ext.length as number) < 0
    ) {
      throw new AllocationJsonError(
        `${where}: entry ${index} is not a qemu-img map extent with "start" and "length"`,
      );
    }
    const start = ext.start as number;
    const length = ext.length as number;
    end = Math.max(end, start + length);
    if (ext.data === true) extents.push([start, length]);
  });
  const infoSize = info?.["virtual-size"];
  if (info !== undefined && (!Number.isSafeInteger(infoSize) || (infoSize as number) < 0)) {
    throw new AllocationJsonError(`${where}: qemu-img info JSON has no valid "virtual-size"`);
  }
  const virtualSize = infoSize ?? end;
  const clusters = new ClusterSet(Math.ceil(virtualSize / clusterSize), clusterSize);
  for (const [start, length] of extents) {
    if (start + length > virtualSize) {
      throw new AllocationJsonError(
        `${where}: extent at ${start} (+${length}) ends past the virtual size ${virtualSize}`,
      );
    }
    clusters.addBytes(start, length);
  }
  return { virtualSize, clusters };
}

/**
 * Formats an allocation as vhd-tool prints it: compact, keys `virtual_size`,
 * `cluster_bits`, `data_clusters`, no trailing newline. Intervals (`[[0,2],[13,15]]`)
 * by default, the flat legacy list with `legacy: true`.
 */
export function formatAllocation(allocation: Allocation, legacy = false): string {
  const { virtualSize, clusters } = allocation;
  const bits = 31 - Math.clz32(clusters.clusterSize);
  const parts: string[] = [];
  if (legacy) {
    for (const i of clusters) parts.push(String(i));
  } else {
    for (const [a, b] of clusters.runs()) parts.push(`[${a},${b}]`);
  }
  return `{"virtual_size":${virtualSize},"cluster_bits":${bits},"data_clusters":[${
    parts.join(",")
  }]}`;
}
