/**
 * Random-access VHD reader for `headers`/`info`: footer (the copy at offset 0 and the
 * original at the end of a dynamic disk), dynamic header and BAT, read in one go each;
 * the blocks themselves are never read. A block is allocated when its BAT entry is
 * set, among the `ceil(current_size / block_size)` entries that count (vhd-tool's
 * rule). A differencing disk's parent is found through its parent locators the way
 * vhd-tool does, relative to the child's folder.
 *
 * @module
 */
import { basename, dirname, isAbsolute, join } from "node:path";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { CorruptImageError } from "../errors.ts";
import { type ImageFile, isImagePath, rawDataClusters } from "../io/image_file.ts";
import {
  BAT_UNUSED,
  DEFAULT_BLOCK_SIZE,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_FIXED,
  DYNAMIC_HEADER_SIZE,
  FOOTER_SIZE,
  PLATFORM_MACX,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  PLATFORM_WI2K,
  PLATFORM_WI2R,
  SECTOR_SIZE,
} from "./constants.ts";
import {
  blockBitmapSize,
  checkVhdTables,
  decodeParentLocator,
  parseVhdDynamicHeader,
  usedBatEntries,
  type VhdDynamicHeader,
} from "./dynamic_header.ts";
import { isVhdFooter, parseVhdFooter, type VhdFooter } from "./footer.ts";

/** Where a differencing disk's parent is, as far as its locators say. */
export interface VhdParentRef {
  /** The first name the locators give (for messages and `info`). */
  name: string;
  /** The first candidate that exists, or undefined when none does. */
  path?: string;
  /** Every path tried, in order. */
  tried: string[];
}

/** What the metadata of one VHD file says. */
export interface VhdMap {
  footer: VhdFooter;
  /** Null for a fixed disk. */
  header: VhdDynamicHeader | null;
  /** Block size of the dynamic disk; 2 MiB for a fixed disk (vhd-tool's unit). */
  blockSize: number;
  /** Blocks that hold data in this file (fixed disks: every block with data extents). */
  data: ClusterSet;
  /** A dynamic disk's BAT: each block's first sector (its bitmap), or BAT_UNUSED. */
  bat?: Uint32Array;
  /** The parent of a differencing disk. */
  parent?: VhdParentRef;
}

/**
 * Reads the VHD in `file`: a dynamic or differencing disk when it starts with the
 * footer copy, else a fixed disk (footer in the last 512 bytes only). Throws
 * {@link CorruptImageError} with the byte offset for a bad cookie or checksum, a
 * missing or disagreeing end footer (a truncated file), tables past the end of the
 * file, or a BAT entry pointing past it.
 */
export async function readVhdMap(file: ImageFile, searchDirs: string[] = []): Promise<VhdMap> {
  if (file.size < FOOTER_SIZE) {
    throw new CorruptImageError(
      `VHD truncated: the file has ${file.size} bytes, less than one footer`,
      file.size,
    );
  }
  const endAt = file.size - FOOTER_SIZE;
  const head = await file.readAt(0, FOOTER_SIZE, "VHD footer copy");
  if (!isVhdFooter(head)) {
    const footer = parseVhdFooter(await file.readAt(endAt, FOOTER_SIZE, "VHD footer"), endAt);
    if (footer.diskType !== DISK_TYPE_FIXED) {
      throw new CorruptImageError(
        `VHD footer copy at offset 0 is missing for a ${
          footer.diskType === DISK_TYPE_DIFFERENCING ? "differencing" : "dynamic"
        } disk`,
        0,
      );
    }
    return readFixed(file, footer);
  }
  const copy = parseVhdFooter(head, 0);
  const tail = await file.readAt(endAt, FOOTER_SIZE, "VHD footer");
  if (!isVhdFooter(tail)) {
    throw new CorruptImageError(
      "VHD footer missing from the last 512 bytes of the file (a truncated file?)",
      endAt,
    );
  }
  const footer = parseVhdFooter(tail, endAt);
  if (footer.currentSize !== copy.currentSize || footer.diskType !== copy.diskType) {
    throw new CorruptImageError(
      `VHD footer at the end (${footer.currentSize} bytes, type ${footer.diskType}) disagrees with its copy at offset 0 (${copy.currentSize} bytes, type ${copy.diskType})`,
      endAt,
    );
  }
  if (footer.diskType === DISK_TYPE_FIXED) {
    throw new CorruptImageError("fixed VHD with a footer copy at offset 0", 0);
  }
  const at = copy.dataOffset;
  if (at === null) {
    throw new CorruptImageError("dynamic VHD footer has no dynamic header offset", 16);
  }
  const header = parseVhdDynamicHeader(
    await file.readAt(at, DYNAMIC_HEADER_SIZE, "VHD dynamic header"),
    at,
  );
  checkVhdTables(header, footer.currentSize, at, file.size);
  const { data, bat } = readBat(file, header, footer.currentSize, at);
  const map: VhdMap = { footer, header, blockSize: header.blockSize, data, bat };
  if (footer.diskType === DISK_TYPE_DIFFERENCING) {
    map.parent = await findParent(file, header, searchDirs);
  }
  return map;
}

/** BAT bytes read at a time: memory stays bounded whatever the BAT's size. */
const BAT_CHUNK = 4 * 1024 * 1024;

/**
 * The allocated blocks of the BAT, read in pieces. A block placed inside the footer
 * copy, the dynamic header (at `headerAt`) or the BAT is corruption (a BAT that is a
 * hole in a sparse file reads as blocks at sector 0), and so is one past the end.
 */
function readBat(
  file: ImageFile,
  header: VhdDynamicHeader,
  currentSize: number,
  headerAt: number,
): { data: ClusterSet; bat: Uint32Array } {
  const used = usedBatEntries(currentSize, header.blockSize);
  const data = new ClusterSet(used, header.blockSize);
  const entries = new Uint32Array(used).fill(BAT_UNUSED);
  const bitmap = blockBitmapSize(header.blockSize);
  const metadata: [number, number, string][] = [
    [0, FOOTER_SIZE, "the footer copy"],
    [headerAt, headerAt + DYNAMIC_HEADER_SIZE, "the dynamic header"],
    [header.tableOffset, header.tableOffset + used * 4, "the BAT"],
  ];
  const buffer = new Uint8Array(Math.min(used * 4, BAT_CHUNK));
  for (let first = 0; first < used; first += BAT_CHUNK / 4) {
    const n = Math.min(used - first, BAT_CHUNK / 4);
    const bat = buffer.subarray(0, n * 4);
    file.readInto(header.tableOffset + first * 4, bat, "VHD BAT");
    const view = new DataView(bat.buffer, bat.byteOffset, bat.byteLength);
    for (let j = 0; j < n; j++) {
      const sector = view.getUint32(j * 4);
      if (sector === BAT_UNUSED) continue;
      const i = first + j;
      if (sector * SECTOR_SIZE + bitmap > file.size) {
        throw new CorruptImageError(
          `VHD BAT entry ${i} points to sector ${sector}, past the end of the ${file.size}-byte file`,
          header.tableOffset + i * 4,
        );
      }
      const start = sector * SECTOR_SIZE;
      const end = start + bitmap + header.blockSize;
      const inside = metadata.find(([a, b]) => start < b && end > a);
      if (inside !== undefined) {
        throw new CorruptImageError(
          `VHD BAT entry ${i} places block ${i} at sector ${sector}, inside ${inside[2]}`,
          header.tableOffset + i * 4,
        );
      }
      data.add(i);
      entries[i] = sector;
    }
  }
  return { data, bat: entries };
}

/**
 * A fixed disk has no BAT: every 2 MiB block counts as data, except where the file is
 * known to be sparse (SEEK_DATA, when Deno may use FFI).
 */
function readFixed(file: ImageFile, footer: VhdFooter): VhdMap {
  const size = footer.currentSize;
  if (size + FOOTER_SIZE > file.size) {
    throw new CorruptImageError(
      `fixed VHD of ${size} bytes needs a ${
        size + FOOTER_SIZE
      }-byte file, this one has ${file.size} (truncated?)`,
      file.size,
    );
  }
  const data = rawDataClusters(file.path, size, DEFAULT_BLOCK_SIZE);
  return { footer, header: null, blockSize: DEFAULT_BLOCK_SIZE, data };
}

/** Locator platforms that hold a path, in the order they are tried. */
const PATH_PLATFORMS = [PLATFORM_MACX, PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K];

/**
 * Candidate paths of a differencing disk's parent: every path-bearing locator (MacX
 * first, as vhd-tool; then the Windows ones), then the parent unicode name, each
 * resolved against the child's folder, then against each of `searchDirs`. A Windows absolute path (`C:\…`) is tried by
 * its last component in the child's folder.
 */
export async function parentCandidates(
  file: ImageFile,
  header: VhdDynamicHeader,
  searchDirs: string[] = [],
) {
  const names: string[] = [];
  const locators = [...header.parentLocators].sort((a, b) =>
    PATH_PLATFORMS.indexOf(a.platformCode) - PATH_PLATFORMS.indexOf(b.platformCode)
  );
  for (const loc of locators) {
    if (!PATH_PLATFORMS.includes(loc.platformCode) || loc.dataLength === 0) continue;
    const bytes = await file.readAt(
      loc.dataOffset,
      loc.dataLength,
      `VHD parent locator ${loc.index}`,
    );
    const name = decodeParentLocator(loc.platformCode, bytes);
    if (name) names.push(name);
  }
  if (header.parentUnicodeName) names.push(header.parentUnicodeName);
  // The child's folder first, then the search path: vhd-tool's order (`dirname child ::
  // path`), so that a same-named file in a --path folder (the default, '.') never
  // stands in for the parent next to the child.
  const dirs = [dirname(file.path), ...searchDirs];
  const paths: string[] = [];
  for (const name of names) {
    let p = name.startsWith("/") ? name : name.replaceAll("\\", "/");
    if (/^[A-Za-z]:\//.test(p) || p.startsWith("//")) p = basename(p);
    for (const full of isAbsolute(p) ? [p] : dirs.map((d) => join(d, p))) {
      if (!paths.includes(full)) paths.push(full);
    }
  }
  return { names, paths };
}

async function findParent(
  file: ImageFile,
  header: VhdDynamicHeader,
  searchDirs: string[],
): Promise<VhdParentRef> {
  const { names, paths } = await parentCandidates(file, header, searchDirs);
  const ref: VhdParentRef = { name: names[0] ?? "", tried: paths };
  for (const p of paths) {
    if (await isImagePath(p)) {
      ref.path = p;
      break;
    }
  }
  return ref;
}
