/**
 * Random-access qcow2 reader for `headers`/`info`: reads the header, the active L1
 * table in one go and then only the allocated L2 tables (adjacent tables in one read),
 * never the data, and classifies every guest cluster (formats.md): COMPRESSED, ZERO
 * (plain or with stale host data), NORMAL, or UNALLOCATED (reads from the backing
 * file). A cluster "reads data from this image" exactly when `qemu-img map` says
 * `"data": true` for it at depth 0: normal and compressed clusters.
 *
 * @module
 */
import { dirname, isAbsolute, join } from "node:path";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { CorruptImageError, UnsupportedError } from "../errors.ts";
import type { ImageFile } from "../io/image_file.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, OFFSET_MASK } from "./constants.ts";
import { HEADER_PROBE_BYTES, parseQcow2Header, type Qcow2Header } from "./header.ts";

/** How many guest clusters (within the virtual size) are of each kind in one image. */
export interface Qcow2ClusterCounts {
  /** Data in this image, uncompressed. */
  normal: number;
  /** Data in this image, compressed. */
  compressed: number;
  /** Reads as zeros (ZERO flag, or every subcluster zero with extended L2). */
  zero: number;
  /** Not in this image: reads from the backing file, or zeros without one. */
  unallocated: number;
}

/** What the tables of one qcow2 file say. */
export interface Qcow2Map {
  header: Qcow2Header;
  /** Guest clusters that read data from this file (normal or compressed). */
  data: ClusterSet;
  /** Guest clusters that read as zeros whatever the backing file holds; null if none. */
  zero: ClusterSet | null;
  counts: Qcow2ClusterCounts;
  /** Number of L2 tables read. */
  l2Tables: number;
}

/** Reads and validates the header of the qcow2 image in `file` (cluster 0 whole). */
export async function readQcow2Header(file: ImageFile): Promise<Qcow2Header> {
  const probe = await file.readAt(0, Math.min(file.size, HEADER_PROBE_BYTES), "qcow2 header");
  const header = parseQcow2Header(probe, file.size);
  const cluster0 = Math.min(header.clusterSize, file.size);
  if (cluster0 <= probe.length) return header;
  return parseQcow2Header(await file.readAt(0, cluster0, "qcow2 header cluster"), file.size);
}

/**
 * Reads the active L1 table and the allocated L2 tables of the qcow2 image in `file`
 * and classifies every guest cluster. Throws {@link CorruptImageError} (with the byte
 * offset of the offending table entry) for an L2 table that is misaligned or lies past
 * the end of the file.
 */
export async function readQcow2Map(file: ImageFile): Promise<Qcow2Map> {
  const header = await readQcow2Header(file);
  const cs = header.clusterSize;
  const extL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  const entryBytes = extL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const nbClusters = Math.ceil(header.size / cs);
  const l1Needed = Math.ceil(nbClusters / l2Entries);
  if (header.l1Size < l1Needed) {
    throw new CorruptImageError(
      `qcow2 l1_size ${header.l1Size} cannot map the virtual size ${header.size} with ${entryBytes}-byte L2 entries (needs ${l1Needed})`,
      36,
    );
  }
  const data = new ClusterSet(nbClusters, cs);
  const counts: Qcow2ClusterCounts = { normal: 0, compressed: 0, zero: 0, unallocated: 0 };
  const map: Qcow2Map = { header, data, zero: null, counts, l2Tables: 0 };

  const tables = l1Needed === 0 ? [] : await readL1(file, header, l1Needed);
  const scan: TableScan = { map, extL2, hasDataFile, entryBytes, nbClusters };
  const groups = groupAdjacent(tables, cs);
  const buffer = new Uint8Array(groups.reduce((m, g) => Math.max(m, g.length), 0) * cs);
  for (const group of groups) {
    const bytes = buffer.subarray(0, group.length * cs);
    file.readInto(group[0].offset, bytes, "qcow2 L2 tables");
    for (let t = 0; t < group.length; t++) {
      map.l2Tables++;
      scanTable(scan, bytes, t * cs, group[t].l1Index * l2Entries, l2Entries);
    }
  }
  counts.unallocated = nbClusters - counts.normal - counts.compressed - counts.zero;
  return map;
}

interface TableScan {
  map: Qcow2Map;
  extL2: boolean;
  hasDataFile: boolean;
  entryBytes: number;
  nbClusters: number;
}

/**
 * Classifies the `l2Entries` entries of the L2 table at `base` in `bytes`, which map
 * the guest clusters from `firstCluster` on. Empty entries (most of a sparse table)
 * are skipped a 64-bit word at a time: an all-zero entry reads as the double 0 (and an
 * entry with only COPIED set, also unallocated without a data file, as -0).
 */
function scanTable(
  s: TableScan,
  bytes: Uint8Array,
  base: number,
  firstCluster: number,
  l2Entries: number,
): void {
  const { map, extL2, hasDataFile, entryBytes } = s;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const doubles = new Float64Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 3);
  const step = entryBytes >>> 3;
  const n = Math.min(l2Entries, s.nbClusters - firstCluster);
  const first = base >>> 3;
  const end = first + n * step;
  const next = hasDataFile
    ? (e: number) => e
    : step === 1
    ? (e: number) => nextNonZero(doubles, e, end)
    : (e: number) => nextNonZeroPair(doubles, e, end);
  const counts = map.counts;
  for (let e = next(first); e < end; e = next(e + step)) {
    const p = e << 3;
    const c = firstCluster + (e - first) / step;
    const hi = view.getUint32(p);
    const lo = view.getUint32(p + 4);
    if ((hi & 0x40000000) !== 0) {
      map.data.add(c);
      counts.compressed++;
      continue;
    }
    const hasOffset = (hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0 ||
      (hasDataFile && (hi & 0x80000000) !== 0);
    let zero: boolean;
    if (extL2) {
      // Second word: bits 32–63 read-as-zero subclusters, bits 0–31 allocated ones.
      if (hasOffset && view.getUint32(p + 12) !== 0) {
        map.data.add(c);
        counts.normal++;
        continue;
      }
      zero = view.getUint32(p + 8) === 0xffffffff;
    } else {
      zero = (lo & 1) !== 0;
      if (!zero && hasOffset) {
        map.data.add(c);
        counts.normal++;
        continue;
      }
    }
    if (zero) {
      map.zero ??= new ClusterSet(s.nbClusters, map.data.clusterSize);
      map.zero.add(c);
      counts.zero++;
    }
  }
}

/** The first index from `e` (below `end`) whose 8-byte entry is not zero, else `end`. */
function nextNonZero(d: Float64Array, e: number, end: number): number {
  while (e < end && d[e] === 0) e++;
  return e;
}

/** {@link nextNonZero} for 16-byte entries (extended L2), stepping by two. */
function nextNonZeroPair(d: Float64Array, e: number, end: number): number {
  while (e < end && d[e] === 0 && d[e + 1] === 0) e += 2;
  return e;
}

interface L2Ref {
  l1Index: number;
  offset: number;
}

/** The L2 tables the first `entries` L1 entries point to, checked against the file. */
async function readL1(file: ImageFile, header: Qcow2Header, entries: number): Promise<L2Ref[]> {
  const cs = header.clusterSize;
  const bytes = await file.readAt(header.l1TableOffset, entries * 8, "qcow2 L1 table");
  const view = new DataView(bytes.buffer);
  const doubles = new Float64Array(bytes.buffer);
  const refs: L2Ref[] = [];
  /** L2 table offsets seen, with the L1 entry naming them: each table serves one entry. */
  const seen = new Map<number, number>();
  for (
    let i = nextNonZero(doubles, 0, entries);
    i < entries;
    i = nextNonZero(doubles, i + 1, entries)
  ) {
    const offset = Number(view.getBigUint64(i * 8) & OFFSET_MASK);
    if (offset === 0) continue;
    const at = header.l1TableOffset + i * 8;
    if (offset % cs !== 0) {
      throw new CorruptImageError(
        `qcow2 L1 entry ${i} points to an L2 table at ${offset}, not cluster aligned`,
        at,
      );
    }
    if (offset + cs > file.size) {
      throw new CorruptImageError(
        `qcow2 L1 entry ${i} points to an L2 table at ${offset}, past the end of the ${file.size}-byte file`,
        at,
      );
    }
    const shared = seen.get(offset);
    if (shared !== undefined) {
      throw new CorruptImageError(
        `qcow2 L1 entries ${shared} and ${i} both point to the L2 table at ${offset}: ` +
          "a table shared between entries is corruption (qemu-img check reports it; " +
          "repair with qemu-img check -r all)",
        at,
      );
    }
    const inside = metadataAt(header, offset);
    if (inside !== undefined) {
      throw new CorruptImageError(
        `qcow2 L1 entry ${i} points to an L2 table at ${offset}, inside ${inside}`,
        at,
      );
    }
    seen.set(offset, i);
    refs.push({ l1Index: i, offset });
  }
  return refs;
}

/** Which metadata the cluster at `offset` belongs to (header, L1 or refcount table), if any. */
function metadataAt(h: Qcow2Header, offset: number): string | undefined {
  const cs = h.clusterSize;
  const within = (start: number, bytes: number) =>
    bytes > 0 && offset < start + bytes && offset + cs > start;
  if (offset < cs) return "the header cluster";
  if (within(h.l1TableOffset, h.l1Size * 8)) return "the L1 table";
  if (within(h.refcountTableOffset, h.refcountTableClusters * cs)) return "the refcount table";
  return undefined;
}

/** Tables sorted by file offset, in runs of adjacent clusters of at most 4 MiB each. */
function groupAdjacent(refs: L2Ref[], cs: number): L2Ref[][] {
  const sorted = [...refs].sort((a, b) => a.offset - b.offset);
  const maxTables = Math.max(1, Math.floor(CHUNK_SIZE / cs));
  const groups: L2Ref[][] = [];
  for (const r of sorted) {
    const g = groups.at(-1);
    const last = g?.at(-1);
    if (g && last && last.offset + cs === r.offset && g.length < maxTables) g.push(r);
    else groups.push([r]);
  }
  return groups;
}

/**
 * Where the backing file of the image at `imagePath` is: its name resolved against the
 * image's folder (absolute names as they are), or undefined without a backing file.
 * Protocol or `json:` names are refused.
 */
export function qcow2BackingPath(imagePath: string, header: Qcow2Header): string | undefined {
  const name = header.backingFile;
  if (name === undefined || name === "") return undefined;
  if (name.startsWith("json:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(name)) {
    throw new UnsupportedError(
      `backing file ${JSON.stringify(name)} is not a plain file name; only local files are read`,
    );
  }
  return isAbsolute(name) ? name : join(dirname(imagePath), name);
}
