/**
 * qcow2 on-disk constants (formats.md; QEMU docs/interop/qcow2.rst).
 *
 * @module
 */

/** `QFI\xfb` */
export const QCOW2_MAGIC = 0x514649fb;
/** Header length QEMU writes for version 3 (and our writer). */
export const V3_HEADER_LENGTH = 112;
/** Header length of version 2. */
export const V2_HEADER_LENGTH = 72;
/** Smallest and largest cluster_bits QEMU accepts. */
export const MIN_CLUSTER_BITS = 9;
/** Largest cluster_bits QEMU accepts (2 MiB clusters). */
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limit on the L1 table: 32 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU's limit on the refcount table: 8 MiB. */
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;

/** L1/L2 entry bit 63: refcount is exactly one. */
export const OFLAG_COPIED = 1n << 63n;
/** L2 entry bit 62: compressed cluster. */
export const OFLAG_COMPRESSED = 1n << 62n;
/** L2 entry bit 0: reads as zeros (v3). */
export const OFLAG_ZERO = 1n;
/** Host offset bits 9–55 of L1 and standard L2 entries. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
/** Reserved bits of an L1 entry. */
export const L1_RESERVED_MASK = 0x7f000000000001ffn;
/** Reserved bits of a standard L2 entry. */
export const L2_RESERVED_MASK = 0x3f000000000001fen;
/** Refcount table entry: bits 9–63 are the refcount block offset. */
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
/** Image marked corrupt. */
export const INCOMPAT_CORRUPT = 1n << 1n;
/** Data lives in an external data file. */
export const INCOMPAT_DATA_FILE = 1n << 2n;
/** The compression_type header field is used. */
export const INCOMPAT_COMPRESSION = 1n << 3n;
/** Extended L2 entries (subclusters). */
export const INCOMPAT_EXTL2 = 1n << 4n;
/** Every incompatible bit this project knows of. */
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE |
  INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/** Compatible feature bit 0: lazy refcounts. */
export const COMPAT_LAZY_REFCOUNTS = 1n;
/** Autoclear bit 0: bitmaps extension is consistent. */
export const AUTOCLEAR_BITMAPS = 1n;
/** Autoclear bit 1: the external data file is raw. */
export const AUTOCLEAR_DATA_FILE_RAW = 2n;

/** Header extension types. */
export const EXT_END = 0x00000000;
/** Backing file format name. */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Feature name table. */
export const EXT_FEATURE_TABLE = 0x6803f857;
/** Bitmaps. */
export const EXT_BITMAPS = 0x23852875;
/** Full disk encryption header. */
export const EXT_CRYPTO = 0x0537be77;
/** External data file name. */
export const EXT_DATA_FILE = 0x44415441;

/** compression_type values. */
export const COMPRESSION_DEFLATE = 0;
/** zstd compression. */
export const COMPRESSION_ZSTD = 1;

/** The feature name table QEMU's qcow2-to-stdout.py writes, in its order. */
export const FEATURE_NAMES: readonly (readonly [type: number, bit: number, name: string])[] = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];
