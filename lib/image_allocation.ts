/**
 * Allocation read straight from an image file's header (qcow2 or VHD): the "hybrid"
 * hint, metadata from the image, bytes from the device. (Filled in by the headers work.)
 *
 * @module
 */
import type { Allocation } from "./allocation.ts";
import { UnsupportedError } from "./errors.ts";

/** Reads which clusters of the image at `path` hold data (this image and its chain). */
export function readImageAllocation(path: string): Promise<Allocation> {
  return Promise.reject(new UnsupportedError(`reading allocation from ${path}: not yet built`));
}
