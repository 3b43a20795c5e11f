/**
 * Whether two names lead to the same file or device: by device and inode number (so
 * hard links and symlinks are caught) and, for device nodes, by the device they
 * stand for. Used to refuse writing an image over its own source, base or input.
 *
 * @module
 */
import { descriptorPath } from "./descriptor.ts";
import type { Endpoint } from "./stream.ts";

/** The path through which an endpoint's file can be looked at (`/dev/fd/N`, `/dev/stdout`). */
export function endpointPath(e: Endpoint, std: "stdin" | "stdout"): string {
  if (e.kind === "fd") return descriptorPath(e.fd, `fd ${e.fd}`);
  return e.kind === "path" ? e.path : `/dev/${std}`;
}

/**
 * True when `a` and `b` name the same regular file or the same device. Anything that
 * cannot be looked at (a path not created yet, a pipe, a socket) is not the same.
 */
export async function sameFile(a: string, b: string): Promise<boolean> {
  const [x, y] = await Promise.all([identity(a), identity(b)]);
  if (x === null || y === null) return false;
  if (x.isDevice && y.isDevice) return x.rdev === y.rdev;
  return !x.isDevice && !y.isDevice && x.dev === y.dev && x.ino === y.ino;
}

async function identity(path: string) {
  try {
    const s = await Deno.stat(path);
    const isDevice = s.isBlockDevice === true;
    if (!s.isFile && !isDevice) return null;
    return { isDevice, dev: s.dev, ino: s.ino, rdev: s.rdev };
  } catch {
    return null;
  }
}

/**
 * True when `path` names something (a file, a device, a dangling link): an output
 * that did not exist before a run is the run's to remove when it fails.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pathExists } from "./same_file.ts";
 *
 * assert.equal(await pathExists("/"), true);
 * assert.equal(await pathExists("/no/such/path"), false);
 * ```
 */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The size of the block device at `path` (learnt by seeking to its end: `stat` says
 * 0), or null when `path` is not a block device or cannot be looked at.
 */
export async function blockDeviceSize(path: string): Promise<number | null> {
  try {
    if ((await Deno.stat(path)).isBlockDevice !== true) return null;
    using device = await Deno.open(path, { read: true });
    return await device.seek(0, Deno.SeekMode.End);
  } catch {
    return null;
  }
}
