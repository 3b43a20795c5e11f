/**
 * One NBD connection in the transmission phase: requests go out tagged with a
 * cookie, several at a time; one loop reads the replies (simple or structured) and
 * completes the request each belongs to. Read data lands straight in the caller's
 * buffer. Every reply is checked against its request before it is believed: data
 * and holes inside the requested range, covering it exactly once; block status
 * sized within the spec's bound; no reply for a cookie that was never sent. Any
 * breach, a dropped connection or an error reply fails with an {@link NbdError}.
 *
 * @module
 */
import { NbdError } from "../errors.ts";
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_READ,
  commandName,
  errorName,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR_BIT,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_MAGIC,
  serverText,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";
import { connectChannel, type TlsOptions, writeAll } from "./socket.ts";
import type { NbdAddress } from "./uri.ts";
import { type ExportInfo, negotiate, type Negotiated } from "./handshake.ts";
import type { WireReader } from "./socket.ts";

/** Most descriptors one block status chunk may carry (the spec's 2^20). */
const MAX_EXTENTS_PER_CHUNK = 1 << 20;
/** Longest error chunk accepted (a 4 KiB message plus its fields). */
const MAX_ERROR_CHUNK = 8192;
/** Payloads copied into the request header's buffer (one write instead of two). */
const SMALL_PAYLOAD = 64 * 1024;
/** Block status payload read at a time. */
const STATUS_PIECE = 8 * 4096;

/** One request: its command, flags, range, and where read data goes or what is written. */
export interface NbdRequest {
  command: number;
  flags?: number;
  offset: number;
  length: number;
  /** Read: receives exactly `length` bytes. */
  into?: Uint8Array;
  /** Write: the `length` bytes to write. */
  payload?: Uint8Array;
  /** Called once the request (and payload) is in the socket, or sending failed. */
  onSent?: (err: unknown) => void;
}

/** A block status reply: extent lengths and flags, alternating. */
export type StatusExtents = number[];

interface Pending {
  command: number;
  offset: number;
  length: number;
  into?: Uint8Array;
  /** Read: bytes filled so far by data and hole chunks (which may not overlap). */
  filled: number;
  /** Read: while the chunks come in order, the end of what they filled. */
  next: number;
  /** Read: one bit per byte filled, once a chunk came out of order (else null). */
  seen: Uint8Array | null;
  extents: StatusExtents;
  error: NbdError | null;
  resolve(extents: StatusExtents): void;
  reject(err: unknown): void;
}

/** Converts a 64-bit field to a number, refusing what a number cannot hold exactly. */
/** A DataView over exactly the bytes of `bytes`. */
function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
}

function u64(view: DataView, at: number): number {
  const hi = view.getUint32(at);
  if (hi > 0x1fffff) return Number.POSITIVE_INFINITY;
  return hi * 0x100000000 + view.getUint32(at + 4);
}

/** Sets bits `[from, to)` of `bits`; returns it. */
function markBits(bits: Uint8Array, from: number, to: number): Uint8Array {
  for (let i = from; i < to; i++) bits[i >> 3] |= 1 << (i & 7);
  return bits;
}

/** The first bit in `[from, to)` of `bits` that is `value`, or `to`. */
function firstBit(bits: Uint8Array, from: number, to: number, value: 0 | 1): number {
  for (let i = from; i < to; i++) if (((bits[i >> 3] >> (i & 7)) & 1) === value) return i;
  return to;
}

/** The first range `[from, to)` of a read's request that no chunk filled. */
function missing(p: Pending): [number, number] {
  if (p.seen === null) return [p.next, p.length];
  const from = firstBit(p.seen, 0, p.length, 0);
  return [from, firstBit(p.seen, from, p.length, 1)];
}

/** An NBD connection ready for requests. */
export class NbdConnection {
  readonly info: ExportInfo;
  #reader: WireReader;
  #channel: Negotiated["channel"];
  #pending = new Map<number, Pending>();
  #cookie = 0;
  #writes: Promise<void> = Promise.resolve();
  #failure: Error | null = null;
  #closing = false;

  constructor(negotiated: Negotiated, readonly uri: string) {
    this.info = negotiated.info;
    this.#reader = negotiated.reader;
    this.#channel = negotiated.channel;
    this.#readReplies();
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** The failure that ended this connection, if any. */
  get failure(): Error | null {
    return this.#failure;
  }

  /**
   * Ends the connection at once (no `NBD_CMD_DISC`): every request in flight, and any
   * made later, fails with `reason` (an interruption: a server that stopped answering
   * would otherwise hold them forever).
   */
  abort(reason: unknown): void {
    this.#fail(
      reason instanceof Error ? reason : new NbdError(`${this.uri}: stopped (${String(reason)})`),
    );
  }

  /**
   * Sends one request and resolves when its reply is complete: a read fills `into`
   * (exactly `length` bytes), a block status resolves with its extents.
   */
  request(req: NbdRequest): Promise<StatusExtents> {
    if (this.#failure !== null) return Promise.reject(this.#failure);
    const { command, offset, length, into } = req;
    const cookie = this.#cookie = (this.#cookie + 1) >>> 0;
    const payload = req.payload;
    const small = payload !== undefined && payload.length <= SMALL_PAYLOAD;
    const head = new Uint8Array(28 + (small ? payload.length : 0));
    const view = new DataView(head.buffer);
    view.setUint32(0, REQUEST_MAGIC);
    view.setUint16(4, req.flags ?? 0);
    view.setUint16(6, command);
    view.setUint32(8, 0);
    view.setUint32(12, cookie);
    view.setUint32(16, Math.floor(offset / 0x100000000));
    view.setUint32(20, offset >>> 0);
    view.setUint32(24, length);
    if (small) head.set(payload, 28);
    const done = command === CMD_DISC ? Promise.resolve([]) : new Promise<StatusExtents>(
      (resolve, reject) => {
        this.#pending.set(cookie, {
          command,
          offset,
          length,
          into,
          filled: 0,
          next: 0,
          seen: null,
          extents: [],
          error: null,
          resolve,
          reject,
        });
      },
    );
    // A failed send is told as an NbdError (or as what ended the connection first),
    // to the caller too: never the socket's own error.
    const sent = this.#writes.then(async () => {
      if (this.#failure !== null) throw this.#failure;
      await writeAll(this.#channel, head);
      if (payload !== undefined && !small) await writeAll(this.#channel, payload);
    }).catch((err) => {
      if (this.#failure !== null) throw this.#failure;
      // The server hung up (it may have said why in a reply not read yet): say so, as
      // the reader does when it meets the end of the stream first.
      const code = (err as { code?: string })?.code;
      const closed = err instanceof Deno.errors.BrokenPipe ||
        err instanceof Deno.errors.ConnectionReset || code === "EPIPE" || code === "ECONNRESET";
      throw err instanceof NbdError ? err : new NbdError(
        `${this.uri}: ${
          closed ? "the server closed the connection" : "the connection broke"
        } while sending a ${commandName(command)}: ${
          err instanceof Error ? err.message : String(err)
        }`,
        { cause: err },
      );
    });
    if (req.onSent !== undefined) sent.then(() => req.onSent!(null), (err) => req.onSent!(err));
    this.#writes = sent.catch((err) => this.#fail(err));
    return done;
  }

  /** Ends the session politely (`NBD_CMD_DISC`) and closes the socket. */
  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    if (this.#failure === null) {
      await this.request({ command: CMD_DISC, offset: 0, length: 0 }).catch(() => {});
      await this.#writes;
    }
    this.#closeChannel();
  }

  #closeChannel(): void {
    this.#closing = true;
    try {
      this.#channel.close();
    } catch {
      // already closed
    }
  }

  #fail(err: Error): void {
    if (this.#failure === null) this.#failure = err;
    for (const p of this.#pending.values()) p.reject(this.#failure);
    this.#pending.clear();
    this.#closeChannel();
  }

  #protocol(what: string): NbdError {
    return new NbdError(`${this.uri}: protocol error: ${what}`);
  }

  async #readReplies(): Promise<void> {
    try {
      for (;;) {
        const magic = viewOf(await this.#reader.exact(4)).getUint32(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.#simpleReply();
        else if (magic === STRUCTURED_REPLY_MAGIC) await this.#structuredChunk();
        else throw this.#protocol(`a reply has the bad magic number 0x${magic.toString(16)}`);
      }
    } catch (err) {
      if (this.#closing && this.#pending.size === 0) return;
      this.#fail(
        err instanceof NbdError ? err : new NbdError(`${this.uri}: ${String(err)}`, { cause: err }),
      );
    }
  }

  #take(cookieHi: number, cookie: number): Pending {
    const pending = cookieHi === 0 ? this.#pending.get(cookie) : undefined;
    if (pending === undefined) {
      throw this.#protocol(
        `the server answered request ${cookieHi * 0x100000000 + cookie}, which was never sent`,
      );
    }
    return pending;
  }

  #where(p: Pending): string {
    return `a ${commandName(p.command)} of ${p.length} bytes at byte offset ${p.offset}`;
  }

  async #simpleReply(): Promise<void> {
    const view = viewOf(await this.#reader.exact(12));
    const error = view.getUint32(0);
    const cookie = view.getUint32(8);
    const p = this.#take(view.getUint32(4), cookie);
    if (error !== 0) {
      this.#pending.delete(cookie);
      p.reject(
        new NbdError(`${this.uri}: the server answered ${errorName(error)} to ${this.#where(p)}`),
      );
      return;
    }
    if (p.command === CMD_READ) {
      if (this.info.structured) {
        throw this.#protocol(`a simple reply with data to ${this.#where(p)}`);
      }
      await this.#reader.into(p.into!.subarray(0, p.length));
    } else if (p.command === CMD_BLOCK_STATUS) {
      throw this.#protocol(`a simple reply to ${this.#where(p)}`);
    }
    this.#pending.delete(cookie);
    p.resolve([]);
  }

  async #structuredChunk(): Promise<void> {
    const view = viewOf(await this.#reader.exact(16));
    const flags = view.getUint16(0);
    const type = view.getUint16(2);
    const cookie = view.getUint32(8);
    const length = view.getUint32(12);
    const p = this.#take(view.getUint32(4), cookie);
    if (!this.info.structured) throw this.#protocol("a structured reply that was not negotiated");
    if (type === REPLY_TYPE_NONE) {
      if (length !== 0 || (flags & REPLY_FLAG_DONE) === 0) {
        throw this.#protocol(`a malformed NBD_REPLY_TYPE_NONE to ${this.#where(p)}`);
      }
    } else if ((type & REPLY_TYPE_ERROR_BIT) !== 0) {
      await this.#errorChunk(p, type, length);
    } else if (type === REPLY_TYPE_OFFSET_DATA && p.command === CMD_READ) {
      if (length < 9) throw this.#protocol(`a data chunk of ${length} bytes`);
      const at = viewOf(await this.#reader.exact(8)).getBigUint64(0);
      const start = this.#inside(p, at, length - 8, "data");
      await this.#reader.into(p.into!.subarray(start, start + length - 8));
    } else if (type === REPLY_TYPE_OFFSET_HOLE && p.command === CMD_READ) {
      if (length !== 12) throw this.#protocol(`a hole chunk of ${length} bytes (12 expected)`);
      const hole = viewOf(await this.#reader.exact(12));
      const size = hole.getUint32(8);
      if (size === 0) throw this.#protocol("a hole chunk of 0 bytes");
      const start = this.#inside(p, hole.getBigUint64(0), size, "hole");
      p.into!.fill(0, start, start + size);
    } else if (type === REPLY_TYPE_BLOCK_STATUS && p.command === CMD_BLOCK_STATUS) {
      await this.#statusChunk(p, length);
    } else {
      throw this.#protocol(`an unexpected reply chunk of type ${type} to ${this.#where(p)}`);
    }
    if ((flags & REPLY_FLAG_DONE) === 0) return;
    if (p.error === null && p.command === CMD_READ && p.filled !== p.length) {
      const [from, to] = missing(p);
      throw this.#protocol(
        `bytes ${p.offset + from}-${p.offset + to} missing from the reply to ${this.#where(p)}`,
      );
    }
    if (p.error === null && p.command === CMD_BLOCK_STATUS && p.extents.length === 0) {
      throw this.#protocol(`no extents in the reply to ${this.#where(p)}`);
    }
    this.#pending.delete(cookie);
    if (p.error !== null) p.reject(p.error);
    else p.resolve(p.extents);
  }

  /**
   * Checks a data or hole chunk lies in the request and overlaps no earlier chunk (so
   * however many chunks come, they fill the request at most once); returns its start
   * in the buffer.
   */
  #inside(p: Pending, at: bigint, size: number, what: string): number {
    const rel = at - BigInt(p.offset);
    if (rel < 0n || rel + BigInt(size) > BigInt(p.length)) {
      throw this.#protocol(
        `a ${what} chunk for bytes ${at}-${at + BigInt(size)} outside ${this.#where(p)}`,
      );
    }
    const start = Number(rel);
    if (p.seen === null && start === p.next) p.next += size;
    else {
      p.seen ??= markBits(new Uint8Array(Math.ceil(p.length / 8)), 0, p.next);
      if (firstBit(p.seen, start, start + size, 1) < start + size) {
        throw this.#protocol(`overlapping chunks in the reply to ${this.#where(p)}`);
      }
      markBits(p.seen, start, start + size);
    }
    p.filled += size;
    return start;
  }

  async #statusChunk(p: Pending, length: number): Promise<void> {
    const count = (length - 4) / 8;
    if (length < 12 || !Number.isInteger(count) || count > MAX_EXTENTS_PER_CHUNK) {
      throw this.#protocol(`a block status chunk of ${length} bytes`);
    }
    const id = viewOf(await this.#reader.exact(4)).getUint32(0);
    if (id !== this.info.allocationContext) {
      throw this.#protocol(`block status for metadata context ${id}, which was not asked for`);
    }
    if (p.extents.length > 0) throw this.#protocol(`two block status chunks for one context`);
    for (let left = count; left > 0;) {
      const n = Math.min(left, STATUS_PIECE / 8);
      const view = viewOf(await this.#reader.exact(n * 8));
      for (let k = 0; k < n; k++) {
        const len = view.getUint32(k * 8);
        if (len === 0) throw this.#protocol(`an extent of length 0 in ${this.#where(p)}`);
        p.extents.push(len, view.getUint32(k * 8 + 4));
      }
      left -= n;
    }
  }

  async #errorChunk(p: Pending, type: number, length: number): Promise<void> {
    if (length < 6 || length > MAX_ERROR_CHUNK) {
      throw this.#protocol(`an error chunk of ${length} bytes`);
    }
    const body = (await this.#reader.exact(length)).slice();
    const view = new DataView(body.buffer);
    const code = view.getUint32(0);
    const msgLength = view.getUint16(4);
    if (msgLength > length - 6) throw this.#protocol("an error message longer than its chunk");
    const text = serverText(body.subarray(6, 6 + msgLength));
    let where = this.#where(p);
    if (type === REPLY_TYPE_ERROR_OFFSET && length >= 14 + msgLength) {
      where += ` (failing at byte offset ${u64(view, 6 + msgLength)})`;
    }
    p.error ??= new NbdError(
      `${this.uri}: the server answered ${errorName(code)} to ${where}${
        text === "" ? "" : `: ${text}`
      }`,
    );
  }
}

/**
 * Connects to `address` and negotiates; `timeoutMs` bounds the handshake (for the
 * extra connections of a pool: a server that accepts only one never greets them), and
 * `signal` stops it (with its reason).
 */
export async function openConnection(
  address: NbdAddress,
  options: TlsOptions,
  timeoutMs?: number,
  signal?: AbortSignal,
): Promise<NbdConnection> {
  signal?.throwIfAborted();
  const conn = await connectChannel(address);
  let timer: ReturnType<typeof setTimeout> | undefined;
  let onAbort: (() => void) | undefined;
  try {
    const negotiated = negotiate(conn, address, options);
    negotiated.catch(() => {}); // a late failure after the timeout is not unhandled
    const result = await Promise.race([
      negotiated,
      new Promise<never>((_, reject) => {
        if (timeoutMs !== undefined) {
          timer = setTimeout(
            () => reject(new NbdError(`${address.uri}: the server did not answer the handshake`)),
            timeoutMs,
          );
        }
        onAbort = () => reject(signal!.reason);
        signal?.addEventListener("abort", onAbort, { once: true });
      }),
    ]);
    return new NbdConnection(result, address.uri);
  } catch (err) {
    try {
      conn.close();
    } catch {
      // closed by TLS already
    }
    throw err;
  } finally {
    clearTimeout(timer);
    if (onAbort !== undefined) signal?.removeEventListener("abort", onAbort);
  }
}
