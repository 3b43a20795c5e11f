/**
 * VHD on-disk constants (formats.md; Microsoft's Virtual Hard Disk Image Format
 * Specification). All integers on disk are big-endian.
 *
 * @module
 */

/** Sector size: the unit of BAT entries and block bitmaps. */
export const SECTOR_SIZE = 512;
/** Size of the footer (and of its copy at offset 0 of a dynamic disk). */
export const FOOTER_SIZE = 512;
/** Size of the dynamic disk header. */
export const DYNAMIC_HEADER_SIZE = 1024;
/** Footer cookie. */
export const FOOTER_COOKIE = "conectix";
/** Dynamic disk header cookie. */
export const DYNAMIC_COOKIE = "cxsparse";
/** Footer `features` value: bit 1 ("reserved") is always set. */
export const FEATURES_RESERVED = 0x00000002;
/** Footer file format version and dynamic header version (1.0). */
export const VHD_VERSION = 0x00010000;
/** `data_offset` of a fixed disk's footer (and of the dynamic header): all ones. */
export const NO_DATA_OFFSET = 0xffffffffffffffffn;
/** A BAT entry for a block that is not allocated. */
export const BAT_UNUSED = 0xffffffff;
/** The largest virtual size QEMU and vhd-tool accept for a VHD: 2040 GiB. */
export const VHD_MAX_SIZE = 2040 * 2 ** 30;
/** Block size most tools write (and the only one vhd-tool writes): 2 MiB. */
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
/** VHD timestamps count seconds from 2000-01-01 00:00:00 UTC. */
export const VHD_EPOCH_MS = Date.UTC(2000, 0, 1);

/** Footer disk types. */
export const DISK_TYPE_FIXED = 2;
/** A dynamic (sparse) disk. */
export const DISK_TYPE_DYNAMIC = 3;
/** A differencing disk: unallocated sectors read from the parent. */
export const DISK_TYPE_DIFFERENCING = 4;

/** Footer field offsets. */
export const FOOTER_CHECKSUM_OFFSET = 64;
/** Dynamic header checksum field offset. */
export const HEADER_CHECKSUM_OFFSET = 36;
/** Parent unicode name (UTF-16BE, 512 bytes) in the dynamic header. */
export const PARENT_NAME_OFFSET = 64;
/** Size of the parent unicode name field. */
export const PARENT_NAME_SIZE = 512;
/** First parent locator entry in the dynamic header. */
export const PARENT_LOCATORS_OFFSET = 576;
/** Size of one parent locator entry. */
export const PARENT_LOCATOR_SIZE = 24;
/** Number of parent locator entries. */
export const PARENT_LOCATOR_COUNT = 8;

/** Parent locator platform codes (four ASCII characters on disk). */
export const PLATFORM_NONE = "\0\0\0\0";
/** Mac OS X: a `file://` URL in UTF-8 (what XenServer/vhd-util write). */
export const PLATFORM_MACX = "MacX";
/** Windows relative path, UTF-16LE (Hyper-V). */
export const PLATFORM_W2RU = "W2ru";
/** Windows absolute path, UTF-16LE (Hyper-V). */
export const PLATFORM_W2KU = "W2ku";
/** Deprecated Windows relative path (ASCII). */
export const PLATFORM_WI2R = "Wi2r";
/** Deprecated Windows absolute path (ASCII). */
export const PLATFORM_WI2K = "Wi2k";
