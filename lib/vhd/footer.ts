/**
 * The 512-byte VHD footer: parse and validate it (cookie, checksum, disk type), and
 * build one. Pure functions on buffers, shared by `headers`/`info` (random access)
 * and `import` (a stream); nothing here reads a file.
 *
 * @module
 */
import { readU64, viewOf } from "../bytes.ts";
import { CorruptImageError } from "../errors.ts";
import {
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  FEATURES_RESERVED,
  FOOTER_CHECKSUM_OFFSET,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  NO_DATA_OFFSET,
  SECTOR_SIZE,
  VHD_EPOCH_MS,
  VHD_VERSION,
} from "./constants.ts";

/** Cylinders, heads and sectors per track, as stored in the footer. */
export interface VhdGeometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** A parsed VHD footer. */
export interface VhdFooter {
  features: number;
  fileFormatVersion: number;
  /** Byte offset of the dynamic header; `null` when all ones (fixed disks). */
  dataOffset: number | null;
  /** Seconds since 2000-01-01 00:00:00 UTC. */
  timestamp: number;
  /** Four characters, e.g. `qemu`, `tap\0`. */
  creatorApplication: string;
  creatorVersion: number;
  /** Four characters, e.g. `Wi2k`. */
  creatorHostOs: string;
  originalSize: number;
  /** The virtual size in bytes. */
  currentSize: number;
  geometry: VhdGeometry;
  /** 2 fixed, 3 dynamic, 4 differencing. */
  diskType: number;
  checksum: number;
  /** 16 bytes. */
  uniqueId: Uint8Array;
  savedState: boolean;
}

/** The name of a disk type for messages and `info`. */
export function diskTypeName(diskType: number): string {
  switch (diskType) {
    case DISK_TYPE_FIXED:
      return "fixed";
    case DISK_TYPE_DYNAMIC:
      return "dynamic";
    case DISK_TYPE_DIFFERENCING:
      return "differencing";
    default:
      return `unknown (${diskType})`;
  }
}

/**
 * The VHD checksum of `bytes`: one's complement of the sum of all bytes, the four
 * bytes of the checksum field at `checksumOffset` counted as zero.
 */
export function vhdChecksum(bytes: Uint8Array, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i < checksumOffset || i >= checksumOffset + 4) sum += bytes[i];
  }
  return ~sum >>> 0;
}

const latin1 = new TextDecoder("latin1");

/** Four bytes as text (NULs kept, so `tap\0` stays distinct from `tap `). */
export function fourCC(bytes: Uint8Array, offset: number): string {
  return latin1.decode(bytes.subarray(offset, offset + 4));
}

/** True if `bytes` starts with the footer cookie `conectix`. */
export function isVhdFooter(bytes: Uint8Array): boolean {
  return bytes.length >= 8 && latin1.decode(bytes.subarray(0, 8)) === FOOTER_COOKIE;
}

/**
 * The first `size` bytes of `bytes` as a checked VHD structure (`what`: "footer" or
 * "dynamic header"): long enough, starting with `cookie`, and with a matching checksum
 * at `checksumOffset`. `base` is where the bytes lie in the file, for error offsets.
 */
export function checkedVhdStructure(
  bytes: Uint8Array,
  base: number,
  what: string,
  size: number,
  cookie: string,
  checksumOffset: number,
): Uint8Array {
  if (bytes.length < size) {
    throw new CorruptImageError(
      `VHD ${what} truncated: ${bytes.length} bytes, need ${size}`,
      base + bytes.length,
    );
  }
  const b = bytes.subarray(0, size);
  const found = latin1.decode(b.subarray(0, 8));
  if (found !== cookie) {
    throw new CorruptImageError(
      `not a VHD ${what}: cookie is ${JSON.stringify(found)}, expected "${cookie}"`,
      base,
    );
  }
  const checksum = viewOf(b).getUint32(checksumOffset);
  const computed = vhdChecksum(b, checksumOffset);
  if (checksum !== computed) {
    throw new CorruptImageError(
      `VHD ${what} checksum mismatch: stored 0x${hex32(checksum)}, computed 0x${hex32(computed)}`,
      base + checksumOffset,
    );
  }
  return b;
}

/**
 * Parses and validates a footer from the first 512 bytes of `bytes`. `base` is the
 * footer's byte offset in the file or stream, used in error messages. Throws
 * {@link CorruptImageError} for a short buffer, a wrong cookie, a checksum mismatch or
 * an unknown disk type.
 *
 * @example Parse a footer and catch a damaged one
 * ```ts
 * import { buildVhdFooter, CorruptImageError, parseVhdFooter } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const bytes = buildVhdFooter({ diskType: 3, currentSize: 32 << 20 });
 * const footer = parseVhdFooter(bytes);
 * assert.equal(footer.currentSize, 32 << 20);
 * assert.equal(footer.dataOffset, 512);
 *
 * bytes[50] ^= 1; // the checksum no longer matches
 * assert.throws(() => parseVhdFooter(bytes, 4096), (e) => e instanceof CorruptImageError && e.offset === 4160);
 * ```
 */
export function parseVhdFooter(bytes: Uint8Array, base = 0): VhdFooter {
  const b = checkedVhdStructure(
    bytes,
    base,
    "footer",
    FOOTER_SIZE,
    FOOTER_COOKIE,
    FOOTER_CHECKSUM_OFFSET,
  );
  const v = viewOf(b);
  const checksum = v.getUint32(FOOTER_CHECKSUM_OFFSET);
  const diskType = v.getUint32(60);
  if (
    diskType !== DISK_TYPE_FIXED && diskType !== DISK_TYPE_DYNAMIC &&
    diskType !== DISK_TYPE_DIFFERENCING
  ) {
    throw new CorruptImageError(
      `VHD disk type ${diskType} is not one of 2 (fixed), 3 (dynamic), 4 (differencing)`,
      base + 60,
    );
  }
  const rawDataOffset = v.getBigUint64(16);
  return {
    features: v.getUint32(8),
    fileFormatVersion: v.getUint32(12),
    dataOffset: rawDataOffset === NO_DATA_OFFSET
      ? null
      : readU64(v, 16, "VHD footer data_offset", base),
    timestamp: v.getUint32(24),
    creatorApplication: fourCC(b, 28),
    creatorVersion: v.getUint32(32),
    creatorHostOs: fourCC(b, 36),
    originalSize: readU64(v, 40, "VHD footer original size", base),
    currentSize: readU64(v, 48, "VHD footer current size", base),
    geometry: {
      cylinders: v.getUint16(56),
      heads: v.getUint8(58),
      sectorsPerTrack: v.getUint8(59),
    },
    diskType,
    checksum,
    uniqueId: b.slice(68, 84),
    savedState: b[84] !== 0,
  };
}

/**
 * The CHS geometry the VHD specification derives from a size (its appendix
 * algorithm); sizes above 65535 × 16 × 255 sectors get that maximum.
 */
export function vhdGeometry(size: number): VhdGeometry {
  let total = Math.floor(size / SECTOR_SIZE);
  if (total > 65535 * 16 * 255) total = 65535 * 16 * 255;
  let spt: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.floor((cth + 1023) / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

/** Fields of a footer to build; everything but the type and size has a default. */
export interface VhdFooterOptions {
  /** 2 fixed, 3 dynamic, 4 differencing. */
  diskType: number;
  /** Virtual size in bytes. */
  currentSize: number;
  /** Defaults to `currentSize`. */
  originalSize?: number;
  /** Dynamic header offset; default 512 for dynamic/differencing, all ones for fixed. */
  dataOffset?: number | null;
  /** Defaults to now. */
  timestamp?: Date;
  /** Four characters; default `dstr`. */
  creatorApplication?: string;
  /** Default 0x00010000. */
  creatorVersion?: number;
  /** Four characters; default `Wi2k`. */
  creatorHostOs?: string;
  /** Default: {@link vhdGeometry} of `currentSize`. */
  geometry?: VhdGeometry;
  /** 16 bytes; default random (a version 4 UUID). */
  uniqueId?: Uint8Array;
  savedState?: boolean;
}

/** Seconds since the VHD epoch (2000-01-01 UTC) for a date, clamped to u32. */
export function vhdTimestamp(date: Date): number {
  const s = Math.floor((date.getTime() - VHD_EPOCH_MS) / 1000);
  return Math.min(Math.max(s, 0), 0xffffffff);
}

/**
 * Builds a 512-byte footer with a valid checksum.
 *
 * @example A fixed disk's footer
 * ```ts
 * import { buildVhdFooter, parseVhdFooter } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const footer = buildVhdFooter({ diskType: 2, currentSize: 1 << 20, creatorApplication: "test" });
 * assert.equal(footer.length, 512);
 * assert.equal(new TextDecoder().decode(footer.subarray(0, 8)), "conectix");
 * assert.equal(parseVhdFooter(footer).dataOffset, null); // fixed disks have no header
 * ```
 */
export function buildVhdFooter(opts: VhdFooterOptions): Uint8Array {
  const b = new Uint8Array(FOOTER_SIZE);
  const v = viewOf(b);
  const ascii = (text: string, offset: number) => {
    for (let i = 0; i < 4; i++) b[offset + i] = text.charCodeAt(i) || 0;
  };
  b.set(new TextEncoder().encode(FOOTER_COOKIE), 0);
  v.setUint32(8, FEATURES_RESERVED);
  v.setUint32(12, VHD_VERSION);
  const fixed = opts.diskType === DISK_TYPE_FIXED;
  const dataOffset = opts.dataOffset === undefined ? (fixed ? null : 512) : opts.dataOffset;
  v.setBigUint64(16, dataOffset === null ? NO_DATA_OFFSET : BigInt(dataOffset));
  v.setUint32(24, vhdTimestamp(opts.timestamp ?? new Date()));
  ascii(opts.creatorApplication ?? "dstr", 28);
  v.setUint32(32, opts.creatorVersion ?? VHD_VERSION);
  ascii(opts.creatorHostOs ?? "Wi2k", 36);
  v.setBigUint64(40, BigInt(opts.originalSize ?? opts.currentSize));
  v.setBigUint64(48, BigInt(opts.currentSize));
  const g = opts.geometry ?? vhdGeometry(opts.currentSize);
  v.setUint16(56, g.cylinders);
  v.setUint8(58, g.heads);
  v.setUint8(59, g.sectorsPerTrack);
  v.setUint32(60, opts.diskType);
  b.set(opts.uniqueId ?? randomUuid(), 68);
  b[84] = opts.savedState ? 1 : 0;
  v.setUint32(FOOTER_CHECKSUM_OFFSET, vhdChecksum(b, FOOTER_CHECKSUM_OFFSET));
  return b;
}

/** 16 random bytes shaped as a version 4 UUID. */
export function randomUuid(): Uint8Array {
  const id = crypto.getRandomValues(new Uint8Array(16));
  id[6] = (id[6] & 0x0f) | 0x40;
  id[8] = (id[8] & 0x3f) | 0x80;
  return id;
}

/** A 16-byte UUID in its usual text form. */
export function formatUuid(id: Uint8Array): string {
  const h = Array.from(id, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** `n` as 8 hex digits, for messages. */
export function hex32(n: number): string {
  return n.toString(16).padStart(8, "0");
}
