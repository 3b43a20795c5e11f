/**
 * Parsing and validating a qcow2 header (versions 2 and 3) with its extensions, from
 * the bytes of cluster 0. Used by `headers`/`info` (random access) and by `import`
 * (a stream), so it works on a buffer and never reads a file itself.
 *
 * @module
 */
import { readU64, viewOf } from "../bytes.ts";
import { CorruptImageError, UnsupportedError } from "../errors.ts";
import {
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_DATA_FILE,
  EXT_END,
  INCOMPAT_COMPRESSION,
  INCOMPAT_KNOWN,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  V2_HEADER_LENGTH,
} from "./constants.ts";

/** One header extension: its type and where its data lies in cluster 0. */
export interface Qcow2Extension {
  type: number;
  /** Byte offset of the extension's data (after type and length). */
  offset: number;
  length: number;
}

/** A parsed qcow2 header. Offsets and sizes are byte counts (safe integers). */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  refcountBits: number;
  headerLength: number;
  /** 0 deflate, 1 zstd. */
  compressionType: number;
  extensions: Qcow2Extension[];
  /** Backing file name, when the header names one. */
  backingFile?: string;
  /** Backing file format (extension 0xE2792ACA), when present. */
  backingFormat?: string;
  /** External data file name (extension 0x44415441), when present. */
  dataFile?: string;
  /** Where the bitmap directory is (extension 0x23852875), when present. */
  bitmapDirectory?: { offset: number; size: number };
}

/** Bytes needed to parse the fixed part of any header (v3 with compression type). */
export const HEADER_PROBE_BYTES = 512;

/** True if `bytes` starts with the qcow2 magic. */
export function isQcow2(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && viewOf(bytes).getUint32(0) === QCOW2_MAGIC;
}

const decoder = new TextDecoder();

/**
 * Parses and validates the header in `cluster0` (at least the whole first cluster
 * for extensions and the backing file name; {@link HEADER_PROBE_BYTES} is enough to
 * learn the cluster size). `fileSize`, when known, bounds table offsets. Throws
 * {@link CorruptImageError} (with the byte offset) for a malformed header and
 * {@link UnsupportedError} for unknown incompatible features.
 */
export function parseQcow2Header(cluster0: Uint8Array, fileSize?: number): Qcow2Header {
  if (cluster0.length < V2_HEADER_LENGTH) {
    throw new CorruptImageError(
      `qcow2 header truncated: ${cluster0.length} bytes, need ${V2_HEADER_LENGTH}`,
      cluster0.length,
    );
  }
  const v = viewOf(cluster0);
  if (v.getUint32(0) !== QCOW2_MAGIC) {
    throw new CorruptImageError(`not a qcow2 image: bad magic 0x${hex(v.getUint32(0))}`, 0);
  }
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedError(`qcow2 version ${version} is not supported (only 2 and 3)`);
  }
  const clusterBits = v.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new CorruptImageError(
      `qcow2 cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}–${MAX_CLUSTER_BITS}`,
      20,
    );
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: readU64(v, 8, "backing_file_offset"),
    backingFileSize: v.getUint32(16),
    clusterBits,
    clusterSize,
    size: readU64(v, 24, "virtual size"),
    cryptMethod: v.getUint32(32),
    l1Size: v.getUint32(36),
    l1TableOffset: readU64(v, 40, "l1_table_offset"),
    refcountTableOffset: readU64(v, 48, "refcount_table_offset"),
    refcountTableClusters: v.getUint32(56),
    nbSnapshots: v.getUint32(60),
    snapshotsOffset: readU64(v, 64, "snapshots_offset"),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    refcountBits: 16,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_DEFLATE,
    extensions: [],
  };
  if (version === 3) {
    if (cluster0.length < 104) {
      throw new CorruptImageError("qcow2 v3 header truncated", cluster0.length);
    }
    h.incompatibleFeatures = v.getBigUint64(72);
    h.compatibleFeatures = v.getBigUint64(80);
    h.autoclearFeatures = v.getBigUint64(88);
    h.refcountOrder = v.getUint32(96);
    h.headerLength = v.getUint32(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > clusterSize) {
      throw new CorruptImageError(`qcow2 header_length ${h.headerLength} is invalid`, 100);
    }
    if (h.refcountOrder > 6) {
      throw new CorruptImageError(`qcow2 refcount_order ${h.refcountOrder} is above 6`, 96);
    }
    h.refcountBits = 2 ** h.refcountOrder;
    if (h.headerLength > 104) {
      if (cluster0.length < 105) throw new CorruptImageError("qcow2 header truncated", 104);
      h.compressionType = cluster0[104];
    }
  }
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    throw new UnsupportedError(
      `qcow2 image uses unknown incompatible features 0x${
        unknown.toString(16)
      }; refusing to read it`,
    );
  }
  if ((h.incompatibleFeatures & INCOMPAT_COMPRESSION) === 0n && h.compressionType !== 0) {
    throw new CorruptImageError(
      `qcow2 compression_type ${h.compressionType} without the compression type feature bit`,
      104,
    );
  }
  if (h.compressionType !== COMPRESSION_DEFLATE && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedError(`qcow2 compression type ${h.compressionType} is unknown`);
  }
  validateLayout(h, fileSize);
  parseExtensions(cluster0, h);
  if (h.backingFileOffset !== 0) {
    const end = h.backingFileOffset + h.backingFileSize;
    if (h.backingFileSize > 1023 || end > clusterSize) {
      throw new CorruptImageError(
        `qcow2 backing file name (${h.backingFileSize} bytes at ${h.backingFileOffset}) is outside the first cluster`,
        8,
      );
    }
    if (end <= cluster0.length) {
      h.backingFile = decoder.decode(cluster0.subarray(h.backingFileOffset, end));
    }
  }
  return h;
}

function validateLayout(h: Qcow2Header, fileSize?: number): void {
  const cs = h.clusterSize;
  const l2Entries = cs / 8;
  const needL1 = Math.ceil(Math.ceil(h.size / cs) / l2Entries);
  if (h.l1Size < needL1) {
    throw new CorruptImageError(
      `qcow2 l1_size ${h.l1Size} cannot map the virtual size ${h.size} (needs ${needL1})`,
      36,
    );
  }
  if (h.l1Size * 8 > MAX_L1_BYTES) {
    throw new CorruptImageError(`qcow2 L1 table of ${h.l1Size} entries exceeds 32 MiB`, 36);
  }
  if (h.refcountTableClusters * cs > MAX_REFCOUNT_TABLE_BYTES) {
    throw new CorruptImageError(
      `qcow2 refcount table of ${h.refcountTableClusters} clusters exceeds 8 MiB`,
      56,
    );
  }
  const aligned: [string, number, number][] = [
    ["l1_table_offset", h.l1TableOffset, 40],
    ["refcount_table_offset", h.refcountTableOffset, 48],
  ];
  if (h.nbSnapshots > 0) aligned.push(["snapshots_offset", h.snapshotsOffset, 64]);
  for (const [name, off, at] of aligned) {
    if (off % cs !== 0) {
      throw new CorruptImageError(`qcow2 ${name} ${off} is not cluster aligned`, at);
    }
  }
  if (fileSize !== undefined) {
    if (h.l1Size > 0 && h.l1TableOffset + h.l1Size * 8 > fileSize) {
      throw new CorruptImageError(
        `qcow2 L1 table (${h.l1Size} entries at ${h.l1TableOffset}) lies past the end of the ${fileSize}-byte file`,
        40,
      );
    }
    if (h.refcountTableOffset + h.refcountTableClusters * cs > fileSize) {
      throw new CorruptImageError(
        `qcow2 refcount table at ${h.refcountTableOffset} lies past the end of the ${fileSize}-byte file`,
        48,
      );
    }
  }
}

function parseExtensions(cluster0: Uint8Array, h: Qcow2Header): void {
  const v = viewOf(cluster0);
  let off = h.headerLength;
  // v2 images may carry extensions too (after the 72-byte header). As in QEMU, they
  // end at an end marker, at the backing file name (QEMU 0.10 and older wrote the name
  // right after the 72-byte header, with no extensions), or at the end of the cluster.
  const end = h.backingFileOffset > 0
    ? Math.min(h.backingFileOffset, h.clusterSize)
    : h.clusterSize;
  const limit = Math.min(cluster0.length, end);
  while (off + 8 <= limit) {
    const type = v.getUint32(off);
    const length = v.getUint32(off + 4);
    if (type === EXT_END) return;
    const data = off + 8;
    if (data + length > end) {
      throw new CorruptImageError(
        `qcow2 header extension 0x${hex(type)} (${length} bytes) runs past the end of the ` +
          (end < h.clusterSize ? `extensions (the backing file name at ${end})` : "first cluster"),
        off,
      );
    }
    if (data + length > cluster0.length) return; // caller gave only a probe
    h.extensions.push({ type, offset: data, length });
    const text = () => decoder.decode(cluster0.subarray(data, data + length));
    if (type === EXT_BACKING_FORMAT) h.backingFormat = text();
    if (type === EXT_DATA_FILE) h.dataFile = text();
    if (type === EXT_BITMAPS && length >= 24) {
      const size = v.getBigUint64(data + 8);
      const offset = v.getBigUint64(data + 16);
      if (size <= BigInt(Number.MAX_SAFE_INTEGER) && offset <= BigInt(Number.MAX_SAFE_INTEGER)) {
        h.bitmapDirectory = { offset: Number(offset), size: Number(size) };
      }
    }
    off = data + Math.ceil(length / 8) * 8;
  }
}

function hex(n: number): string {
  return n.toString(16).padStart(8, "0");
}
