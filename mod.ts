/**
 * diskstream: stream virtual disks.
 *
 * @example Parse a size
 * ```ts
 * import { parseSize } from "@diskstream/diskstream";
 * console.assert(parseSize("64K") === 65536);
 * ```
 * @module
 */
export { formatBytes, parseSize } from "./lib/size.ts";
