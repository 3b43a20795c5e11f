/**
 * Resolving an allocation SPEC (`--allocation SPEC`, `--base-allocation SPEC`): a path
 * or `fd:N` (an inherited descriptor, e.g. a pipe from `qemu-img map --output=json`),
 * or an NBD URI (the export's block status, lib/nbd/allocation.ts).
 * Content that starts with `{` or `[` is allocation JSON in any of the three shapes
 * (lib/allocation.ts); any other file is an image (qcow2 or VHD) whose header is read.
 *
 * @module
 */
import { type Allocation, type ImageInfoJson, parseAllocation } from "../alloc/allocation.ts";
import { describeIoError, DiskstreamError, UsageError } from "../errors.ts";
import { descriptorPath } from "../io/descriptor.ts";
import { readImageAllocation } from "./image_allocation.ts";
import { isNbdUri } from "../nbd/uri.ts";
import type { NbdOptions } from "../nbd/client.ts";

/** Bytes looked at to tell JSON from an image. */
const SNIFF_BYTES = 4096;

/** The path to open for a SPEC: `fd:N` → `/dev/fd/N`. */
function specPath(spec: string): string {
  const m = /^fd:(\d+)$/.exec(spec);
  if (m) return descriptorPath(Number(m[1]), spec);
  if (spec.startsWith("fd:")) {
    throw new UsageError(`'${spec}' is not a file descriptor: use fd:N with a number N`);
  }
  return spec;
}

/** True when `text` (after leading whitespace) starts like JSON. */
function looksLikeJson(text: string): boolean {
  return /^\s*[[{]/.test(text);
}

/**
 * True when `text` is JSON of another kind (`null`, `42`, `"x"`, `true`): an
 * allocation file gone wrong, to be refused as such rather than read as an image.
 */
function isOtherJson(text: string): boolean {
  if (!/^\s*(null|true|false|-?\d|")/.test(text)) return false;
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}

/** True when `path` is a regular file or a block device (false for FIFOs and the like). */
async function isSeekable(path: string): Promise<boolean> {
  try {
    const s = await Deno.stat(path);
    return s.isFile || s.isBlockDevice === true;
  } catch {
    return true; // let the open below report the problem
  }
}

/** Reads the whole text of a SPEC (a path or `fd:N`). */
export async function readSpecText(spec: string): Promise<string> {
  try {
    return await Deno.readTextFile(specPath(spec));
  } catch (err) {
    throw describeIoError(err, spec, "read");
  }
}

/** Parses `qemu-img info --output=json` text (the part an allocation needs). */
export function parseImageInfo(text: string, where: string): ImageInfoJson {
  let info: unknown;
  try {
    info = JSON.parse(text);
  } catch (err) {
    throw new DiskstreamError(`${where}: not valid JSON (${(err as Error).message})`);
  }
  if (info === null || typeof info !== "object" || !("virtual-size" in info)) {
    throw new DiskstreamError(`${where}: not 'qemu-img info --output=json' output`);
  }
  const size = (info as Record<string, unknown>)["virtual-size"];
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) {
    throw new DiskstreamError(
      `${where}: "virtual-size" must be a non-negative integer, not ${JSON.stringify(size)}`,
    );
  }
  return info as ImageInfoJson;
}

/**
 * The allocation a SPEC names, mapped onto clusters of `clusterSize` bytes. `info`
 * (from `qemu-img info --output=json`) gives the virtual size of `qemu-img map` JSON.
 * `diskSize`, when given, is the size of the disk the hint is for: a hint for another
 * size is refused before anything is sized from it.
 *
 * @example Read a vhd-tool style hint with 2 MiB blocks as 64 KiB clusters
 * ```ts
 * import { resolveAllocationSpec } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeTextFile(
 *   `${dir}/hint.json`,
 *   '{"virtual_size":8388608,"cluster_bits":21,"data_clusters":[[1,1]]}',
 * );
 * const hint = await resolveAllocationSpec(`${dir}/hint.json`, 65536);
 * assert.equal(hint.virtualSize, 8388608);
 * assert.deepEqual([...hint.clusters.runs()], [[32, 63]]);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function resolveAllocationSpec(
  spec: string,
  clusterSize: number,
  info?: ImageInfoJson,
  diskSize?: number,
  nbd?: NbdOptions,
): Promise<Allocation> {
  if (isNbdUri(spec)) {
    return await (await import("../nbd/allocation.ts")).nbdAllocation(spec, clusterSize, nbd);
  }
  const path = specPath(spec);
  const where = `allocation ${spec}`;
  // A descriptor, a pipe or a FIFO can be read only once: take all of it as JSON.
  // Only a regular file (or a device) can be an image whose header is read.
  if (path !== spec || !(await isSeekable(path))) {
    const text = await readSpecText(spec);
    if (!looksLikeJson(text) && !isOtherJson(text)) {
      throw new DiskstreamError(
        text.trim() === ""
          ? `${where}: nothing to read: expected allocation JSON`
          : `${where}: a descriptor or pipe must carry allocation JSON (an image file needs a path)`,
      );
    }
    return parseAllocation(text, clusterSize, where, info, diskSize);
  }
  let head: string;
  let whole = false; // the head is the whole file
  try {
    using file = await Deno.open(path, { read: true });
    const buf = new Uint8Array(SNIFF_BYTES);
    const n = (await file.read(buf)) ?? 0;
    head = new TextDecoder().decode(buf.subarray(0, n));
    whole = n < SNIFF_BYTES;
  } catch (err) {
    throw describeIoError(err, spec, "read");
  }
  if (looksLikeJson(head) || (whole && isOtherJson(head))) {
    return {
      ...parseAllocation(await readSpecText(spec), clusterSize, where, info, diskSize),
      files: [path],
    };
  }
  const image = await readImageAllocation(path);
  if (
    diskSize !== undefined && image.virtualSize !== diskSize &&
    image.virtualSize !== Math.ceil(diskSize / 512) * 512
  ) {
    throw new DiskstreamError(
      `${where}: the image describes a disk of ${image.virtualSize} bytes but the disk has ` +
        `${diskSize} bytes: the allocation does not belong to this disk`,
    );
  }
  const set = image.clusters;
  return set.clusterSize === clusterSize ? image : {
    ...image,
    clusters: set.remap(clusterSize, image.virtualSize),
  };
}
