/**
 * The 1024-byte VHD dynamic disk header (dynamic and differencing disks): parse and
 * validate it (cookie, checksum, block size, parent locators), check its tables
 * against the footer, decode parent locator paths, and build one. Pure functions on
 * buffers; nothing here reads a file.
 *
 * @module
 */
import { alignUp, isPowerOfTwo, readU64, viewOf } from "../bytes.ts";
import { CorruptImageError } from "../errors.ts";
import {
  DYNAMIC_COOKIE,
  DYNAMIC_HEADER_SIZE,
  HEADER_CHECKSUM_OFFSET,
  NO_DATA_OFFSET,
  PARENT_LOCATOR_COUNT,
  PARENT_LOCATOR_SIZE,
  PARENT_LOCATORS_OFFSET,
  PARENT_NAME_OFFSET,
  PARENT_NAME_SIZE,
  PLATFORM_MACX,
  PLATFORM_NONE,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  PLATFORM_WI2K,
  PLATFORM_WI2R,
  SECTOR_SIZE,
  VHD_MAX_SIZE,
  VHD_VERSION,
} from "./constants.ts";
import { checkedVhdStructure, fourCC, vhdChecksum, vhdTimestamp } from "./footer.ts";

/** One used parent locator entry of a dynamic header. */
export interface VhdParentLocator {
  /** Index 0–7 of the entry in the header. */
  index: number;
  /** Four characters: `MacX`, `W2ku`, `W2ru`, `Wi2k`, `Wi2r`, `Mac `. */
  platformCode: string;
  /** Space reserved for the locator data (sectors per the spec; some tools write bytes). */
  dataSpace: number;
  /** Length of the locator data in bytes. */
  dataLength: number;
  /** Byte offset of the locator data in the file. */
  dataOffset: number;
}

/** A parsed dynamic disk header. */
export interface VhdDynamicHeader {
  /** Byte offset of the Block Allocation Table. */
  tableOffset: number;
  headerVersion: number;
  /** Number of BAT entries the table holds (may exceed what the size needs). */
  maxTableEntries: number;
  /** Block size in bytes (a power of two, 2 MiB by default). */
  blockSize: number;
  checksum: number;
  /** 16 bytes; all zero for a dynamic disk. */
  parentUuid: Uint8Array;
  /** Parent's modification time, seconds since 2000-01-01 UTC. */
  parentTimestamp: number;
  /** Parent file name (UTF-16BE on disk), empty when none. */
  parentUnicodeName: string;
  /** The used parent locator entries (platform code not zero). */
  parentLocators: VhdParentLocator[];
}

const latin1 = new TextDecoder("latin1");
const utf8 = new TextDecoder();

/** True if `bytes` starts with the dynamic header cookie `cxsparse`. */
export function isVhdDynamicHeader(bytes: Uint8Array): boolean {
  return bytes.length >= 8 && latin1.decode(bytes.subarray(0, 8)) === DYNAMIC_COOKIE;
}

/**
 * Parses and validates a dynamic header from the first 1024 bytes of `bytes`.
 * `base` is the header's byte offset in the file or stream (the footer's
 * `dataOffset`), used in error messages. Throws {@link CorruptImageError} for a short
 * buffer, a wrong cookie, a checksum mismatch or an invalid block size.
 *
 * @example Parse a differencing disk's header and decode its parent locator
 * ```ts
 * import { buildVhdDynamicHeader, parseVhdDynamicHeader } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const path = new TextEncoder().encode("file://./parent.vhd");
 * const bytes = buildVhdDynamicHeader({
 *   tableOffset: 1536,
 *   maxTableEntries: 16,
 *   parentUnicodeName: "parent.vhd",
 *   parentLocators: [{ platformCode: "MacX", dataSpace: 1, dataLength: path.length, dataOffset: 2048 }],
 * });
 * const header = parseVhdDynamicHeader(bytes, 512);
 * assert.equal(header.blockSize, 2 << 20);
 * assert.equal(header.parentUnicodeName, "parent.vhd");
 * assert.equal(header.parentLocators[0].platformCode, "MacX");
 * ```
 */
export function parseVhdDynamicHeader(bytes: Uint8Array, base = 0): VhdDynamicHeader {
  const b = checkedVhdStructure(
    bytes,
    base,
    "dynamic header",
    DYNAMIC_HEADER_SIZE,
    DYNAMIC_COOKIE,
    HEADER_CHECKSUM_OFFSET,
  );
  const v = viewOf(b);
  const checksum = v.getUint32(HEADER_CHECKSUM_OFFSET);
  const blockSize = v.getUint32(32);
  if (!isPowerOfTwo(blockSize) || blockSize < SECTOR_SIZE) {
    throw new CorruptImageError(
      `VHD block size ${blockSize} is not a power of two from 512 bytes to 1 GiB`,
      base + 32,
    );
  }
  const parentLocators: VhdParentLocator[] = [];
  for (let i = 0; i < PARENT_LOCATOR_COUNT; i++) {
    const at = PARENT_LOCATORS_OFFSET + i * PARENT_LOCATOR_SIZE;
    const platformCode = fourCC(b, at);
    if (platformCode === PLATFORM_NONE) continue;
    parentLocators.push({
      index: i,
      platformCode,
      dataSpace: v.getUint32(at + 4),
      dataLength: v.getUint32(at + 8),
      dataOffset: readU64(v, at + 16, `VHD parent locator ${i} data offset`, base),
    });
  }
  return {
    tableOffset: readU64(v, 16, "VHD BAT offset", base),
    headerVersion: v.getUint32(24),
    maxTableEntries: v.getUint32(28),
    blockSize,
    checksum,
    parentUuid: b.slice(40, 56),
    parentTimestamp: v.getUint32(56),
    parentUnicodeName: trimNul(
      new TextDecoder("utf-16be").decode(
        b.subarray(PARENT_NAME_OFFSET, PARENT_NAME_OFFSET + PARENT_NAME_SIZE),
      ),
    ),
    parentLocators,
  };
}

/** Number of BAT entries that count for a disk: `ceil(currentSize / blockSize)`. */
export function usedBatEntries(currentSize: number, blockSize: number): number {
  return Math.ceil(currentSize / blockSize);
}

/** Bytes of the sector bitmap in front of each block, padded to a sector. */
export function blockBitmapSize(blockSize: number): number {
  return alignUp(Math.ceil(blockSize / SECTOR_SIZE / 8), SECTOR_SIZE);
}

/**
 * Checks the header's tables against the disk's virtual size (`currentSize` from the
 * footer) and, when known, the file size: the BAT must have an entry for every block
 * of the disk and lie inside the file. `base` is the header's offset in the file.
 * A disk above 2040 GiB (the VHD limit, which QEMU and vhd-tool apply too) is
 * refused, so that no BAT describes more than that.
 */
export function checkVhdTables(
  header: VhdDynamicHeader,
  currentSize: number,
  base: number,
  fileSize?: number,
): void {
  if (currentSize > VHD_MAX_SIZE) {
    throw new CorruptImageError(
      `VHD current size ${currentSize} is above the 2040 GiB (${VHD_MAX_SIZE} bytes) a VHD can hold`,
      48,
    );
  }
  const need = usedBatEntries(currentSize, header.blockSize);
  if (header.maxTableEntries < need) {
    throw new CorruptImageError(
      `VHD BAT has ${header.maxTableEntries} entries, fewer than the ${need} blocks of a ${currentSize}-byte disk`,
      base + 28,
    );
  }
  if (fileSize !== undefined) {
    const batBytes = header.maxTableEntries * 4;
    if (batBytes > fileSize) {
      throw new CorruptImageError(
        `VHD BAT of ${header.maxTableEntries} entries (${batBytes} bytes) is larger than the ${fileSize}-byte file`,
        base + 28,
      );
    }
    if (header.tableOffset + need * 4 > fileSize) {
      throw new CorruptImageError(
        `VHD BAT at ${header.tableOffset} lies past the end of the ${fileSize}-byte file`,
        base + 16,
      );
    }
    for (const loc of header.parentLocators) {
      if (loc.dataOffset + loc.dataLength > fileSize) {
        throw new CorruptImageError(
          `VHD parent locator ${loc.index} (${loc.dataLength} bytes at ${loc.dataOffset}) lies past the end of the ${fileSize}-byte file`,
          base + PARENT_LOCATORS_OFFSET + loc.index * PARENT_LOCATOR_SIZE + 16,
        );
      }
    }
  }
}

/**
 * Decodes a parent locator's data into the path it holds, or `undefined` for a
 * platform whose data is not a path (`Mac ` aliases, unknown codes). `MacX` is a
 * UTF-8 `file://` URL (the prefix is removed), `W2ku`/`W2ru` UTF-16LE, `Wi2k`/`Wi2r`
 * ASCII. Trailing NULs are dropped; Windows separators are kept as they are.
 */
export function decodeParentLocator(platformCode: string, data: Uint8Array): string | undefined {
  switch (platformCode) {
    case PLATFORM_MACX: {
      const text = trimNul(utf8.decode(data));
      return text.startsWith("file://") ? text.slice("file://".length) : text;
    }
    case PLATFORM_W2KU:
    case PLATFORM_W2RU:
      return trimNul(new TextDecoder("utf-16le").decode(data));
    case PLATFORM_WI2K:
    case PLATFORM_WI2R:
      return trimNul(latin1.decode(data));
    default:
      return undefined;
  }
}

/** The bytes a parent locator of `platformCode` holds for `path` (inverse of decode). */
export function encodeParentLocator(platformCode: string, path: string): Uint8Array {
  switch (platformCode) {
    case PLATFORM_MACX:
      return new TextEncoder().encode(`file://${path}`);
    case PLATFORM_W2KU:
    case PLATFORM_W2RU:
      return utf16(path, true);
    default:
      return new Uint8Array(Array.from(path, (c) => c.charCodeAt(0) & 0xff));
  }
}

/** Fields of a dynamic header to build. */
export interface VhdDynamicHeaderOptions {
  tableOffset: number;
  maxTableEntries: number;
  /** Default 2 MiB. */
  blockSize?: number;
  /** 16 bytes (differencing disks). */
  parentUuid?: Uint8Array;
  parentTimestamp?: Date;
  parentUnicodeName?: string;
  /** Up to 8 locators; `index` is ignored (their order is used). */
  parentLocators?: Omit<VhdParentLocator, "index">[];
}

/**
 * Builds a 1024-byte dynamic header with a valid checksum.
 *
 * @example The header of a dynamic disk with 4 KiB blocks
 * ```ts
 * import { buildVhdDynamicHeader, parseVhdDynamicHeader } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const bytes = buildVhdDynamicHeader({ tableOffset: 1536, maxTableEntries: 256, blockSize: 4096 });
 * assert.equal(bytes.length, 1024);
 * assert.equal(parseVhdDynamicHeader(bytes).maxTableEntries, 256);
 * ```
 */
export function buildVhdDynamicHeader(opts: VhdDynamicHeaderOptions): Uint8Array {
  const b = new Uint8Array(DYNAMIC_HEADER_SIZE);
  const v = viewOf(b);
  b.set(new TextEncoder().encode(DYNAMIC_COOKIE), 0);
  v.setBigUint64(8, NO_DATA_OFFSET);
  v.setBigUint64(16, BigInt(opts.tableOffset));
  v.setUint32(24, VHD_VERSION);
  v.setUint32(28, opts.maxTableEntries);
  v.setUint32(32, opts.blockSize ?? 2 * 1024 * 1024);
  if (opts.parentUuid) b.set(opts.parentUuid.subarray(0, 16), 40);
  if (opts.parentTimestamp) v.setUint32(56, vhdTimestamp(opts.parentTimestamp));
  if (opts.parentUnicodeName) {
    b.set(utf16(opts.parentUnicodeName, false).subarray(0, PARENT_NAME_SIZE), PARENT_NAME_OFFSET);
  }
  (opts.parentLocators ?? []).slice(0, PARENT_LOCATOR_COUNT).forEach((loc, i) => {
    const at = PARENT_LOCATORS_OFFSET + i * PARENT_LOCATOR_SIZE;
    for (let c = 0; c < 4; c++) b[at + c] = loc.platformCode.charCodeAt(c) || 0;
    v.setUint32(at + 4, loc.dataSpace);
    v.setUint32(at + 8, loc.dataLength);
    v.setBigUint64(at + 16, BigInt(loc.dataOffset));
  });
  v.setUint32(HEADER_CHECKSUM_OFFSET, vhdChecksum(b, HEADER_CHECKSUM_OFFSET));
  return b;
}

function utf16(text: string, littleEndian: boolean): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  const v = viewOf(out);
  for (let i = 0; i < text.length; i++) v.setUint16(i * 2, text.charCodeAt(i), littleEndian);
  return out;
}

function trimNul(text: string): string {
  const nul = text.indexOf("\0");
  return nul < 0 ? text : text.slice(0, nul);
}
