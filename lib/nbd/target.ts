/**
 * An NBD export as an import's {@link DiskTarget}: queued writes go out as
 * `NBD_CMD_WRITE` requests spread over the connections (several only with
 * multi-conn), ranges the image marks as zero as `NBD_CMD_WRITE_ZEROES`, and the
 * ranges the image does not cover are zeroed at the end unless the export is
 * `prezeroed` (or a `delta` leaves them as they are) — the same rules as an existing
 * device. `finish` sends `NBD_CMD_FLUSH` before it reports success.
 *
 * @module
 */
import { ClusterSet } from "../alloc/cluster_set.ts";
import { DiskstreamError } from "../errors.ts";
import { destinationTooSmall, type DiskTarget } from "../io/endpoint.ts";
import { NbdExport, type NbdOptions } from "./client.ts";

/** How the import treats what the image does not cover. */
export interface NbdTargetOptions extends NbdOptions {
  /** The export reads as zeros already: nothing is zeroed but what the image says. */
  prezeroed?: boolean;
  /** Apply a diff: leave what the image does not cover untouched. */
  delta?: boolean;
}

/** Queued writes of adjacent bytes are merged up to this size. */
const MERGE_LIMIT = 8 * 1024 * 1024;
/**
 * Write requests in flight per connection (as nbdcopy's 64): with requests of
 * `WRITE_PIECE` (256 KiB), 16 MiB unacknowledged per connection. Their bytes are in
 * the sockets by then, not held here.
 */
const WRITE_DEPTH = 64;

interface Queued {
  offset: number;
  /** The bytes, or null for zeros. */
  bytes: Uint8Array | null;
  length: number;
}

/** An NBD export being filled by an import (see the module comment). */
export class NbdTarget implements DiskTarget {
  /** What the destination is (for the import's result). */
  readonly kind = "nbd export";
  /** Bytes never moved by the kernel here (no splicing into a socket). */
  readonly directBytes = 0;
  #export: NbdExport;
  #virtualSize: number | null;
  #queue: Queued[] = [];
  #queued = 0;
  #dataBytes = 0;
  /** Units written or zeroed, when the others get zeros at the end. */
  #covered: ClusterSet | null;
  #writeZeros: boolean;
  /** Writes sent whose replies have not come. */
  #inFlight = new Set<Promise<unknown>>();
  /** The first write the server failed. */
  #failure: unknown = null;
  /** Lowest offset a write was sent to (Infinity: none). */
  #lowest = Infinity;

  private constructor(
    nbd: NbdExport,
    virtualSize: number | null,
    unit: number,
    options: NbdTargetOptions,
  ) {
    this.#export = nbd;
    this.#virtualSize = virtualSize;
    const fill = !options.delta && !options.prezeroed;
    this.#writeZeros = fill || options.delta === true;
    this.#covered = fill && virtualSize !== null
      ? new ClusterSet(Math.ceil(virtualSize / unit), unit)
      : null;
  }

  /**
   * Connects to the export at `uri` for an image of `virtualSize` bytes (null: known
   * only at {@link NbdTarget.finish}); refuses a read-only export or one smaller than
   * the image before writing anything.
   */
  static async open(
    uri: string,
    virtualSize: number | null,
    unit: number,
    options: NbdTargetOptions = {},
  ): Promise<NbdTarget> {
    // Writes are not latency-bound the way reads are: more of them in flight per
    // connection (servers rarely offer multi-conn for writable exports).
    const nbd = await NbdExport.open(uri, { depth: WRITE_DEPTH, ...options, write: true });
    if (virtualSize !== null && virtualSize > nbd.size) {
      await nbd.close();
      throw destinationTooSmall(uri, nbd.size, virtualSize);
    }
    return new NbdTarget(nbd, virtualSize, unit, options);
  }

  get name(): string {
    return this.#export.uri;
  }

  get queued(): number {
    return this.#queued;
  }

  /** Bytes of image data written. */
  get dataBytes(): number {
    return this.#dataBytes;
  }

  /** The pool (for its connection count). */
  get export(): NbdExport {
    return this.#export;
  }

  #check(offset: number, length: number): void {
    const end = this.#virtualSize ?? this.#export.size;
    if (offset < 0 || offset + length > end) {
      throw new DiskstreamError(
        this.#virtualSize === null
          ? `${this.name} holds ${this.#export.size} bytes, but the image goes on past byte ${
            offset + length
          } (the bytes before were already written)`
          : `write of ${length} bytes at ${offset} is outside the virtual size ${this.#virtualSize}`,
      );
    }
  }

  write(offset: number, bytes: Uint8Array, from: number, to: number): void {
    const length = to - from;
    if (length <= 0) return;
    this.#check(offset, length);
    this.#dataBytes += length;
    this.#covered?.addBytes(offset, length);
    this.#queued += length;
    // Adjacent clusters of one input chunk become one request (up to MERGE_LIMIT).
    const last = this.#queue[this.#queue.length - 1];
    const b = last?.bytes;
    if (
      b != null && b.buffer === bytes.buffer && last.offset + last.length === offset &&
      b.byteOffset + b.length === bytes.byteOffset + from && last.length + length <= MERGE_LIMIT
    ) {
      last.length += length;
      last.bytes = new Uint8Array(b.buffer, b.byteOffset, last.length);
      return;
    }
    this.#queue.push({ offset, bytes: bytes.subarray(from, to), length });
  }

  zero(offset: number, length: number): void {
    if (!this.#writeZeros || length <= 0) return;
    this.#check(offset, length);
    this.#covered?.addBytes(offset, length);
    this.#queueZeros(offset, length);
  }

  #queueZeros(offset: number, length: number): void {
    const last = this.#queue[this.#queue.length - 1];
    if (last !== undefined && last.bytes === null && last.offset + last.length === offset) {
      last.length += length;
    } else this.#queue.push({ offset, bytes: null, length });
  }

  /**
   * Sends the queued writes; resolves once they are in the socket (their buffers may
   * then be reused). Their replies are checked as they come: the first failure is
   * thrown by a later flush or by {@link NbdTarget.finish}.
   */
  async flush(): Promise<void> {
    this.#throwFailure();
    const queue = this.#queue;
    this.#queue = [];
    this.#queued = 0;
    for (const q of queue) this.#lowest = Math.min(this.#lowest, q.offset);
    const sends = queue.map(async (q) => {
      const { done } = q.bytes === null
        ? { done: this.#export.writeZeroes(q.offset, q.length) }
        : await this.#export.send(q.offset, q.bytes);
      this.#track(done);
    });
    const results = await Promise.allSettled(sends);
    const failed = results.find((r) => r.status === "rejected");
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  }

  /** Follows a write's replies: remembers the first failure. */
  #track(done: Promise<unknown>): void {
    this.#inFlight.add(done);
    done.then(
      () => this.#inFlight.delete(done),
      (err) => {
        this.#inFlight.delete(done);
        this.#failure ??= err;
      },
    );
  }

  #throwFailure(): void {
    if (this.#failure !== null) throw this.#failure;
  }

  /** Waits for every reply; throws the first failure. */
  async #settle(): Promise<void> {
    await Promise.allSettled([...this.#inFlight]);
    this.#throwFailure();
  }

  /**
   * Zeroes what the image did not cover (unless prezeroed or delta), writes what is
   * queued, flushes the export (`NBD_CMD_FLUSH`) and disconnects.
   */
  async finish(virtualSize?: number): Promise<void> {
    try {
      if (this.#virtualSize === null && virtualSize !== undefined) {
        if (virtualSize > this.#export.size) {
          throw destinationTooSmall(this.name, this.#export.size, virtualSize);
        }
      }
      const covered = this.#covered;
      if (covered !== null) {
        // The units the image left out read as zeros: one write of zeroes per gap.
        const end = this.#virtualSize!;
        const cs = covered.clusterSize;
        let gap = 0;
        const fill = (upTo: number) => {
          const to = Math.min(end, upTo * cs);
          if (gap * cs < to) this.#queueZeros(gap * cs, to - gap * cs);
        };
        for (const [first, last] of covered.runs()) {
          fill(first);
          gap = last + 1;
        }
        fill(covered.length);
      }
      await this.flush();
      await this.#settle();
      await this.#export.flush();
    } catch (err) {
      await this.#export.close();
      throw err;
    }
    await this.#export.close();
  }

  /** Whether any byte of the destination was changed (or a file extended). */
  get written(): boolean {
    return this.#lowest !== Infinity;
  }

  /** What a failed import left in the export, for messages. */
  get damage(): string {
    return this.#lowest === Infinity
      ? `${this.name} was not written`
      : `${this.name} is partly written from byte ${this.#lowest} on`;
  }

  async abort(): Promise<void> {
    await this.#export.close();
  }
}
