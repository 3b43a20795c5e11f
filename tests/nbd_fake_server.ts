/**
 * A fake NBD server on a Unix socket for the hostile-server tests: by default a
 * correct fixed-newstyle server of a small in-memory export (structured replies,
 * `base:allocation`, block sizes), whose every step a test can replace to misbehave:
 * the greeting, an option's replies, a request's replies, or closing and going silent
 * at any point. It runs in the test's process; the CLI under test connects to it.
 */

const MAGIC_NBD = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY = 0x3e889045565a9n;

/** Option reply types. */
export const ACK = 1;
export const INFO = 3;
export const META_CONTEXT = 4;
export const ERR_UNSUP = 0x80000001;

/** A request of the transmission phase. */
export interface Request {
  flags: number;
  command: number;
  cookie: number;
  cookieHi: number;
  offset: number;
  length: number;
}

/** What a test may change; every field has a correct default. */
export interface Behaviour {
  /** The 18-byte greeting (default NBDMAGIC, IHAVEOPT, `handshakeFlags`). */
  greeting?: Uint8Array;
  /** Runs after the greeting is sent, before the client's flags are read. */
  afterGreeting?: (s: Session) => Promise<void>;
  /** Handshake flags of the greeting (default fixed newstyle + no zeroes). */
  handshakeFlags?: number;
  /** The export's bytes (default 1 MiB of a pattern). */
  data?: Uint8Array;
  /** The size announced (default the data's length). */
  size?: bigint;
  /** Transmission flags (default: has flags, flush, write zeroes). */
  flags?: number;
  /** `NBD_INFO_BLOCK_SIZE` [min, preferred, max], null for none (default 512, 4096, 32M). */
  blockSizes?: [number, number, number] | null;
  /** The id of `base:allocation`, null to offer no block status (default 1). */
  contextId?: number | null;
  /**
   * Replaces the replies to an option: false lets the default answer, true goes on
   * with the next option, "go" starts the transmission phase.
   */
  option?: (s: Session, option: number, data: Uint8Array) => Promise<boolean | "go">;
  /** Replaces the replies to a request; return false to let the default answer. */
  request?: (s: Session, req: Request, payload: Uint8Array | null) => Promise<boolean>;
}

/** One client connection, with the means to answer it (rightly or wrongly). */
export class Session {
  constructor(
    readonly conn: Deno.UnixConn,
    readonly b: Behaviour,
    /** Every request of every session of the server, as it came. */
    readonly log: Request[],
  ) {}

  async write(bytes: Uint8Array): Promise<void> {
    for (let at = 0; at < bytes.length;) at += await this.conn.write(bytes.subarray(at));
  }

  async read(n: number): Promise<Uint8Array> {
    const buf = new Uint8Array(n);
    for (let at = 0; at < n;) {
      const k = await this.conn.read(buf.subarray(at));
      if (k === null) throw new Error("client went away");
      at += k;
    }
    return buf;
  }

  /** An option reply with `data`. */
  optionReply(option: number, type: number, data = new Uint8Array(0), length = data.length) {
    const b = new Uint8Array(20 + data.length);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, OPTION_REPLY);
    v.setUint32(8, option);
    v.setUint32(12, type);
    v.setUint32(16, length);
    b.set(data, 20);
    return this.write(b);
  }

  /** A simple reply (error code, cookie) followed by `data`. */
  simple(cookie: number, error = 0, data = new Uint8Array(0)) {
    const b = new Uint8Array(16 + data.length);
    const v = new DataView(b.buffer);
    v.setUint32(0, 0x67446698);
    v.setUint32(4, error);
    v.setUint32(12, cookie);
    b.set(data, 16);
    return this.write(b);
  }

  /** A structured reply chunk with `payload` (its length field may lie: `length`). */
  chunk(flags: number, type: number, cookie: number, payload: Uint8Array, length?: number) {
    const b = new Uint8Array(20 + payload.length);
    const v = new DataView(b.buffer);
    v.setUint32(0, 0x668e33ef);
    v.setUint16(4, flags);
    v.setUint16(6, type);
    v.setUint32(12, cookie);
    v.setUint32(16, length ?? payload.length);
    b.set(payload, 20);
    return this.write(b);
  }

  /** An NBD_REPLY_TYPE_OFFSET_DATA chunk for `bytes` at `offset`. */
  dataChunk(flags: number, cookie: number, offset: number, bytes: Uint8Array) {
    const p = new Uint8Array(8 + bytes.length);
    new DataView(p.buffer).setBigUint64(0, BigInt(offset));
    p.set(bytes, 8);
    return this.chunk(flags, 1, cookie, p);
  }

  /** An NBD_REPLY_TYPE_BLOCK_STATUS chunk for context `id` with [length, flags] pairs. */
  statusChunk(flags: number, cookie: number, id: number, extents: [number, number][]) {
    const p = new Uint8Array(4 + 8 * extents.length);
    const v = new DataView(p.buffer);
    v.setUint32(0, id);
    extents.forEach(([len, f], k) => {
      v.setUint32(4 + 8 * k, len);
      v.setUint32(8 + 8 * k, f);
    });
    return this.chunk(flags, 5, cookie, p);
  }

  /** An error chunk (NBD_REPLY_TYPE_ERROR) with `code` and `message`. */
  errorChunk(flags: number, cookie: number, code: number, message: string, msgLength?: number) {
    const text = new TextEncoder().encode(message);
    const p = new Uint8Array(6 + text.length);
    new DataView(p.buffer).setUint32(0, code);
    new DataView(p.buffer).setUint16(4, msgLength ?? text.length);
    p.set(text, 6);
    return this.chunk(flags, 0x8001, cookie, p);
  }

  /** Never answers again (the connection stays open until the server stops). */
  hang(): Promise<void> {
    return new Promise(() => {});
  }

  close(): void {
    try {
      this.conn.close();
    } catch {
      // closed
    }
  }

  get data(): Uint8Array {
    return this.b.data!;
  }
}

/** A running fake server. */
export interface FakeNbd {
  uri: string;
  /** Sessions started (one per connection). */
  sessions: Session[];
  /** Every request received, in order. */
  log: Request[];
  stop(): Promise<void>;
}

async function defaultOption(s: Session, option: number, data: Uint8Array): Promise<void> {
  const b = s.b;
  if (option === 8) {
    await s.optionReply(8, ACK);
  } else if (option === 10) {
    if (b.contextId !== null) {
      const name = new TextEncoder().encode("base:allocation");
      const p = new Uint8Array(4 + name.length);
      new DataView(p.buffer).setUint32(0, b.contextId ?? 1);
      p.set(name, 4);
      await s.optionReply(10, META_CONTEXT, p);
    }
    await s.optionReply(10, ACK);
  } else if (option === 7 || option === 1) {
    const info = new Uint8Array(12);
    const v = new DataView(info.buffer);
    v.setBigUint64(2, b.size ?? BigInt(b.data!.length));
    v.setUint16(10, b.flags ?? (1 | 4 | 64));
    if (option === 1) {
      await s.write(info.subarray(2));
      return;
    }
    await s.optionReply(7, INFO, info);
    const sizes = b.blockSizes === undefined ? [512, 4096, 32 << 20] : b.blockSizes;
    if (sizes !== null) {
      const bs = new Uint8Array(14);
      const bv = new DataView(bs.buffer);
      bv.setUint16(0, 3);
      sizes.forEach((n, k) => bv.setUint32(2 + 4 * k, n));
      await s.optionReply(7, INFO, bs);
    }
    await s.optionReply(7, ACK);
  } else {
    await s.optionReply(option, ERR_UNSUP);
  }
  void data;
}

async function defaultRequest(s: Session, r: Request, payload: Uint8Array | null) {
  const data = s.data;
  switch (r.command) {
    case 0:
      await s.dataChunk(1, r.cookie, r.offset, data.subarray(r.offset, r.offset + r.length));
      break;
    case 1:
      data.set(payload!, r.offset);
      await s.simple(r.cookie);
      break;
    case 6:
      data.fill(0, r.offset, r.offset + r.length);
      await s.simple(r.cookie);
      break;
    case 7:
      await s.statusChunk(1, r.cookie, s.b.contextId ?? 1, [[r.length, 0]]);
      break;
    default:
      await s.simple(r.cookie);
  }
}

async function serve(s: Session): Promise<void> {
  const b = s.b;
  let greeting = b.greeting;
  if (greeting === undefined) {
    greeting = new Uint8Array(18);
    const v = new DataView(greeting.buffer);
    v.setBigUint64(0, MAGIC_NBD);
    v.setBigUint64(8, IHAVEOPT);
    v.setUint16(16, b.handshakeFlags ?? 3);
  }
  await s.write(greeting);
  await b.afterGreeting?.(s);
  await s.read(4);
  for (;;) {
    const head = new DataView((await s.read(16)).buffer);
    const option = head.getUint32(8);
    const data = await s.read(head.getUint32(12));
    const handled = b.option ? await b.option(s, option, data) : false;
    if (handled === "go") break;
    if (handled) continue;
    await defaultOption(s, option, data);
    if (option === 7 || option === 1) break;
  }
  for (;;) {
    const head = new DataView((await s.read(28)).buffer);
    const r: Request = {
      flags: head.getUint16(4),
      command: head.getUint16(6),
      cookieHi: head.getUint32(8),
      cookie: head.getUint32(12),
      offset: Number(head.getBigUint64(16)),
      length: head.getUint32(24),
    };
    if (r.command === 2) return;
    const payload = r.command === 1 ? await s.read(r.length) : null;
    s.log.push(r);
    if (!(b.request && await b.request(s, r, payload))) await defaultRequest(s, r, payload);
  }
}

/** A 1 MiB pattern that is never zero. */
export function pattern(length = 1 << 20): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 7 + (i >> 9)) % 251 + 1;
  return out;
}

/** Starts the fake server on a socket in `dir` with `behaviour`. */
export function startFakeNbd(dir: string, behaviour: Behaviour = {}): FakeNbd {
  const b: Behaviour = { ...behaviour, data: behaviour.data ?? pattern() };
  const path = `${dir}/fake-${crypto.randomUUID().slice(0, 8)}.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const sessions: Session[] = [];
  const log: Request[] = [];
  const running: Promise<void>[] = [];
  const accepting = (async () => {
    for (;;) {
      let conn: Deno.UnixConn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      const s = new Session(conn, b, log);
      sessions.push(s);
      running.push(serve(s).catch(() => {}).finally(() => s.close()));
    }
  })();
  return {
    uri: `nbd+unix:///disk?socket=${path}`,
    sessions,
    log,
    async stop() {
      listener.close();
      await accepting;
      for (const s of sessions) s.close();
      await Promise.race([Promise.all(running), new Promise((r) => setTimeout(r, 100))]);
    },
  };
}
