/**
 * An NBD export as a disk: a pool of connections (several only when the server
 * advertises multi-conn consistency) with a few requests in flight on each, and the
 * operations export and import need — read, write, write zeroes, flush, and the
 * data extents from `base:allocation` block status. Requests respect the server's
 * block sizes: offsets and lengths aligned to its minimum, payloads within its
 * maximum.
 *
 * @module
 */
import { NbdError, UsageError } from "../errors.ts";
import {
  CMD_BLOCK_STATUS,
  CMD_FLUSH,
  CMD_READ,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  STATE_ZERO,
} from "./constants.ts";
import {
  type NbdConnection,
  type NbdRequest,
  openConnection,
  type StatusExtents,
} from "./connection.ts";
import type { ExportInfo } from "./handshake.ts";
import type { TlsOptions } from "./socket.ts";
import { type NbdAddress, parseNbdUri } from "./uri.ts";

/**
 * Default number of connections ({@link NbdOptions.connections}).
 *
 * @example
 * ```ts
 * import { DEFAULT_CONNECTIONS } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(DEFAULT_CONNECTIONS, 4);
 * ```
 */
export const DEFAULT_CONNECTIONS = 4;
/** Default requests in flight per connection. */
export const DEFAULT_DEPTH = 4;
/** Size of the read requests a large read is cut into (as nbdcopy's default). */
export const READ_PIECE = 256 * 1024;
/**
 * Size of the write requests (nbdcopy's default, or the server's preferred block size
 * when larger). Not larger: qemu-nbd spends about 6 times the CPU on 1 MiB writes as
 * on 256 KiB ones (a fresh buffer per request), which made imports 4 times slower.
 */
const WRITE_PIECE = 256 * 1024;
/** Largest write-zeroes request. */
const ZERO_PIECE = 1024 * 1024 * 1024;
/** Bytes of the export asked about per block status request. */
const STATUS_SPAN = 1024 * 1024 * 1024;
/** Data extents are widened to multiples of this (a superset of the data is safe). */
const EXTENT_GRAIN = 4096;
/** Time a server has to greet the extra connections of a pool. */
const EXTRA_HANDSHAKE_MS = 5000;
/** Time a server has to complete the handshake of the first connection. */
const HANDSHAKE_MS = 60_000;

/** How to open an export. */
export interface NbdOptions {
  /**
   * Connections to open (default 4). More than one only when the server advertises
   * multi-conn; fewer when it refuses the extra ones.
   */
  connections?: number;
  /** Requests in flight per connection (default 4). */
  depth?: number;
  /** Path of a PEM file with the CA certificate(s) that signed the server's (nbds://). */
  cacert?: string;
  /** For writing: refuse a read-only export. */
  write?: boolean;
  /**
   * Stops the work: the handshake, and every request in flight or made later, fail
   * with the signal's reason, and the connections are dropped (a server that stopped
   * answering holds nothing up).
   */
  signal?: AbortSignal;
}

/**
 * An open NBD export: a pool of connections and the operations on the export's
 * bytes. Errors are {@link NbdError}s naming the URI and the request.
 *
 * @example Write to and read from an export served by nbdkit
 * ```ts
 * import { NbdExport } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const socket = `${dir}/nbd.sock`;
 * const server = new Deno.Command("nbdkit", {
 *   args: ["-f", "--exit-with-parent", "-U", socket, "memory", "8M"],
 * }).spawn();
 * while (!(await Deno.stat(socket).catch(() => null))) {
 *   await new Promise((r) => setTimeout(r, 20));
 * }
 * const nbd = await NbdExport.open(`nbd+unix:///?socket=${socket}`, { connections: 2 });
 * assert.equal(nbd.size, 8 << 20);
 * await nbd.write(1 << 20, new Uint8Array(65536).fill(7));
 * await nbd.flush();
 * const back = new Uint8Array(4);
 * await nbd.read(back, 1 << 20);
 * assert.deepEqual(back, new Uint8Array(4).fill(7));
 * assert.deepEqual(await nbd.extents(), [[1 << 20, (1 << 20) + 65536]]);
 * await nbd.close();
 * server.kill();
 * await server.status;
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class NbdExport {
  readonly info: ExportInfo;
  #conns: NbdConnection[];
  #active: number[];
  #waiters: (() => void)[] = [];
  #depth: number;
  #closed = false;
  #signal: AbortSignal | undefined;
  #onAbort = () => {
    for (const c of this.#conns) c.abort(this.#signal!.reason);
  };

  private constructor(
    readonly address: NbdAddress,
    conns: NbdConnection[],
    depth: number,
    signal?: AbortSignal,
  ) {
    this.info = conns[0].info;
    this.#conns = conns;
    this.#active = conns.map(() => 0);
    this.#depth = depth;
    this.#signal = signal;
    signal?.addEventListener("abort", this.#onAbort, { once: true });
    if (signal?.aborted) this.#onAbort();
  }

  /** The URI (for messages). */
  get uri(): string {
    return this.address.uri;
  }

  /** Size of the export in bytes. */
  get size(): number {
    return this.info.size;
  }

  /** Connections in use. */
  get connections(): number {
    return this.#conns.length;
  }

  /** True when block status can tell where the data is. */
  get hasBlockStatus(): boolean {
    return this.info.allocationContext !== null;
  }

  /**
   * Connects to the export at `uri` (see `parseNbdUri`) with `options.connections`
   * connections when the server allows several.
   */
  static async open(uri: string | NbdAddress, options: NbdOptions = {}): Promise<NbdExport> {
    const address = typeof uri === "string" ? parseNbdUri(uri) : uri;
    const want = options.connections ?? DEFAULT_CONNECTIONS;
    if (!Number.isInteger(want) || want < 1 || want > 64) {
      throw new UsageError(`--connections must be a whole number from 1 to 64 (got ${want})`);
    }
    const tls: TlsOptions = {};
    if (options.cacert !== undefined) {
      try {
        tls.caCerts = [await Deno.readTextFile(options.cacert)];
      } catch (err) {
        throw new UsageError(`cannot read the CA certificate ${options.cacert}: ${String(err)}`);
      }
    }
    const signal = options.signal;
    const first = await openConnection(address, tls, HANDSHAKE_MS, signal);
    if (options.write === true && first.info.readOnly) {
      await first.close();
      throw new NbdError(`${address.uri}: the export is read-only`);
    }
    const conns = [first];
    if (want > 1 && first.info.canMultiConn) {
      const extra = await Promise.allSettled(
        Array.from(
          { length: want - 1 },
          () => openConnection(address, tls, EXTRA_HANDSHAKE_MS, signal),
        ),
      );
      for (const r of extra) {
        // A connection that differs from the first would not be the same export.
        if (r.status === "fulfilled" && r.value.info.size === first.info.size) conns.push(r.value);
        else if (r.status === "fulfilled") await r.value.close();
      }
    }
    return new NbdExport(address, conns, options.depth ?? DEFAULT_DEPTH, signal);
  }

  async #slot(): Promise<number> {
    for (;;) {
      if (this.#closed) throw new NbdError(`${this.uri}: the export was closed`);
      let best = -1;
      for (let i = 0; i < this.#conns.length; i++) {
        if (this.#active[i] < this.#depth && (best < 0 || this.#active[i] < this.#active[best])) {
          best = i;
        }
      }
      if (best >= 0) {
        this.#active[best]++;
        return best;
      }
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  async #request(req: NbdRequest): Promise<StatusExtents> {
    const i = await this.#slot();
    try {
      return await this.#conns[i].request(req);
    } finally {
      this.#active[i]--;
      this.#waiters.shift()?.();
    }
  }

  #checkRange(offset: number, length: number, what: string): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new NbdError(
        `${this.uri}: a ${what} of ${length} bytes at byte offset ${offset} lies outside the export (${this.size} bytes)`,
      );
    }
  }

  #aligned(offset: number, length: number, what: string): void {
    const min = this.info.minBlock;
    if (offset % min !== 0 || (length % min !== 0 && offset + length !== this.size)) {
      throw new NbdError(
        `${this.uri}: the server takes ${what}s aligned to ${min} bytes; bytes ${offset}-${
          offset + length
        } are not`,
      );
    }
  }

  /**
   * Fills `buf` with the export's bytes at `offset` (within the export). Large reads
   * are cut into requests spread over the connections; unaligned ones are read
   * through an aligned bounce buffer.
   */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.#checkRange(offset, buf.length, "read");
    const min = this.info.minBlock;
    const start = offset - (offset % min);
    const end = Math.min(this.size, Math.ceil((offset + buf.length) / min) * min);
    if (start !== offset || end !== offset + buf.length) {
      const bounce = new Uint8Array(end - start);
      await this.read(bounce, start);
      buf.set(bounce.subarray(offset - start, offset - start + buf.length));
      return;
    }
    await this.#transfer(
      CMD_READ,
      offset,
      buf,
      Math.max(min, Math.min(this.info.maxPayload, READ_PIECE)),
    );
  }

  /**
   * Bytes per write request: {@link WRITE_PIECE}, or the server's preferred block
   * size when larger, within its maximum payload (both multiples of its minimum).
   */
  #writePiece(): number {
    const { maxPayload, preferredBlock } = this.info;
    return Math.min(maxPayload, Math.max(WRITE_PIECE, preferredBlock));
  }

  /** Writes `bytes` at `offset` (aligned to the server's minimum block size). */
  async write(offset: number, bytes: Uint8Array): Promise<void> {
    this.#checkRange(offset, bytes.length, "write");
    this.#aligned(offset, bytes.length, "write");
    await this.#transfer(CMD_WRITE, offset, bytes, this.#writePiece());
  }

  /**
   * {@link NbdExport.write} that resolves as soon as every piece is in the socket
   * (`bytes` may then be reused), with `done`, which settles with the server's
   * replies: many writes stay in flight while the caller prepares the next ones.
   */
  async send(offset: number, bytes: Uint8Array): Promise<{ done: Promise<unknown> }> {
    this.#checkRange(offset, bytes.length, "write");
    this.#aligned(offset, bytes.length, "write");
    const sends: Promise<void>[] = [];
    const done = inPieces(
      bytes.length,
      this.#writePiece(),
      (at, length) => {
        let sent!: (err: unknown) => void;
        sends.push(new Promise((resolve, reject) => sent = (err) => err ? reject(err) : resolve()));
        const reply = this.#request({
          command: CMD_WRITE,
          offset: offset + at,
          length,
          payload: bytes.subarray(at, at + length),
          onSent: sent,
        });
        reply.catch((err) => sent(err)); // failed before it was sent: no onSent
        return reply;
      },
    );
    done.catch(() => {}); // the caller looks at it later
    await settleAll(sends);
    return { done };
  }

  /**
   * Makes `[offset, offset + length)` read as zeros: `NBD_CMD_WRITE_ZEROES` when the
   * server offers it, else writes of zeros.
   */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.#checkRange(offset, length, "write of zeroes");
    this.#aligned(offset, length, "write of zeroe");
    const zeroes = this.info.canWriteZeroes;
    const piece = zeroes ? ZERO_PIECE : this.#writePiece();
    const zeros = zeroes ? undefined : new Uint8Array(Math.min(piece, length));
    await inPieces(length, piece, (at, len) =>
      this.#request({
        command: zeroes ? CMD_WRITE_ZEROES : CMD_WRITE,
        offset: offset + at,
        length: len,
        payload: zeros?.subarray(0, len),
      }));
  }

  /** `bytes` at `offset` in requests of `piece` bytes: a read fills it, a write sends it. */
  #transfer(command: number, offset: number, bytes: Uint8Array, piece: number): Promise<unknown> {
    return inPieces(bytes.length, piece, (at, length) => {
      const part = bytes.subarray(at, at + length);
      return this.#request(
        command === CMD_READ
          ? { command, offset: offset + at, length, into: part }
          : { command, offset: offset + at, length, payload: part },
      );
    });
  }

  /**
   * Makes every completed write durable (`NBD_CMD_FLUSH` on each connection; with
   * multi-conn one would do, but a flush per connection costs little and needs no
   * trust). Does nothing when the server has no flush (it writes through).
   */
  async flush(): Promise<void> {
    if (!this.info.canFlush) return;
    await settleAll(
      this.#conns.map((c) => c.request({ command: CMD_FLUSH, offset: 0, length: 0 })),
    );
  }

  /**
   * The byte ranges `[start, end)` of the first `limit` bytes that may hold data,
   * ascending and merged, from `base:allocation` block status: extents flagged
   * zero are left out (a hole not flagged zero is data: its contents are undefined,
   * so it is read); data extents are widened to whole 4 KiB. Null when the server
   * offers no block status.
   */
  async extents(limit: number = this.size): Promise<[number, number][] | null> {
    if (this.info.allocationContext === null) return null;
    const end = Math.min(limit, this.size);
    // Spans are asked a pool's worth at a time, in order: however large the export
    // claims to be, what waits for an answer stays bounded.
    const ahead: Promise<[number, number][]>[] = [];
    const window = this.#conns.length * this.#depth;
    const out: [number, number][] = [];
    let next = 0;
    try {
      while (next < end || ahead.length > 0) {
        for (; next < end && ahead.length < window; next += STATUS_SPAN) {
          const span = this.#spanExtents(next, Math.min(end, next + STATUS_SPAN));
          span.catch(() => {}); // awaited in turn below
          ahead.push(span);
        }
        for (const [a, b] of await ahead.shift()!) {
          const last = out[out.length - 1];
          if (last !== undefined && last[1] >= a) last[1] = Math.max(last[1], b);
          else out.push([a, b]);
        }
      }
    } catch (err) {
      await Promise.allSettled(ahead);
      throw err;
    }
    return out;
  }

  /** The data extents of `[from, to)`, asking until the server has described it all. */
  async #spanExtents(from: number, to: number): Promise<[number, number][]> {
    const out: [number, number][] = [];
    const min = this.info.minBlock;
    // Widened to whole grains: however finely the server cuts its extents, the list
    // stays within one entry per two grains of the export.
    const data = (from: number, to: number) => {
      const last = out[out.length - 1];
      const a = from - (from % EXTENT_GRAIN);
      const b = Math.min(this.size, Math.ceil(to / EXTENT_GRAIN) * EXTENT_GRAIN);
      if (last !== undefined && last[1] >= a) last[1] = Math.max(last[1], b);
      else out.push([a, b]);
    };
    for (let at = from; at < to;) {
      let len = Math.min(to, this.size) - at;
      if (len % min !== 0 && at + len !== this.size) len += min - (len % min);
      const reply = await this.#request({
        command: CMD_BLOCK_STATUS,
        offset: at,
        length: Math.min(len, this.size - at),
      });
      let pos = at;
      for (let k = 0; k < reply.length && pos < to; k += 2) {
        const next = Math.min(to, pos + reply[k]);
        if ((reply[k + 1] & STATE_ZERO) === 0) data(pos, next);
        pos = next;
      }
      // Extents ending inside a block (which the spec forbids) leave its rest
      // undescribed: it counts as data, and the next query starts aligned.
      if (pos < to && pos % min !== 0) {
        const up = Math.min(to, pos - (pos % min) + min);
        data(pos, up);
        pos = up;
      }
      at = pos;
    }
    return out;
  }

  /** Disconnects every connection (`NBD_CMD_DISC`); later calls do nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#signal?.removeEventListener("abort", this.#onAbort);
    for (const wake of this.#waiters.splice(0)) wake();
    await Promise.all(this.#conns.map((c) => c.close()));
  }
}

/**
 * Cuts `length` bytes into pieces of at most `piece`, sends them all (each waits for a
 * free slot) and waits for all of them.
 */
function inPieces(
  length: number,
  piece: number,
  send: (at: number, length: number) => Promise<unknown>,
): Promise<unknown[]> {
  const sent: Promise<unknown>[] = [];
  for (let at = 0; at < length; at += piece) sent.push(send(at, Math.min(piece, length - at)));
  return settleAll(sent);
}

/**
 * Waits for every promise and throws the first failure (after all have settled, so
 * no buffer is still being filled when the caller moves on).
 */
async function settleAll<T>(promises: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === "rejected");
  if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}
