/**
 * `diskstream server`: XAPI's two disk endpoints for hosts without XAPI.
 *
 * - `GET /export_raw_vdi?vdi=NAME&format=F[&base=NAME]` streams the disk as an image
 *   (exact `Content-Length`, XAPI's content types); `HEAD` answers the length.
 * - `PUT /import_raw_vdi?vdi=NAME&format=F` imports the body into the disk and
 *   answers once the data is synced.
 * - `GET /disks` lists the names, sizes and states as JSON.
 *
 * Only the disks named at start are reachable (a request names a disk, never a
 * path). A token (`Authorization: Bearer T`, or T as the basic-auth password) is
 * compared in constant time. One writer per disk and no reader while it writes
 * (409); at most `maxStreams` streams at once (503). Header and idle timeouts close
 * slow connections. One access-log line per request.
 *
 * The formats are the rows of {@link SERVER_FORMATS}: a format that export and
 * import know plugs in there, with its content type from `content_type.ts`.
 *
 * @module
 */
import type { IncomingMessage, Server, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { Buffer } from "node:buffer";
import { createHash, timingSafeEqual } from "node:crypto";
import {
  CorruptImageError,
  DiskstreamError,
  escapeControls,
  LimitError,
  UnsupportedError,
  UsageError,
} from "../errors.ts";
import { openDiskSource } from "../io/disk_source.ts";
import { contentTypeOf } from "../http/content_type.ts";
import { incomingBody, progressOf, writeChunk } from "../http/body.ts";

/** An export the server can stream: its bytes and their exact number. */
export interface ServedExport {
  stream: ReadableStream<Uint8Array>;
  length: number;
}

/** What an import into a disk did. */
export interface ServedImport {
  virtualSize: number;
  dataBytes: number;
}

/** How the server exports and imports one wire format. */
export interface ServerFormat {
  /**
   * The disk at `path` (optionally as a diff against `base`) as this format. Its
   * chunks may be recycled: each is valid until the next is read.
   */
  export(path: string, base?: string): Promise<ServedExport>;
  /** Writes the image in `body` into the disk at `path` of `size` bytes, synced. */
  import(body: ReadableStream<Uint8Array>, path: string, size: number): Promise<ServedImport>;
}

/** Chunk size of the server's exports: small, so that many streams stay small. */
const SERVER_CHUNK = 1024 * 1024;

/**
 * The formats of `format=`, by name: the one place a new wire format plugs in.
 *
 * @example
 * ```ts
 * import { SERVER_FORMATS } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.ok("qcow2" in SERVER_FORMATS && "vhd" in SERVER_FORMATS);
 * ```
 */
export const SERVER_FORMATS: Record<string, ServerFormat> = {
  qcow2: {
    export: async (path, base) =>
      served(await (await import("../export/export.ts")).exportQcow2(path, exportOptions(base))),
    import: (body, path, size) => importImageAs("qcow2", body, path, size),
  },
  vhd: {
    export: async (path, base) =>
      served(await (await import("../export/vhd.ts")).exportVhd(path, exportOptions(base))),
    import: (body, path, size) => importImageAs("vhd", body, path, size),
  },
  raw: {
    export: async (path, base) =>
      served(await (await import("../export/wire.ts")).exportRaw(path, exportOptions(base))),
    import: async (body, path, size) =>
      await (await import("../import/wire.ts")).importRaw(body, path, { size }),
  },
  chunked: {
    export: async (path, base) =>
      served(await (await import("../export/wire.ts")).exportChunked(path, exportOptions(base))),
    import: async (body, path, size) =>
      await (await import("../import/wire.ts")).importChunked(body, path, { size }),
  },
  tar: {
    export: async (path, base) =>
      served(await (await import("../export/wire.ts")).exportTar(path, exportOptions(base))),
    import: async (body, path, size) =>
      await (await import("../import/wire.ts")).importTar(body, path, { size }),
  },
};

/** The options of the server's exports: recycled chunks of {@link SERVER_CHUNK}. */
function exportOptions(base: string | undefined) {
  return { base, reuseBuffers: true, chunkSize: SERVER_CHUNK };
}

function served(e: { stream: ReadableStream<Uint8Array>; layout: { fileSize: number } }) {
  return { stream: e.stream, length: e.layout.fileSize };
}

async function importImageAs(
  format: "qcow2" | "vhd",
  body: ReadableStream<Uint8Array>,
  path: string,
  size: number,
): Promise<ServedImport> {
  const { importImage } = await import("../import/import.ts");
  return await importImage(body, path, { format, size });
}

/** Options of {@link startDiskServer}. */
export interface DiskServerOptions {
  /** Address to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** Port (default 8080; 0 picks a free one). */
  port?: number;
  /** The disks served: name → path of a raw file or block device. */
  disks: Record<string, string>;
  /** Refuse imports. */
  readOnly?: boolean;
  /** The token clients must present; required unless the address is loopback. */
  token?: string;
  /** TLS certificate chain and key (PEM): serve HTTPS. */
  tls?: { cert: string; key: string };
  /** Streams (exports and imports) at once; more are answered 503 (default 8). */
  maxStreams?: number;
  /**
   * Connections at once (default 256, or twice `maxStreams` when more); more are
   * closed at once, so that idle or slow clients cannot hold memory without bound.
   */
  maxConnections?: number;
  /** Milliseconds a client has to send a request's headers (default 30 s). */
  headerTimeoutMs?: number;
  /** Milliseconds without any byte moving before a connection is closed (default 120 s). */
  idleTimeoutMs?: number;
  /** Where access-log and event lines go (default: stderr). */
  log?: (line: string) => void;
}

/** A running {@link startDiskServer}. */
export interface DiskServer {
  /** The base URL, e.g. `http://127.0.0.1:8080`. */
  readonly url: string;
  /** The port listened on. */
  readonly port: number;
  /**
   * Stops accepting, lets running streams finish for `graceMs`, then aborts them
   * and closes every connection.
   */
  close(graceMs?: number): Promise<void>;
}

/** True for an address that only this machine reaches. */
export function isLoopback(hostname: string): boolean {
  const h = hostname.replace(/^\[(.*)\]$/, "$1").toLowerCase();
  return h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h) ||
    /^::ffff:127\./.test(h);
}

const DISK_NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

/** Checks a disk name given at start (`--disk NAME=PATH`). */
export function checkDiskName(name: string): string {
  if (!DISK_NAME.test(name)) {
    throw new UsageError(
      `disk name '${name}' must be 1-128 letters, digits, '.', '_', ':' or '-' (not starting with a symbol)`,
    );
  }
  return name;
}

/** What the server knows of one disk. */
interface DiskState {
  path: string;
  readers: number;
  writer: boolean;
  /** "ready", or what the last import left ("import failed: …"). */
  state: string;
}

/** A request's answer and what the access log says about it. */
class Reply extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

/**
 * Starts the disk server. Resolves once it listens. Refuses a non-loopback address
 * without a token.
 *
 * @example
 * ```ts
 * import { startDiskServer } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/a.raw`, new Uint8Array(1 << 20));
 * const server = await startDiskServer({
 *   port: 0,
 *   disks: { a: `${dir}/a.raw` },
 *   log: () => {},
 * });
 * const res = await fetch(`${server.url}/disks`);
 * assert.deepEqual(await res.json(), [{ name: "a", size: 1 << 20, state: "ready" }]);
 * await server.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function startDiskServer(options: DiskServerOptions): Promise<DiskServer> {
  const hostname = options.hostname ?? "127.0.0.1";
  if (!options.token && !isLoopback(hostname)) {
    throw new UsageError(
      `refusing to serve disks on ${hostname} without a token: give --token-file FILE, ` +
        `or listen on 127.0.0.1`,
    );
  }
  const disks = new Map<string, DiskState>();
  for (const [name, path] of Object.entries(options.disks)) {
    disks.set(checkDiskName(name), { path, readers: 0, writer: false, state: "ready" });
  }
  if (disks.size === 0) throw new UsageError("no disk to serve: give --disk NAME=PATH");
  const log = options.log ?? ((line: string) => console.error(line));
  const maxStreams = options.maxStreams ?? 8;
  const headerTimeout = options.headerTimeoutMs ?? 30_000;
  const idleTimeout = options.idleTimeoutMs ?? 120_000;
  const tokenDigest = options.token ? digest(options.token) : null;

  let streams = 0;
  const running = new Set<() => void>(); // aborts of the running streams
  const sockets = new Set<Socket>();
  const ctx: Context = {
    disks,
    log,
    readOnly: options.readOnly ?? false,
    authorized: (req) => tokenDigest === null || tokenMatches(req, tokenDigest),
    acquireStream() {
      if (streams >= maxStreams) {
        throw new Reply(503, `the server runs ${maxStreams} streams already: try again later`, {
          "retry-after": "5",
        });
      }
      streams++;
      let released = false;
      return () => {
        if (!released) released = true, streams--;
      };
    },
    running,
    idleTimeout,
  };

  const handler = (req: IncomingMessage, res: ServerResponse) => {
    const socket = req.socket as Socket & { headerTimer?: ReturnType<typeof setTimeout> };
    clearTimeout(socket.headerTimer);
    res.once("finish", () => armHeaderTimer(socket));
    handle(ctx, req, res);
  };
  const armHeaderTimer = (socket: Socket & { headerTimer?: ReturnType<typeof setTimeout> }) => {
    clearTimeout(socket.headerTimer);
    socket.headerTimer = setTimeout(() => socket.destroy(), headerTimeout);
  };
  const server: Server = options.tls
    ? (await import("node:https")).createServer(
      // A TLS handshake is bounded like the request headers that follow it.
      { cert: options.tls.cert, key: options.tls.key, handshakeTimeout: headerTimeout },
      handler,
    )
    : (await import("node:http")).createServer(handler);
  server.maxConnections = options.maxConnections ?? Math.max(256, 2 * maxStreams);
  // A client that asks before sending a body (`Expect: 100-continue`, as curl does for
  // uploads) is answered "100 Continue" only once the import accepts the request: a
  // refusal known from the headers (401, 404, 409, 413, 503…) goes out at once and the
  // body is never sent, so the client always reads the answer.
  server.on("checkContinue", (req: IncomingMessage, res: ServerResponse) => {
    (req as IncomingMessage & { [CONTINUE]?: () => void })[CONTINUE] = () => res.writeContinue();
    handler(req, res);
  });
  server.on(options.tls ? "secureConnection" : "connection", (socket: Socket) => {
    sockets.add(socket);
    armHeaderTimer(socket);
    socket.setTimeout(idleTimeout);
    socket.on("timeout", () => socket.destroy());
    socket.once("close", () => {
      sockets.delete(socket);
      clearTimeout((socket as { headerTimer?: ReturnType<typeof setTimeout> }).headerTimer);
    });
  });
  server.on("clientError", (err: Error & { code?: string }, socket: Socket) => {
    // A request that is not HTTP (an unknown method, a bad Content-Length, headers too
    // large, a broken chunked body…) gets a short answer when the socket still takes one.
    if (socket.writable && !(socket as { busy?: boolean }).busy) {
      const [status, text] = err.code === "HPE_HEADER_OVERFLOW"
        ? ["431 Request Header Fields Too Large", "the request's headers are too large"]
        : ["400 Bad Request", "the request is not valid HTTP/1.1"];
      socket.end(
        `HTTP/1.1 ${status}\r\ncontent-type: text/plain; charset=utf-8\r\n` +
          `content-length: ${text.length + 1}\r\nconnection: close\r\n\r\n${text}\n`,
      );
      socket.once("finish", () => socket.destroy());
    } else {
      socket.destroy();
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err: Error & { code?: string }) =>
      reject(
        new DiskstreamError(
          `cannot listen on ${hostname}:${options.port ?? 8080}: ${
            err.code === "EADDRINUSE" ? "the address is in use" : err.message
          }`,
        ),
      ));
    server.listen(options.port ?? 8080, hostname, () => resolve());
  });
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : (options.port ?? 8080);
  const host = hostname.includes(":") ? `[${hostname}]` : hostname;
  const url = `${options.tls ? "https" : "http"}://${host}:${port}`;
  let closing: Promise<void> | null = null;
  return {
    url,
    port,
    close(graceMs = 0) {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        for (const s of sockets) {
          if (!(s as { busy?: boolean }).busy) s.destroy();
        }
        const deadline = Date.now() + graceMs;
        while (streams > 0 && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, Math.min(100, deadline - Date.now())));
        }
        if (streams > 0) {
          log(`${stamp()} stopping: aborting ${streams} running stream(s) after the grace period`);
        }
        for (const abort of running) abort();
        for (const s of sockets) s.destroy();
        await closed;
      })();
      return closing;
    },
  };
}

interface Context {
  disks: Map<string, DiskState>;
  log: (line: string) => void;
  readOnly: boolean;
  authorized(req: IncomingMessage): boolean;
  acquireStream(): () => void;
  running: Set<() => void>;
  idleTimeout: number;
}

/**
 * Runs `work` (planning an export, syncing an import) with the idle timeout off:
 * no byte moves meanwhile, and the client is waiting for us, not stalled.
 */
async function busy<T>(ctx: Context, socket: Socket, work: () => Promise<T>): Promise<T> {
  socket.setTimeout(0);
  try {
    return await work();
  } finally {
    if (!socket.destroyed) socket.setTimeout(ctx.idleTimeout);
  }
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s).digest();
}

/** `Authorization: Bearer T` or basic auth with password T, compared in constant time. */
function tokenMatches(req: IncomingMessage, expected: Buffer): boolean {
  const auth = req.headers.authorization ?? "";
  let given: string | null = null;
  const bearer = /^Bearer\s+(.+)$/i.exec(auth);
  const basic = /^Basic\s+([A-Za-z0-9+/=]+)$/i.exec(auth);
  if (bearer) given = bearer[1].trim();
  else if (basic) {
    const pair = Buffer.from(basic[1], "base64").toString("utf8");
    const colon = pair.indexOf(":");
    if (colon >= 0) given = pair.slice(colon + 1);
  }
  return given !== null && timingSafeEqual(digest(given), expected);
}

function stamp(): string {
  return new Date().toISOString();
}

/** The request's path and query for the log, with secrets (session_id, token) hidden. */
function logTarget(url: URL): string {
  for (const key of [...url.searchParams.keys()]) {
    if (/session|token|password|secret/i.test(key)) url.searchParams.set(key, "***");
  }
  return url.pathname + url.search;
}

async function handle(ctx: Context, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const started = performance.now();
  const socket = req.socket as Socket & { busy?: boolean };
  socket.busy = true;
  const remote = socket.remoteAddress ?? "-";
  const peer = `${remote}:${socket.remotePort ?? "-"}`;
  // A request target that is no URL (`GET http://[/`) is answered 400, never thrown.
  const target = URL.parse(req.url ?? "/", "http://server");
  const url = target ?? new URL("http://server/");
  let sent = 0;
  let note = "";
  const answer = (status: number, body: string, headers: Record<string, string> = {}) => {
    const bytes = Buffer.from(body);
    res.writeHead(status, {
      "content-type": "text/plain; charset=utf-8",
      "content-length": String(bytes.length),
      ...headers,
    });
    if (req.method !== "HEAD") sent = bytes.length;
    res.end(req.method === "HEAD" ? undefined : bytes);
  };
  try {
    if (target === null) throw new Reply(400, "the request's target is not a valid path");
    if (!ctx.authorized(req)) {
      throw new Reply(401, "a valid token is needed (Authorization: Bearer TOKEN)", {
        "www-authenticate": 'Bearer realm="diskstream", Basic realm="diskstream"',
      });
    }
    const route = url.pathname;
    if (route === "/disks") {
      allow(req, ["GET", "HEAD"]);
      const list = await Promise.all(
        [...ctx.disks].map(async ([name, d]) => ({
          name,
          size: await diskSize(d.path),
          state: d.writer ? "importing" : d.state,
        })),
      );
      answer(200, JSON.stringify(list) + "\n", { "content-type": "application/json" });
    } else if (route === "/export_raw_vdi") {
      allow(req, ["GET", "HEAD"]);
      const r = await serveExport(ctx, req, res, url);
      sent = r.sent;
      note = r.note;
    } else if (route === "/import_raw_vdi") {
      allow(req, ["PUT"]);
      const r = await serveImport(ctx, req, res, url, peer);
      sent = r.sent;
      note = r.note;
    } else {
      throw new Reply(
        404,
        `no such endpoint ${route}: use /export_raw_vdi, /import_raw_vdi or /disks`,
      );
    }
  } catch (err) {
    const reply = err instanceof Reply ? err : failureReply(err);
    note ||= reply.message;
    if (!res.headersSent && !res.destroyed) {
      // A body the client is still sending is not wanted: answer, close, and read
      // (discard) what is on its way for a moment, so that closing with unread data
      // does not reset the connection before the client has read the answer.
      const unread = req.method === "PUT" && !req.readableEnded;
      answer(reply.status, reply.message + "\n", {
        ...reply.headers,
        ...(unread ? { connection: "close" } : {}),
      });
      if (unread) lingerThenClose(req);
    } else if (!res.writableEnded) {
      res.destroy();
    }
  } finally {
    socket.busy = false;
    const ms = Math.round(performance.now() - started);
    const status = res.headersSent ? res.statusCode : 0;
    // One line whatever the request held (`vdi=a%0Afake`): control characters escaped.
    ctx.log(
      escapeControls(
        `${stamp()} ${remote} "${req.method} ${target ? logTarget(url) : "(invalid target)"}" ` +
          `${status} ${sent} ${ms}ms${note ? ` ${note}` : ""}`,
      ),
    );
  }
}

/** Where a request that waits for "100 Continue" keeps the call that sends it. */
const CONTINUE = Symbol("continue");

/** How long an unwanted request body is read and discarded before the socket closes. */
const LINGER_MS = 2000;

function lingerThenClose(req: IncomingMessage): void {
  const timer = setTimeout(() => req.socket.destroy(), LINGER_MS);
  req.once("end", () => clearTimeout(timer));
  req.once("close", () => clearTimeout(timer));
  req.resume();
}

function allow(req: IncomingMessage, methods: string[]): void {
  if (!methods.includes(req.method ?? "")) {
    throw new Reply(405, `${req.method} is not allowed here: use ${methods.join(" or ")}`, {
      allow: methods.join(", "),
    });
  }
}

/** A failure turned into an answer: the user's or image's fault 4xx, ours 500. */
function failureReply(err: unknown): Reply {
  if (err instanceof UsageError || err instanceof CorruptImageError) {
    return new Reply(400, err.message);
  }
  if (err instanceof UnsupportedError) return new Reply(415, err.message);
  if (err instanceof LimitError) return new Reply(413, err.message);
  if (err instanceof DiskstreamError) return new Reply(500, err.message);
  return new Reply(500, `internal error: ${err instanceof Error ? err.message : String(err)}`);
}

async function diskSize(path: string): Promise<number> {
  const src = await openDiskSource(path);
  try {
    return src.size;
  } finally {
    src.close();
  }
}

function diskOf(ctx: Context, url: URL, key = "vdi"): [string, DiskState] {
  const name = url.searchParams.get(key);
  if (!name) throw new Reply(400, `the query needs ${key}=NAME (see GET /disks)`);
  const disk = ctx.disks.get(name);
  if (!disk) throw new Reply(404, `no disk named '${name}' here (see GET /disks)`);
  return [name, disk];
}

function formatOf(url: URL): [string, ServerFormat] {
  let name = url.searchParams.get("format") ?? "raw";
  // XAPI's import_raw_vdi: format=raw&chunked=true is vhd-tool's chunked protocol.
  if (name === "raw" && url.searchParams.get("chunked") === "true") name = "chunked";
  const format = Object.hasOwn(SERVER_FORMATS, name) ? SERVER_FORMATS[name] : undefined;
  if (!format) {
    throw new Reply(
      400,
      `format '${name}' is not served here: use format=${Object.keys(SERVER_FORMATS).join("|")}`,
    );
  }
  return [name, format];
}

async function serveExport(
  ctx: Context,
  req: IncomingMessage,
  res: ServerResponse,
  url: URL,
): Promise<{ sent: number; note: string }> {
  const [name, disk] = diskOf(ctx, url);
  const [formatName, format] = formatOf(url);
  const baseName = url.searchParams.get("base");
  const base = baseName === null ? undefined : diskOf(ctx, url, "base");
  for (const [n, d] of base ? [[name, disk], base] as const : [[name, disk]] as const) {
    if (d.writer) throw new Reply(409, `disk '${n}' is being imported: try again when it is done`);
  }
  const release = ctx.acquireStream();
  disk.readers++;
  if (base) base[1].readers++;
  let sent = 0;
  let exported: ServedExport | null = null;
  let stopped = false;
  const abort = () => {
    stopped = true;
    exported?.stream.cancel().catch(() => {});
    res.destroy();
  };
  const cut = () =>
    `${stopped ? "aborted by the server's stop" : "the client went away"} after ${
      progressOf(sent, exported!.length)
    }`;
  ctx.running.add(abort);
  try {
    exported = await busy(ctx, req.socket, () => format.export(disk.path, base?.[1].path));
    res.writeHead(200, {
      "content-type": contentTypeOf(formatName),
      "content-length": String(exported.length),
      "content-disposition": `attachment; filename="${name}.${formatName}"`,
    });
    if (req.method === "HEAD") {
      await exported.stream.cancel();
      res.end();
      return { sent, note: "" };
    }
    const gone = new Promise<"gone">((resolve) => res.once("close", () => resolve("gone")));
    const reader = exported.stream.getReader();
    try {
      for (;;) {
        const step = await Promise.race([reader.read(), gone]);
        if (step === "gone" || res.destroyed) {
          return { sent, note: cut() };
        }
        if (step.done) break;
        sent += step.value.length;
        if (!await writeChunk(res, step.value)) return { sent, note: cut() };
      }
      await new Promise<void>((resolve) => res.end(resolve));
      return { sent, note: "" };
    } finally {
      await reader.cancel().catch(() => {});
    }
  } finally {
    ctx.running.delete(abort);
    disk.readers--;
    if (base) base[1].readers--;
    release();
  }
}

async function serveImport(
  ctx: Context,
  req: IncomingMessage,
  res: ServerResponse,
  url: URL,
  peer: string,
): Promise<{ sent: number; note: string }> {
  if (ctx.readOnly) throw new Reply(403, "the server is read-only (--read-only): no imports");
  const [name, disk] = diskOf(ctx, url);
  const [formatName, format] = formatOf(url);
  if (disk.writer || disk.readers > 0) {
    throw new Reply(
      409,
      `disk '${name}' is ${
        disk.writer ? "being imported" : "being exported"
      }: one writer at a time, ` +
        `and none while it is read`,
    );
  }
  const size = await diskSize(disk.path);
  const lengthHeader = req.headers["content-length"];
  // Any number of digits: a length past 2^53 is still compared (and refused) as such.
  const length = lengthHeader !== undefined && /^\d+$/.test(lengthHeader)
    ? Number(lengthHeader)
    : undefined;
  if (formatName === "raw" && length !== undefined && length > size) {
    throw new Reply(
      413,
      `the body holds ${length} bytes but disk '${name}' has ${size}: nothing was written`,
    );
  }
  const release = ctx.acquireStream();
  (req as IncomingMessage & { [CONTINUE]?: () => void })[CONTINUE]?.();
  disk.writer = true;
  const stateBefore = disk.state;
  disk.state = "importing";
  const body = incomingBody(req, length, (got, why, cause) => {
    return new DiskstreamError(
      `the upload from ${peer} broke after ${progressOf(got, length)}: ${
        why.replace("the server closed", "the client closed")
      }`,
      { cause },
    );
  }, () => {}); // a cancelled body is left for the answer (which discards the rest)
  const abort = () => req.destroy();
  ctx.running.add(abort);
  try {
    // Once the whole body is in, the import's final writes and sync may take long.
    req.once("end", () => req.socket.setTimeout(0));
    const result = await format.import(body, disk.path, size);
    if (!req.socket.destroyed) req.socket.setTimeout(ctx.idleTimeout);
    disk.state = "ready";
    const text = JSON.stringify({
      vdi: name,
      format: formatName,
      virtual_size: result.virtualSize,
      data_bytes: result.dataBytes,
    });
    res.writeHead(200, { "content-type": "application/json", "content-length": text.length + 1 });
    res.end(text + "\n");
    return { sent: text.length + 1, note: "" }; // ASCII: names and formats are checked
  } catch (err) {
    // Clients know the disk by its name, not by its path on this host.
    const why = (err instanceof Error ? err.message : String(err)).replaceAll(
      disk.path,
      `disk '${name}'`,
    );
    // Refused (or failed) before its first write: the disk is as it was, not incomplete.
    const untouched = err instanceof DiskstreamError && err.nothingWritten === true;
    disk.state = untouched ? stateBefore : `import failed: ${why}`;
    const text = untouched
      ? `import of '${name}' failed, the disk is unchanged: ${why}`
      : `import of '${name}' failed, the disk is incomplete: ${why}`;
    // The client went away (not: its body ended, which also destroys `req`).
    if (res.destroyed || req.socket.destroyed || req.readableAborted) {
      throw new Reply(499, text);
    }
    throw new Reply(failureReply(err).status, text);
  } finally {
    ctx.running.delete(abort);
    disk.writer = false;
    release();
  }
}
