/**
 * The NBD handshake, fixed newstyle (doc/proto.md "Fixed newstyle negotiation"):
 * optional `NBD_OPT_STARTTLS`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`
 * for `base:allocation`, then `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`
 * (`NBD_OPT_EXPORT_NAME` when the server does not know `NBD_OPT_GO`). Every length
 * the server sends is checked before it sizes a read; refusals become one-line
 * {@link NbdError}s that say what to do.
 *
 * @module
 */
import { NbdError } from "../errors.ts";
import {
  BASE_ALLOCATION,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_EXPORT,
  NBD_MAGIC,
  OLDSTYLE_MAGIC,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  optionName,
  REP_ACK,
  REP_ERR_BIT,
  REP_ERR_BLOCK_SIZE_REQD,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  serverText,
  TFLAG_CAN_MULTI_CONN,
  TFLAG_READ_ONLY,
  TFLAG_SEND_FLUSH,
  TFLAG_SEND_WRITE_ZEROES,
} from "./constants.ts";
import { type Channel, startTls, type TlsOptions, WireReader, writeAll } from "./socket.ts";
import type { NbdAddress } from "./uri.ts";

/** What the handshake agreed on for one export. */
export interface ExportInfo {
  /** Size of the export in bytes. */
  readonly size: number;
  /** Transmission flags. */
  readonly flags: number;
  /** Every request's offset and length are multiples of this (a power of two). */
  readonly minBlock: number;
  /** Requests aligned to this are efficient. */
  readonly preferredBlock: number;
  /** Largest read or write payload to request (at most 32 MiB). */
  readonly maxPayload: number;
  /** Structured replies were negotiated. */
  readonly structured: boolean;
  /** The id of `base:allocation`, or null when the server offers no block status. */
  readonly allocationContext: number | null;
  /** The export refuses writes. */
  readonly readOnly: boolean;
  /** `NBD_CMD_FLUSH` is understood. */
  readonly canFlush: boolean;
  /** `NBD_CMD_WRITE_ZEROES` is understood. */
  readonly canWriteZeroes: boolean;
  /** Several connections see each other's writes (flush on one covers all). */
  readonly canMultiConn: boolean;
}

/** Longest option reply accepted (names and messages are at most 4 KiB). */
const MAX_OPTION_REPLY = 16 * 1024;
/** Largest payload requested when the server names none (the spec's safe default). */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

interface OptionReply {
  type: number;
  data: Uint8Array;
}

/** One negotiation on a fresh connection. */
class Negotiation {
  reader: WireReader;
  channel: Channel;

  constructor(conn: Deno.Conn, readonly address: NbdAddress) {
    this.channel = conn;
    this.reader = new WireReader(conn, address.uri);
  }

  fail(what: string): NbdError {
    return new NbdError(`${this.address.uri}: ${what}`);
  }

  /** Sends `bytes`; a socket the server closed is an {@link NbdError} like a short read. */
  async send(bytes: Uint8Array): Promise<void> {
    try {
      await writeAll(this.channel, bytes);
    } catch (err) {
      const why = err instanceof Error ? `: ${err.message}` : "";
      throw new NbdError(`${this.address.uri}: the server closed the connection${why}`, {
        cause: err,
      });
    }
  }

  async sendOption(option: number, data: Uint8Array = new Uint8Array(0)): Promise<void> {
    const msg = new Uint8Array(16 + data.length);
    const view = new DataView(msg.buffer);
    view.setBigUint64(0, IHAVEOPT);
    view.setUint32(8, option);
    view.setUint32(12, data.length);
    msg.set(data, 16);
    await this.send(msg);
  }

  async reply(option: number): Promise<OptionReply> {
    const head = new DataView((await this.reader.exact(20)).slice().buffer);
    if (head.getBigUint64(0) !== OPTION_REPLY_MAGIC) {
      throw this.fail(`the server's reply to ${optionName(option)} has a bad magic number`);
    }
    if (head.getUint32(8) !== option) {
      throw this.fail(
        `the server answered option ${head.getUint32(8)} while ${optionName(option)} was asked`,
      );
    }
    const type = head.getUint32(12);
    const length = head.getUint32(16);
    if (length > MAX_OPTION_REPLY) {
      throw this.fail(
        `the server's reply to ${
          optionName(option)
        } claims ${length} bytes (at most ${MAX_OPTION_REPLY} expected)`,
      );
    }
    return { type, data: (await this.reader.exact(length)).slice() };
  }

  /** The message of an error reply, with the server's text when it sent one. */
  refusal(option: number, reply: OptionReply): NbdError {
    const text = serverText(reply.data);
    const said = text === "" ? "" : ` (the server says: ${text})`;
    const name = JSON.stringify(this.address.exportName);
    let what: string;
    switch (reply.type) {
      case REP_ERR_UNKNOWN:
        what = `the server has no export named ${name}: check the URI's path`;
        break;
      case REP_ERR_POLICY:
        what = `the server refuses ${optionName(option)} for export ${name} by policy`;
        break;
      case REP_ERR_TLS_REQD:
        what = "the server requires TLS: use nbds:// (or nbds+unix://) with --cacert";
        break;
      case REP_ERR_SHUTDOWN:
        what = "the server is shutting down";
        break;
      case REP_ERR_BLOCK_SIZE_REQD:
        what = "the server requires block size negotiation";
        break;
      default:
        what = reply.type >= REP_ERR_BIT
          ? `the server refused ${optionName(option)} (error ${reply.type - REP_ERR_BIT})`
          : `the server sent reply type ${reply.type} to ${optionName(option)}`;
    }
    return this.fail(what + said);
  }

  async greet(): Promise<number> {
    const hello = new DataView((await this.reader.exact(18)).slice().buffer);
    if (hello.getBigUint64(0) !== NBD_MAGIC) {
      throw this.fail("the peer is not an NBD server (no NBDMAGIC greeting)");
    }
    const kind = hello.getBigUint64(8);
    if (kind === OLDSTYLE_MAGIC) {
      throw this.fail("the server speaks the oldstyle protocol, which has no export names");
    }
    if (kind !== IHAVEOPT) throw this.fail("the server's greeting is not NBD newstyle");
    const flags = hello.getUint16(16);
    if ((flags & FLAG_FIXED_NEWSTYLE) === 0) {
      throw this.fail("the server does not speak fixed newstyle NBD");
    }
    const client = new Uint8Array(4);
    new DataView(client.buffer).setUint32(
      0,
      FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES),
    );
    await this.send(client);
    return flags;
  }

  async startTls(options: TlsOptions, conn: Deno.Conn): Promise<void> {
    await this.sendOption(OPT_STARTTLS);
    const reply = await this.reply(OPT_STARTTLS);
    if (reply.type !== REP_ACK) {
      if (reply.type === REP_ERR_UNSUP || reply.type === REP_ERR_POLICY) {
        throw this.fail(
          "the server does not offer TLS (nbds:// requires it; use nbd:// for a cleartext server)",
        );
      }
      throw this.refusal(OPT_STARTTLS, reply);
    }
    if (this.reader.buffered > 0) throw this.fail("the server sent data before the TLS handshake");
    this.channel = await startTls(conn, this.address, options);
    this.reader.channel = this.channel;
  }

  /** True when structured replies were agreed. */
  async structuredReplies(): Promise<boolean> {
    await this.sendOption(OPT_STRUCTURED_REPLY);
    const reply = await this.reply(OPT_STRUCTURED_REPLY);
    if (reply.type === REP_ACK) return true;
    if (reply.type === REP_ERR_TLS_REQD) throw this.refusal(OPT_STRUCTURED_REPLY, reply);
    if (reply.type < REP_ERR_BIT) throw this.refusal(OPT_STRUCTURED_REPLY, reply);
    return false;
  }

  /** The id of `base:allocation`, or null when the server does not offer it. */
  async allocationContext(): Promise<number | null> {
    const name = encoder.encode(this.address.exportName);
    const query = encoder.encode(BASE_ALLOCATION);
    const data = new Uint8Array(4 + name.length + 4 + 4 + query.length);
    const view = new DataView(data.buffer);
    view.setUint32(0, name.length);
    data.set(name, 4);
    view.setUint32(4 + name.length, 1);
    view.setUint32(8 + name.length, query.length);
    data.set(query, 12 + name.length);
    await this.sendOption(OPT_SET_META_CONTEXT, data);
    let id: number | null = null;
    for (;;) {
      const reply = await this.reply(OPT_SET_META_CONTEXT);
      if (reply.type === REP_ACK) return id;
      if (reply.type === REP_META_CONTEXT) {
        if (reply.data.length < 4) throw this.fail("the server sent a metadata context without id");
        const ctx = new DataView(reply.data.buffer).getUint32(0);
        if (decoder.decode(reply.data.subarray(4)) === BASE_ALLOCATION) id = ctx;
        continue;
      }
      if (reply.type === REP_ERR_TLS_REQD || reply.type === REP_ERR_UNKNOWN) {
        throw this.refusal(OPT_SET_META_CONTEXT, reply);
      }
      if (reply.type >= REP_ERR_BIT) return null; // no block status: everything is read
      throw this.refusal(OPT_SET_META_CONTEXT, reply);
    }
  }

  /** `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`; null when the server does not know GO. */
  async go(): Promise<{ size: number; flags: number; sizes: number[] | null } | null> {
    const name = encoder.encode(this.address.exportName);
    const data = new Uint8Array(4 + name.length + 4);
    const view = new DataView(data.buffer);
    view.setUint32(0, name.length);
    data.set(name, 4);
    view.setUint16(4 + name.length, 1);
    view.setUint16(6 + name.length, INFO_BLOCK_SIZE);
    await this.sendOption(OPT_GO, data);
    let exported: { size: number; flags: number } | null = null;
    let sizes: number[] | null = null;
    for (;;) {
      const reply = await this.reply(OPT_GO);
      if (reply.type === REP_ACK) {
        if (exported === null) throw this.fail("the server accepted NBD_OPT_GO without a size");
        return { ...exported, sizes };
      }
      if (reply.type === REP_ERR_UNSUP) return null;
      if (reply.type !== REP_INFO) throw this.refusal(OPT_GO, reply);
      if (reply.data.length < 2) throw this.fail("the server sent an empty NBD_REP_INFO");
      const info = new DataView(reply.data.buffer);
      const type = info.getUint16(0);
      if (type === INFO_EXPORT) {
        if (reply.data.length !== 12) {
          throw this.fail("the server's NBD_INFO_EXPORT is not 12 bytes");
        }
        exported = { size: this.size(info, 2), flags: info.getUint16(10) };
      } else if (type === INFO_BLOCK_SIZE) {
        if (reply.data.length !== 14) {
          throw this.fail("the server's NBD_INFO_BLOCK_SIZE is not 14 bytes");
        }
        sizes = [info.getUint32(2), info.getUint32(6), info.getUint32(10)];
      }
    }
  }

  size(view: DataView, at: number): number {
    const size = view.getBigUint64(at);
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw this.fail(`the export's size (${size} bytes) is too large`);
    }
    return Number(size);
  }

  /** The old way into transmission: `NBD_OPT_EXPORT_NAME`. */
  async exportName(serverFlags: number): Promise<{ size: number; flags: number }> {
    await this.sendOption(OPT_EXPORT_NAME, encoder.encode(this.address.exportName));
    const zeroes = (serverFlags & FLAG_NO_ZEROES) !== 0 ? 0 : 124;
    let reply: DataView;
    try {
      reply = new DataView((await this.reader.exact(10)).slice().buffer);
    } catch (err) {
      if (!(err instanceof NbdError)) throw err;
      throw this.fail(
        `the server closed the connection: it has no export named ${
          JSON.stringify(this.address.exportName)
        }, or refuses it`,
      );
    }
    await this.reader.skip(zeroes);
    return { size: this.size(reply, 0), flags: reply.getUint16(8) };
  }

  blockSizes(sizes: number[] | null): { min: number; preferred: number; max: number } {
    if (sizes === null) return { min: 1, preferred: 4096, max: DEFAULT_MAX_PAYLOAD };
    const [min, preferred, max] = sizes;
    const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
    if (!pow2(min) || min > 65536) {
      throw this.fail(`the server's minimum block size ${min} is not a power of two up to 64 KiB`);
    }
    if (max < min) {
      throw this.fail(`the server's maximum payload ${max} is below its minimum block ${min}`);
    }
    const cap = Math.min(max, DEFAULT_MAX_PAYLOAD);
    return {
      min,
      preferred: pow2(preferred) && preferred >= min ? preferred : Math.max(min, 4096),
      max: cap - (cap % min),
    };
  }
}

/** A connection in the transmission phase. */
export interface Negotiated {
  channel: Channel;
  reader: WireReader;
  info: ExportInfo;
}

/**
 * Runs the handshake on `conn` for `address`: TLS when the URI asks for it, then
 * structured replies, `base:allocation` and `NBD_OPT_GO`.
 */
export async function negotiate(
  conn: Deno.Conn,
  address: NbdAddress,
  options: TlsOptions,
): Promise<Negotiated> {
  const n = new Negotiation(conn, address);
  const serverFlags = await n.greet();
  if (address.tls) await n.startTls(options, conn);
  const structured = await n.structuredReplies();
  const allocationContext = structured ? await n.allocationContext() : null;
  const went = await n.go();
  const { size, flags } = went ?? await n.exportName(serverFlags);
  const sizes = n.blockSizes(went?.sizes ?? null);
  return {
    channel: n.channel,
    reader: n.reader,
    info: {
      size,
      flags,
      minBlock: sizes.min,
      preferredBlock: sizes.preferred,
      maxPayload: sizes.max,
      structured,
      allocationContext,
      readOnly: (flags & TFLAG_READ_ONLY) !== 0,
      canFlush: (flags & TFLAG_SEND_FLUSH) !== 0,
      canWriteZeroes: (flags & TFLAG_SEND_WRITE_ZEROES) !== 0,
      canMultiConn: (flags & TFLAG_CAN_MULTI_CONN) !== 0,
    },
  };
}
