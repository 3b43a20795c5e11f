/**
 * A VHD file and its parent chain read as a disk (vhd-tool's `--source-format vhd`):
 * a {@link DiskSource} whose bytes are what a reader of the top VHD sees — for each
 * sector, the first layer from the top whose block is allocated with the sector's
 * bitmap bit set; zeros when none (or a dynamic layer ends the chain). Its extents
 * are the blocks the chain allocates, so the rest is never read.
 *
 * @module
 */
import { setRuns } from "../alloc/runs.ts";
import { UnsupportedError } from "../errors.ts";
import type { DiskSource } from "../io/endpoint.ts";
import { ImageFile } from "../io/image_file.ts";
import { BAT_UNUSED, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, SECTOR_SIZE } from "../vhd/constants.ts";
import { blockBitmapSize } from "../vhd/dynamic_header.ts";
import type { VhdMap } from "../vhd/image.ts";
import { combineChain, readImageChain } from "./image_allocation.ts";

interface Layer {
  file: ImageFile;
  vhd: VhdMap;
  bitmapBytes: number;
}

/** A VHD chain as a disk; see the module comment. */
export class VhdChainSource implements DiskSource {
  readonly isFile = false;
  readonly kernelCopy = false;
  /** The parents its bytes are also read from. */
  files: readonly string[] = [];
  readonly #layers: Layer[];
  readonly #extents: [number, number][];
  #closed = false;

  private constructor(
    readonly path: string,
    readonly size: number,
    layers: Layer[],
    extents: [number, number][],
  ) {
    this.#layers = layers;
    this.#extents = extents;
  }

  /**
   * Opens the VHD at `path` and its parents (looked up next to each child first, then
   * in `searchDirs`). Refuses a chain with a layer that is not a VHD.
   */
  static async open(path: string, searchDirs: string[] = []): Promise<VhdChainSource> {
    const chain = await readImageChain(path, false, searchDirs);
    const bad = chain.find((l) => l.vhd === undefined);
    if (bad) {
      throw new UnsupportedError(
        `${bad.path} is ${bad.format}, not a VHD: --source-format vhd reads VHD chains only`,
      );
    }
    const layers: Layer[] = [];
    try {
      for (const l of chain) {
        layers.push({
          file: await ImageFile.open(l.path),
          vhd: l.vhd!,
          bitmapBytes: blockBitmapSize(l.vhd!.blockSize),
        });
      }
    } catch (err) {
      for (const l of layers) l.file.close();
      throw err;
    }
    const all = combineChain(chain).clusters;
    const size = chain[0].virtualSize;
    const bs = all.clusterSize;
    const extents: [number, number][] = [];
    for (const [first, last] of setRuns(all)) {
      extents.push([first * bs, Math.min(size, (last + 1) * bs)]);
    }
    const source = new VhdChainSource(path, size, layers, extents);
    source.files = chain.slice(1).map((l) => l.path);
    return source;
  }

  readAt(buf: Uint8Array, position: number, limit = this.size): Promise<void> {
    return Promise.resolve().then(() => this.readAtSync(buf, position, limit));
  }

  readAtSync(buf: Uint8Array, position: number, limit = this.size): void {
    buf.fill(0);
    const end = Math.min(position + buf.length, limit, this.size);
    for (let at = position; at < end;) {
      const bs = this.#layers[0].vhd.blockSize;
      const blockEnd = Math.min(end, (Math.floor(at / bs) + 1) * bs);
      this.#readBlockPart(buf, position, at, blockEnd);
      at = blockEnd;
    }
  }

  /**
   * Fills `buf` for disk bytes `[from, to)` of one block of the top layer, layer by
   * layer. A parent's blocks need not be the top's size; what lies beyond a layer's own
   * virtual size (a parent smaller than its child) reads as zeros.
   */
  #readBlockPart(buf: Uint8Array, position: number, from: number, to: number): void {
    const firstSector = Math.floor(from / SECTOR_SIZE);
    const lastSector = Math.ceil(to / SECTOR_SIZE); // exclusive
    const need = new Uint8Array(lastSector - firstSector).fill(1);
    let left = need.length;
    for (const layer of this.#layers) {
      if (left === 0) return;
      const { vhd, file } = layer;
      const layerSize = vhd.footer.currentSize;
      const copy = (fileOffset: number, s0: number, s1: number) => {
        // Disk sectors [s0, s1) of this layer, at `fileOffset` for sector s0.
        const a = Math.max(from, s0 * SECTOR_SIZE);
        const b = Math.min(to, s1 * SECTOR_SIZE, layerSize);
        if (b > a) {
          file.readInto(
            fileOffset + (a - s0 * SECTOR_SIZE),
            buf.subarray(a - position, b - position),
            `VHD data of ${file.path}`,
          );
        }
        for (let s = s0; s < s1; s++) need[s - firstSector] = 0;
        left -= s1 - s0;
      };
      if (vhd.footer.diskType === DISK_TYPE_FIXED) {
        for (const [s0, s1] of runsOf(need, firstSector, firstSector, lastSector)) {
          copy(s0 * SECTOR_SIZE, s0, s1);
        }
        return;
      }
      const perBlock = vhd.blockSize / SECTOR_SIZE;
      const layerEnd = Math.min(to, layerSize);
      for (
        let block = Math.floor(from / vhd.blockSize);
        block * vhd.blockSize < layerEnd;
        block++
      ) {
        const entry = vhd.bat![block] ?? BAT_UNUSED;
        if (entry === BAT_UNUSED) continue;
        const bitmap = file.readAtSync(entry * SECTOR_SIZE, layer.bitmapBytes, "VHD bitmap");
        const dataAt = entry * SECTOR_SIZE + layer.bitmapBytes;
        const blockSector = block * perBlock;
        const set = (s: number) => {
          const i = s - blockSector;
          return (bitmap[i >> 3] & (0x80 >> (i & 7))) !== 0;
        };
        const lo = Math.max(firstSector, blockSector);
        const hi = Math.min(lastSector, blockSector + perBlock);
        for (const [s0, s1] of runsOf(need, firstSector, lo, hi, set)) {
          copy(dataAt + (s0 - blockSector) * SECTOR_SIZE, s0, s1);
        }
      }
      if (vhd.footer.diskType === DISK_TYPE_DYNAMIC) return; // no parent: the rest is zeros
      // Sectors past this layer's end read as zeros, whatever its parents hold.
      for (
        let s = Math.max(firstSector, Math.floor(layerSize / SECTOR_SIZE));
        s < lastSector;
        s++
      ) {
        if (need[s - firstSector] === 1 && s * SECTOR_SIZE >= layerSize) {
          need[s - firstSector] = 0;
          left--;
        }
      }
    }
  }

  extents(limit: number): Promise<Iterable<readonly [number, number]>> {
    return Promise.resolve(
      this.#extents.filter(([a]) => a < limit).map(([a, b]) => [a, Math.min(b, limit)] as const),
    );
  }

  currentSize(): Promise<number> {
    return Promise.resolve(this.size);
  }

  /** Closes every layer's file; a second call (an export that failed) does nothing. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const l of this.#layers) l.file.close();
  }
}

/**
 * Runs `[s0, s1)` of needed sectors among sectors `[lo, hi)` (`need` numbers them from
 * `first`) for which `ok` holds.
 */
function* runsOf(
  need: Uint8Array,
  first: number,
  lo: number,
  hi: number,
  ok: (sector: number) => boolean = () => true,
): Generator<[number, number]> {
  let start = -1;
  for (let s = lo; s <= hi; s++) {
    const take = s < hi && need[s - first] === 1 && ok(s);
    if (take && start < 0) start = s;
    if (!take && start >= 0) {
      yield [start, s];
      start = -1;
    }
  }
}
