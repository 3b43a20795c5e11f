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
  /**
   * The files it was read from (allocation JSON, or an image and its backing chain):
   * an export must not write its output over them.
   */
  files?: string[];
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
 * `where` names the input in error messages. `diskSize`, when given, is the size of
 * the disk the hint must describe (its size or that rounded up to 512).
 *
 * Everything is checked before anything is sized from it: types, integer ranges, the
 * order of entries (ascending, without overlap or repeats; qemu-img map extents
 * follow each other from 0 without gaps), the disk size; only then is the bitmap
 * built. A refusal names the entry by its index.
 *
 * @example Parse a qemu-img map hint for a 1 MiB disk; refuse a malformed one
 * ```ts
 * import { parseAllocation } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const map = '[{"start":0,"length":65536,"data":false},{"start":65536,"length":983040,"data":true}]';
 * const hint = parseAllocation(map, 65536, "map.json", undefined, 1 << 20);
 * assert.equal(hint.clusters.count, 15);
 * assert.throws(
 *   () => parseAllocation('[{"start":0,"length":1048576,"data":"true"}]', 65536, "map.json"),
 *   /entry 0: "data" must be true or false/,
 * );
 * ```
 */
export function parseAllocation(
  text: string,
  clusterSize: number,
  where = "allocation JSON",
  info?: ImageInfoJson,
  diskSize?: number,
): Allocation {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new AllocationJsonError(`${where}: not valid JSON (${(err as Error).message})`);
  }
  const intervals = Array.isArray(json)
    ? qemuMapIntervals(json, where, info)
    : vhdToolIntervals(json, where);
  const { virtualSize } = intervals;
  if (
    diskSize !== undefined && virtualSize !== diskSize && virtualSize !== alignUp512(diskSize)
  ) {
    throw new AllocationJsonError(
      `${where} describes a disk of ${virtualSize} bytes but the disk has ${diskSize} bytes: ` +
        "the allocation does not belong to this disk",
    );
  }
  const clusters = new ClusterSet(Math.ceil(virtualSize / clusterSize), clusterSize);
  for (const [start, end] of intervals.bytes) clusters.addBytes(start, end - start);
  return { virtualSize, clusters };
}

/** A checked hint: the disk size and the allocated byte ranges `[start, end)`, ascending. */
interface CheckedHint {
  virtualSize: number;
  bytes: [number, number][];
}

function alignUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}

/** What a JSON value is, for messages. */
function describeJson(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "string") return `the string ${JSON.stringify(v.slice(0, 40))}`;
  if (typeof v === "object") return "an object";
  return `${typeof v} ${String(v)}`;
}

/** A non-negative safe integer, else undefined. */
function count(v: unknown): number | undefined {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : undefined;
}

/** vhd-tool's object: the legacy list or the interval form, checked entry by entry. */
function vhdToolIntervals(json: unknown, where: string): CheckedHint {
  if (json === null || typeof json !== "object") {
    throw new AllocationJsonError(
      `${where}: ${describeJson(json)} is not an allocation: expected an object ` +
        '{"virtual_size", "cluster_bits", "data_clusters"} or a qemu-img map list',
    );
  }
  const obj = json as Record<string, unknown>;
  const vs = count(obj.virtual_size);
  const bits = obj.cluster_bits;
  const list = obj.data_clusters;
  if (vs === undefined) {
    throw new AllocationJsonError(
      `${where}: "virtual_size" must be a non-negative integer, not ${
        describeJson(obj.virtual_size)
      }`,
    );
  }
  if (typeof bits !== "number" || !Number.isInteger(bits) || bits < 9 || bits > 30) {
    throw new AllocationJsonError(
      `${where}: "cluster_bits" must be an integer from 9 to 30, not ${describeJson(bits)}`,
    );
  }
  if (!Array.isArray(list)) {
    throw new AllocationJsonError(
      `${where}: "data_clusters" must be a list, not ${describeJson(list)}`,
    );
  }
  const hintSize = 2 ** bits;
  const hintClusters = Math.ceil(vs / hintSize);
  const pairs = list.length > 0 && Array.isArray(list[0]);
  const bytes: [number, number][] = [];
  let prev = -1;
  list.forEach((item, index) => {
    const at = `${where}: data_clusters[${index}]`;
    let first: number | undefined;
    let last: number | undefined;
    if (pairs) {
      if (!Array.isArray(item) || item.length !== 2) {
        throw new AllocationJsonError(
          `${at} must be a [first, last] pair like the entries before it, not ${
            describeJson(item)
          }`,
        );
      }
      first = count(item[0]);
      last = count(item[1]);
    } else {
      if (Array.isArray(item)) {
        throw new AllocationJsonError(
          `${at} is a pair but the list holds cluster numbers (legacy form)`,
        );
      }
      first = last = count(item);
    }
    if (first === undefined || last === undefined) {
      throw new AllocationJsonError(
        `${at} is not a cluster number (a non-negative integer): ${JSON.stringify(item)}`,
      );
    }
    if (last < first) {
      throw new AllocationJsonError(`${at} [${first}, ${last}] ends before it starts`);
    }
    if (last >= hintClusters) {
      throw new AllocationJsonError(
        `${at} names cluster ${last}, past the end of a ${vs}-byte disk ` +
          `(${hintClusters} clusters of ${hintSize} bytes)`,
      );
    }
    if (first <= prev) {
      throw new AllocationJsonError(
        `${at} (cluster ${first}) is not after cluster ${prev} named before it: ` +
          "entries must be in ascending order without overlaps or repeats",
      );
    }
    prev = last;
    const start = first * hintSize;
    const end = Math.min((last + 1) * hintSize, vs);
    const tail = bytes.at(-1);
    if (tail && tail[1] === start) tail[1] = end;
    else bytes.push([start, end]);
  });
  return { virtualSize: vs, bytes };
}

/**
 * `qemu-img map --output=json`: extents that follow each other from offset 0 without
 * gaps or overlaps, each with integer `start` and `length` and a boolean `data`.
 */
function qemuMapIntervals(list: unknown[], where: string, info?: ImageInfoJson): CheckedHint {
  let end = 0;
  const bytes: [number, number][] = [];
  list.forEach((e, index) => {
    const at = `${where}: entry ${index}`;
    if (e === null || typeof e !== "object" || Array.isArray(e)) {
      throw new AllocationJsonError(
        `${at} is ${describeJson(e)}, not a qemu-img map extent {"start", "length", "data"}`,
      );
    }
    const ext = e as Record<string, unknown>;
    const start = count(ext.start);
    const length = count(ext.length);
    if (start === undefined || length === undefined || length === 0) {
      throw new AllocationJsonError(
        `${at}: "start" must be a non-negative integer and "length" a positive one ` +
          `(got ${JSON.stringify(ext.start)} and ${JSON.stringify(ext.length)})`,
      );
    }
    if (typeof ext.data !== "boolean") {
      throw new AllocationJsonError(
        `${at}: "data" must be true or false, not ${describeJson(ext.data)}`,
      );
    }
    if (start !== end) {
      throw new AllocationJsonError(
        `${at} starts at ${start} but the extents before it end at ${end}: ` +
          "qemu-img map extents follow each other from 0 without gaps or overlaps",
      );
    }
    end = start + length;
    if (!Number.isSafeInteger(end)) {
      throw new AllocationJsonError(`${at} ends past 2^53 bytes`);
    }
    if (ext.data) {
      const tail = bytes.at(-1);
      if (tail && tail[1] === start) tail[1] = end;
      else bytes.push([start, end]);
    }
  });
  if (info === undefined) return { virtualSize: end, bytes };
  const infoSize = count(info["virtual-size"]);
  if (infoSize === undefined) {
    throw new AllocationJsonError(`${where}: qemu-img info JSON has no valid "virtual-size"`);
  }
  if (end > infoSize) {
    // (qemu-img map may stop short of the virtual size: the rest is unallocated.)
    throw new AllocationJsonError(
      `${where}: the extents end at ${end}, past the virtual size ${infoSize} that qemu-img info gives`,
    );
  }
  return { virtualSize: infoSize, bytes };
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
