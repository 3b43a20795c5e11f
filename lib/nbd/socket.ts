/**
 * The byte channel under an NBD connection: a TCP or Unix socket (Deno.connect),
 * upgraded to TLS in place after `NBD_OPT_STARTTLS` — `Deno.startTls` on TCP, and
 * `node:tls` over a `node:net` socket for Unix sockets (which `Deno.startTls` does
 * not accept) — plus the buffered reader and serialised writer the protocol uses.
 *
 * @module
 */
import type * as net from "node:net";
import * as tls from "node:tls";
import { Buffer } from "node:buffer";
import { Duplex } from "node:stream";
import { NbdError } from "../errors.ts";
import type { NbdAddress } from "./uri.ts";

/** What the protocol needs of a connection: read, write, close. */
export interface Channel {
  read(buf: Uint8Array): Promise<number | null>;
  write(buf: Uint8Array): Promise<number>;
  close(): void;
}

/** How to check the server's certificate. */
export interface TlsOptions {
  /** PEM text of the CA certificate(s); default: the system's roots. */
  caCerts?: string[];
}

/** Opens the socket of `address` (not yet TLS). */
export async function connectChannel(address: NbdAddress): Promise<Deno.Conn> {
  const t = address.transport;
  try {
    return t.kind === "tcp"
      ? await Deno.connect({ hostname: t.host, port: t.port })
      : await Deno.connect({ transport: "unix", path: t.socket });
  } catch (err) {
    const where = t.kind === "tcp" ? `${t.host}:${t.port}` : t.socket;
    const why = err instanceof Deno.errors.ConnectionRefused
      ? "connection refused (is the NBD server running?)"
      : err instanceof Deno.errors.NotFound
      ? "no such socket (is the NBD server running?)"
      : err instanceof Deno.errors.NotCapable
      ? "Deno was not given --allow-net (or --allow-read/--allow-write for a socket)"
      : err instanceof Error
      ? err.message
      : String(err);
    throw new NbdError(`${address.uri}: cannot connect to ${where}: ${why}`, { cause: err });
  }
}

/** Runs the TLS handshake over `conn` and returns the encrypted channel. */
export async function startTls(
  conn: Deno.Conn,
  address: NbdAddress,
  options: TlsOptions,
): Promise<Channel> {
  try {
    if (address.transport.kind === "tcp") {
      const tlsConn = await Deno.startTls(conn as Deno.TcpConn, {
        hostname: address.tlsHostname,
        caCerts: options.caCerts,
      });
      await tlsConn.handshake();
      return tlsConn;
    }
    return await nodeTlsOverUnix(conn, address, options);
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new NbdError(
      `${address.uri}: the TLS handshake failed: ${msg} (check --cacert and the server's certificate name)`,
      { cause: err },
    );
  }
}

/**
 * TLS over a Unix socket: `Deno.startTls` takes TCP connections only, so the Deno
 * connection (which already carried the cleartext part of the handshake) is bridged
 * into a `node:tls` client through a Duplex.
 */
async function nodeTlsOverUnix(
  conn: Deno.Conn,
  address: NbdAddress,
  options: TlsOptions,
): Promise<Channel> {
  let closed = false;
  const pump = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, done) {
      writeAll(conn, new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length)).then(
        () => done(),
        (err) => done(err),
      );
    },
    final(done) {
      done();
    },
  });
  (async () => {
    const buf = new Uint8Array(256 * 1024);
    try {
      while (!closed) {
        const n = await conn.read(buf);
        if (n === null) break;
        pump.push(Buffer.from(buf.subarray(0, n)));
      }
    } catch {
      // the connection was closed
    }
    pump.push(null);
  })();
  const socket = tls.connect({
    socket: pump as unknown as net.Socket,
    servername: address.tlsHostname,
    ca: options.caCerts,
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("secureConnect", () => resolve());
    socket.once("error", reject);
  });
  const channel = new NodeChannel(socket);
  const close = channel.close.bind(channel);
  channel.close = () => {
    closed = true;
    close();
    try {
      conn.close();
    } catch {
      // already closed
    }
  };
  return channel;
}

/** A node:tls socket as a pull-style {@link Channel}. */
class NodeChannel implements Channel {
  #chunks: Uint8Array[] = [];
  #ended = false;
  #error: unknown = null;
  #wake: (() => void) | null = null;

  constructor(readonly socket: tls.TLSSocket) {
    socket.on("data", (b: Buffer) => {
      this.#chunks.push(new Uint8Array(b.buffer, b.byteOffset, b.length));
      if (this.#chunks.length > 16) socket.pause();
      this.#notify();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("error", (err) => {
      this.#error = err;
      this.#notify();
    });
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  async read(buf: Uint8Array): Promise<number | null> {
    while (this.#chunks.length === 0) {
      if (this.#error !== null) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    const head = this.#chunks[0];
    const n = Math.min(head.length, buf.length);
    buf.set(head.subarray(0, n));
    if (n === head.length) this.#chunks.shift();
    else this.#chunks[0] = head.subarray(n);
    if (this.#chunks.length <= 4) this.socket.resume();
    return n;
  }

  write(buf: Uint8Array): Promise<number> {
    return new Promise((resolve, reject) => {
      this.socket.write(buf, (err) => err ? reject(err) : resolve(buf.length));
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Writes all of `buf` (a channel may take part of it). */
export async function writeAll(channel: Channel, buf: Uint8Array): Promise<void> {
  for (let at = 0; at < buf.length;) at += await channel.write(buf.subarray(at));
}

/**
 * Buffered reads of exact lengths from a channel. A clean end of the stream in the
 * middle of a message is reported as the server having closed the connection.
 */
export class WireReader {
  #buf = new Uint8Array(64 * 1024);
  #start = 0;
  #end = 0;

  constructor(public channel: Channel, readonly uri: string) {}

  /** Bytes read but not consumed (none may be left when TLS starts). */
  get buffered(): number {
    return this.#end - this.#start;
  }

  async #fill(): Promise<void> {
    if (this.#start === this.#end) this.#start = this.#end = 0;
    else if (this.#start > 0 && this.#end === this.#buf.length) {
      this.#buf.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    let n: number | null;
    try {
      n = await this.channel.read(this.#buf.subarray(this.#end));
    } catch (err) {
      throw this.#dropped(err);
    }
    if (n === null) throw this.#dropped();
    this.#end += n;
  }

  #dropped(cause?: unknown): NbdError {
    const why = cause instanceof Error ? `: ${cause.message}` : "";
    return new NbdError(`${this.uri}: the server closed the connection${why}`, { cause });
  }

  /**
   * The next `n` bytes (at most 64 KiB), as a view valid until the next read.
   */
  async exact(n: number): Promise<Uint8Array> {
    if (n > this.#buf.length) throw new RangeError(`read of ${n} bytes exceeds the buffer`);
    if (this.#start + n > this.#buf.length) {
      this.#buf.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    while (this.#end - this.#start < n) await this.#fill();
    const view = this.#buf.subarray(this.#start, this.#start + n);
    this.#start += n;
    return view;
  }

  /** Fills all of `target` with the next bytes (large ones read straight into it). */
  async into(target: Uint8Array): Promise<void> {
    const have = Math.min(this.#end - this.#start, target.length);
    target.set(this.#buf.subarray(this.#start, this.#start + have));
    this.#start += have;
    let at = have;
    while (at < target.length) {
      let n: number | null;
      try {
        n = await this.channel.read(target.subarray(at));
      } catch (err) {
        throw this.#dropped(err);
      }
      if (n === null) throw this.#dropped();
      at += n;
    }
  }

  /** Discards the next `n` bytes. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      if (this.#start === this.#end) await this.#fill();
      const k = Math.min(n, this.#end - this.#start);
      this.#start += k;
      n -= k;
    }
  }
}
