/**
 * A disk inside an XVA file, read in place: the index of its data members (disk
 * offset, length, file offset) makes it a {@link DiskSource}, so an export can plan
 * and stream it as qcow2 or VHD with no temporary file. Its extents are the members,
 * so the gaps are never read.
 *
 * @module
 */
import type { DiskSource } from "../io/endpoint.ts";
import { ImageFile } from "../io/image_file.ts";

/** One data member of a disk: `length` bytes for disk offset `at`, at `fileOffset`. */
export interface XvaMemberRange {
  at: number;
  length: number;
  fileOffset: number;
}

/** A disk of an XVA file as a {@link DiskSource}. */
export class XvaDiskSource implements DiskSource {
  readonly isFile = false;
  readonly kernelCopy = false;
  #file: ImageFile | null;

  private constructor(
    readonly path: string,
    readonly size: number,
    readonly members: readonly XvaMemberRange[],
    file: ImageFile,
  ) {
    this.#file = file;
  }

  /**
   * Opens the XVA file at `path` for the disk of `size` bytes whose data members are
   * `members` (ascending, from {@link XvaDiskOptions.onMember}; empty ones ignored).
   *
   * @example
   * ```ts
   * import { XvaDiskSource } from "./disk_source.ts";
   * import assert from "node:assert/strict";
   *
   * const dir = await Deno.makeTempDir();
   * await Deno.writeFile(`${dir}/f`, new Uint8Array([0, 0, 7, 8, 9]));
   * // Disk bytes 4..6 are file bytes 2..4; the rest of the 8-byte disk reads as zeros.
   * const src = await XvaDiskSource.open(`${dir}/f`, 8, [{ at: 4, length: 3, fileOffset: 2 }]);
   * const buf = new Uint8Array(8).fill(1);
   * await src.readAt(buf, 0);
   * assert.deepEqual([...buf], [0, 0, 0, 0, 7, 8, 9, 0]);
   * assert.deepEqual([...(await src.extents(8))!], [[4, 7]]);
   * src.close();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static async open(
    path: string,
    size: number,
    members: readonly XvaMemberRange[],
  ): Promise<XvaDiskSource> {
    const file = await ImageFile.open(path);
    return new XvaDiskSource(path, size, members.filter((m) => m.length > 0), file);
  }

  /** Index of the first member that ends after `pos`. */
  #first(pos: number): number {
    const m = this.members;
    let lo = 0;
    let hi = m.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (m[mid].at + m[mid].length <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  readAt(buf: Uint8Array, position: number, limit = this.size): Promise<void> {
    return Promise.resolve().then(() => this.readAtSync(buf, position, limit));
  }

  readAtSync(buf: Uint8Array, position: number, limit = this.size): void {
    const file = this.#file;
    if (file === null) throw new Error(`${this.path}: read after close`);
    buf.fill(0);
    const end = Math.min(position + buf.length, limit);
    for (let i = this.#first(position); i < this.members.length; i++) {
      const m = this.members[i];
      if (m.at >= end) break;
      const from = Math.max(position, m.at);
      const to = Math.min(end, m.at + m.length);
      file.readInto(
        m.fileOffset + (from - m.at),
        buf.subarray(from - position, to - position),
        `the member for disk bytes ${m.at}-${m.at + m.length}`,
      );
    }
  }

  extents(limit: number): Promise<Iterable<readonly [number, number]>> {
    const out: [number, number][] = [];
    for (const m of this.members) {
      if (m.at >= limit) break;
      const end = Math.min(limit, m.at + m.length);
      const last = out.at(-1);
      if (last && last[1] === m.at) last[1] = end;
      else out.push([m.at, end]);
    }
    return Promise.resolve(out);
  }

  currentSize(): Promise<number> {
    return Promise.resolve(this.size);
  }

  close(): void {
    this.#file?.close();
    this.#file = null;
  }
}
