/**
 * The dynamic VHD stream layout of `vhd-tool stream --source-format raw
 * --destination-format vhd` (xen-api's `vhd_format`, `Raw_input.vhd`), computed
 * before the first byte so that the image can be written without seeking:
 *
 * | bytes | content |
 * |---|---|
 * | 0–511 | footer copy |
 * | 512–1535 | dynamic header: BAT at 2048, `max_table_entries` = ceil(size / 2 MiB), 2 MiB blocks, no parent |
 * | 1536–2047 | zeros (the sector vhd-tool keeps for a parent locator) |
 * | 2048… | BAT: one u32 sector offset per block, `0xFFFFFFFF` for the others and for the padding to a whole sector |
 * | next sector | each written block in ascending order: a 512-byte all-ones sector bitmap, then its 2 MiB of data |
 * | last 512 | the footer (the same bytes as the copy) |
 *
 * The first block starts right after the BAT (sector aligned, no further alignment);
 * there is no batmap, as with vhd-tool's raw input. The last block is written whole:
 * bytes past the source's end are zeros.
 *
 * @module
 */
import { alignUp, viewOf } from "../bytes.ts";
import { setRuns } from "../alloc/runs.ts";
import type { ClusterSet } from "../alloc/cluster_set.ts";
import { LimitError } from "../errors.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { ChunkSink, type ClusterReader } from "../qcow2/writer.ts";
import { formatBytes } from "../size.ts";
import {
  DEFAULT_BLOCK_SIZE,
  DISK_TYPE_DYNAMIC,
  FOOTER_SIZE,
  SECTOR_SIZE,
  VHD_MAX_SIZE,
} from "./constants.ts";
import { blockBitmapSize, buildVhdDynamicHeader } from "./dynamic_header.ts";
import { buildVhdFooter } from "./footer.ts";

/** Where vhd-tool puts the BAT: after the footer copy, the header and one spare sector. */
export const VHD_TABLE_OFFSET = 2048;
export { VHD_MAX_SIZE };
/**
 * The footer's creator application: QEMU's marker for "the size is `current_size`"
 * (see {@link VhdFooterFields}). vhd-tool writes `caml`, which QEMU reads by CHS.
 */
export const VHD_CREATOR_APPLICATION = "qem2";
/** Creator version and host OS as vhd-tool writes them (1 and 0). */
export const VHD_CREATOR_VERSION = 0x00000001;
/** Creator host OS as vhd-tool writes it: four zero bytes. */
export const VHD_CREATOR_HOST_OS = "\0\0\0\0";

/** Where everything of a streamed dynamic VHD goes. Offsets and sizes in bytes. */
export interface VhdLayout {
  /** The footer's `current_size`: the source size rounded up to 512. */
  virtualSize: number;
  /** Block size (2 MiB). */
  blockSize: number;
  /** BAT entries: `ceil(virtualSize / blockSize)`. */
  maxTableEntries: number;
  /** Byte offset of the BAT (2048). */
  tableOffset: number;
  /** Bytes of the BAT, padded to a sector. */
  tableBytes: number;
  /** Bytes of each block's sector bitmap (512 for 2 MiB blocks). */
  bitmapBytes: number;
  /** Byte offset of the first block's bitmap: right after the BAT. */
  firstBlockOffset: number;
  /** Blocks written. */
  dataBlocks: number;
  /** Size of the whole stream, the final footer included. */
  fileSize: number;
}

/**
 * The layout of a dynamic VHD of `virtualSize` bytes (a multiple of 512) holding
 * `dataBlocks` blocks. Throws {@link LimitError} above 2040 GiB.
 */
export function vhdLayout(
  virtualSize: number,
  dataBlocks: number,
  blockSize = DEFAULT_BLOCK_SIZE,
): VhdLayout {
  if (virtualSize > VHD_MAX_SIZE) {
    throw new LimitError(
      `a VHD holds at most 2040 GiB, but the disk has ${virtualSize} bytes (${
        formatBytes(virtualSize)
      }): export it as qcow2 (-f qcow2)`,
    );
  }
  const maxTableEntries = Math.ceil(virtualSize / blockSize);
  const tableBytes = alignUp(maxTableEntries * 4, SECTOR_SIZE);
  const bitmapBytes = blockBitmapSize(blockSize);
  const firstBlockOffset = VHD_TABLE_OFFSET + tableBytes;
  return {
    virtualSize,
    blockSize,
    maxTableEntries,
    tableOffset: VHD_TABLE_OFFSET,
    tableBytes,
    bitmapBytes,
    firstBlockOffset,
    dataBlocks,
    fileSize: firstBlockOffset + dataBlocks * (bitmapBytes + blockSize) + FOOTER_SIZE,
  };
}

/** Footer fields a caller may choose; the rest follow from the layout. */
export interface VhdFooterFields {
  /** Creation time (default: now; vhd-tool writes 0, i.e. 2000-01-01). */
  timestamp?: Date;
  /** The disk's 16-byte UUID (default: a random version 4 UUID, as vhd-tool). */
  uniqueId?: Uint8Array;
  /**
   * Four characters (default `qem2`). QEMU's vpc driver takes the virtual size from
   * `current_size` only for `qem2`, `win `, `d2v `, `CTXS` and `tap\0` (or a maximal
   * CHS geometry); for any other creator — vhd-tool's `caml` included — it uses
   * cylinders × heads × sectors per track, which is smaller than `current_size`
   * whenever the size is not CHS-representable. `tap\0` would also make XenServer's
   * blktap expect a batmap (versions ≥ 1.2) or little-endian bitmaps (version 0.1).
   */
  creatorApplication?: string;
}

/**
 * The 512-byte footer of the stream (written at 0 and at the end): a dynamic disk,
 * header at 512, `current_size` and `original_size` = the layout's virtual size,
 * creator version 1 and host OS 0 (vhd-tool's), no saved state.
 *
 * The geometry is the VHD specification's CHS for the size (as vhd-tool computes it),
 * which rounds down: for most sizes C × H × S × 512 is a little smaller than
 * `current_size` (a 32 MiB disk has 31.97 MiB of CHS), and above 65535 × 16 × 255
 * sectors (about 127 GiB) it stays at that maximum. Readers that size the disk from
 * `current_size` (QEMU for the `qem2` creator, Hyper-V, XenServer, this tool) see
 * every byte; a reader that insists on CHS would miss the last partial cylinder.
 */
export function vhdStreamFooter(layout: VhdLayout, fields: VhdFooterFields = {}): Uint8Array {
  return buildVhdFooter({
    diskType: DISK_TYPE_DYNAMIC,
    currentSize: layout.virtualSize,
    dataOffset: FOOTER_SIZE,
    timestamp: fields.timestamp,
    creatorApplication: fields.creatorApplication ?? VHD_CREATOR_APPLICATION,
    creatorVersion: VHD_CREATOR_VERSION,
    creatorHostOs: VHD_CREATOR_HOST_OS,
    uniqueId: fields.uniqueId,
  });
}

/**
 * The bytes before the first block (`layout.firstBlockOffset` of them): footer copy,
 * dynamic header, the spare sector and the BAT for `blocks` (2 MiB guest blocks).
 * The BAT is at most 4 MiB (2040 GiB of disk).
 */
export function vhdHead(layout: VhdLayout, blocks: ClusterSet, footer: Uint8Array): Uint8Array {
  const head = new Uint8Array(layout.firstBlockOffset);
  head.set(footer, 0);
  head.set(
    buildVhdDynamicHeader({
      tableOffset: layout.tableOffset,
      maxTableEntries: layout.maxTableEntries,
      blockSize: layout.blockSize,
    }),
    FOOTER_SIZE,
  );
  const bat = head.subarray(layout.tableOffset);
  bat.fill(0xff);
  const v = viewOf(bat);
  const step = (layout.bitmapBytes + layout.blockSize) / SECTOR_SIZE;
  let sector = layout.firstBlockOffset / SECTOR_SIZE;
  for (const [first, last] of setRuns(blocks)) {
    for (let i = first; i <= last; i++, sector += step) v.setUint32(i * 4, sector);
  }
  return head;
}

/** What {@link vhdChunks} needs besides the layout. */
export interface VhdChunkOptions {
  /** Bytes of the source that exist (beyond: zeros); default the virtual size. */
  sourceSize?: number;
  /** Target chunk size in bytes (rounded to whole blocks with their bitmaps); default 4 MiB. */
  chunkSize?: number;
  /** Recycle a small ring of chunk buffers (each chunk valid until the next is read). */
  reuseBuffers?: boolean;
}

/**
 * The bytes of the image, in chunks of about `chunkSize`: the head, then the blocks
 * `blocks` (ascending), each block's data read from `source` straight into the chunk
 * that carries it, then the footer.
 */
export async function* vhdChunks(
  layout: VhdLayout,
  blocks: ClusterSet,
  source: ClusterReader,
  footer: Uint8Array,
  options: VhdChunkOptions = {},
): AsyncGenerator<Uint8Array> {
  const bs = layout.blockSize;
  const unit = layout.bitmapBytes + bs;
  const perChunk = Math.max(1, Math.round((options.chunkSize ?? CHUNK_SIZE) / unit));
  const limit = options.sourceSize ?? layout.virtualSize;
  yield vhdHead(layout, blocks, footer);
  const sink = new ChunkSink(
    layout.fileSize - layout.firstBlockOffset,
    perChunk * unit,
    options.reuseBuffers === true,
  );
  for (const [first, last] of setRuns(blocks)) {
    for (let i = first; i <= last; i++) {
      if (sink.free < unit) {
        sink.flush();
        yield* sink.drain();
      }
      sink.take(layout.bitmapBytes, false).fill(0xff);
      await source.readAt(sink.take(bs, false), i * bs, limit);
    }
  }
  sink.take(FOOTER_SIZE, false).set(footer);
  sink.flush();
  yield* sink.drain();
}
