/**
 * An NBD export as an export's {@link DiskSource}: reads cut into requests spread
 * over the pool's connections (the writers issue a chunk's reads side by side, so
 * even scattered small clusters keep every connection busy), and block status as the
 * data extents — trusted (`remote`), so the planned clusters are read once.
 *
 * @module
 */
import { SourceChangedError } from "../errors.ts";
import type { DiskSource } from "../io/endpoint.ts";
import { NbdExport, type NbdOptions } from "./client.ts";

/** An NBD export opened for reading (see the module comment). */
export class NbdSource implements DiskSource {
  readonly isFile = false;
  readonly remote = true;
  #export: NbdExport;

  constructor(nbd: NbdExport) {
    this.#export = nbd;
  }

  /** Opens the export at `uri` (see `NbdExport.open`). */
  static async open(uri: string, options: NbdOptions = {}): Promise<NbdSource> {
    return new NbdSource(await NbdExport.open(uri, options));
  }

  get path(): string {
    return this.#export.uri;
  }

  get size(): number {
    return this.#export.size;
  }

  /** The pool (for its connection count and export facts). */
  get export(): NbdExport {
    return this.#export;
  }

  extents(limit: number): Promise<Iterable<readonly [number, number]> | null> {
    return this.#export.extents(Math.min(limit, this.size));
  }

  async readAt(buf: Uint8Array, position: number, limit = this.size): Promise<void> {
    const want = Math.max(0, Math.min(buf.length, limit - position));
    if (want < buf.length) buf.fill(0, want);
    if (position + want > this.size) {
      throw new SourceChangedError(
        `${this.path} has ${this.size} bytes, fewer than the ${limit} expected: the export shrank`,
      );
    }
    if (want > 0) await this.#export.read(buf.subarray(0, want), position);
  }

  currentSize(): Promise<number> {
    // An NBD export's size is fixed for the session.
    return Promise.resolve(this.size);
  }

  close(): void {
    this.#export.close().catch(() => {});
  }
}
