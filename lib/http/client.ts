/**
 * The HTTP(S) client: an image stream uploaded with `PUT` and an exact
 * `Content-Length`, or downloaded with `GET` as a byte stream of known length.
 * `node:http`/`node:https` carry the requests: unlike `fetch`, they send a
 * `Content-Length` with a streamed body and can skip certificate checks
 * (`insecure`).
 *
 * What the server says is turned into one line: a non-2xx answer gives its status
 * and the first line of its body; a connection that drops names how many bytes got
 * through; a download that ends short is an error, never a success.
 *
 * @module
 */
import type { ClientRequest, IncomingMessage, RequestOptions } from "node:http";
import { Buffer } from "node:buffer";
import { DiskstreamError, escapeControls, UsageError } from "../errors.ts";
import type { Input } from "../io/stream.ts";
import { describeNetError, incomingBody, progressOf, writeChunk } from "./body.ts";

/** Options of every request. */
export interface HttpClientOptions {
  /** Extra request headers (see {@link parseHeaderLines}). */
  headers?: Record<string, string>;
  /** PEM certificates to trust instead of the system's (`--cacert`). */
  caCerts?: string[];
  /** Skip the server certificate's checks (`--insecure`): for tests only. */
  insecure?: boolean;
  /** Redirects followed at most (default 5). */
  maxRedirects?: number;
  /** Content type of an upload (default `application/octet-stream`). */
  contentType?: string;
  /**
   * Milliseconds without a byte moving (connecting, waiting for the headers, either
   * body) before the transfer fails (default 120 s; 0: no limit). An upload waits for
   * the server's answer after its last byte without a limit: the server may be syncing.
   */
  idleTimeoutMs?: number;
  /** Stops the transfer: what is pending rejects with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Called before a redirect is followed, with both URLs (passwords redacted).
   * A redirect to another origin drops `Authorization`, `Cookie` and the URL's
   * credentials; one from `https:` to `http:` is refused.
   */
  onRedirect?: (from: string, to: string) => void;
}

/**
 * The server answered with a status that is not 2xx, or a redirect we cannot follow.
 *
 * @example
 * ```ts
 * import { httpGet, HttpStatusError } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, () =>
 *   new Response("no such disk\nmore", { status: 404 }));
 * await assert.rejects(httpGet(`http://127.0.0.1:${server.addr.port}/x`), (err) => {
 *   assert.ok(err instanceof HttpStatusError);
 *   assert.equal(err.status, 404);
 *   assert.match(err.message, /: HTTP 404 Not Found: no such disk$/);
 *   return true;
 * });
 * await server.shutdown();
 * ```
 */
export class HttpStatusError extends DiskstreamError {
  /** The HTTP status code. */
  readonly status: number;
  constructor(message: string, status: number, options?: ErrorOptions) {
    super(message, options);
    this.status = status;
  }
}

/**
 * The connection failed or dropped; the message says how many bytes got through.
 *
 * @example
 * ```ts
 * import { httpGet, HttpTransferError } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const port = (listener.addr as Deno.NetAddr).port;
 * listener.close();
 * await assert.rejects(httpGet(`http://127.0.0.1:${port}/`), HttpTransferError);
 * ```
 */
export class HttpTransferError extends DiskstreamError {}

/** Whether `target` names an HTTP(S) URL (rather than a path). */
export function isHttpUrl(target: string): boolean {
  return /^https?:\/\//i.test(target);
}

/**
 * A URL for messages and logs: the password of its user-info is replaced by `***`.
 *
 * @example
 * ```ts
 * import { redactUrl } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(redactUrl("https://root:secret@host/x?a=1"), "https://root:***@host/x?a=1");
 * ```
 */
export function redactUrl(url: string | URL): string {
  const u = new URL(url.toString());
  if (u.password) u.password = "***";
  return u.toString();
}

/**
 * Parses `--header` values (`Name: value`) into a record of headers.
 *
 * @example
 * ```ts
 * import { parseHeaderLines } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(parseHeaderLines(["Cookie: session_id=OpaqueRef:1", "X-A:b"]), {
 *   Cookie: "session_id=OpaqueRef:1",
 *   "X-A": "b",
 * });
 * assert.throws(() => parseHeaderLines(["no colon"]));
 * ```
 */
export function parseHeaderLines(lines: readonly string[]): Record<string, string> {
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const m = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*$/.exec(line);
    if (!m || /[\r\n\0]/.test(m[2])) {
      throw new UsageError(`--header needs 'Name: value', got '${line}'`);
    }
    const lower = m[1].toLowerCase();
    if (["content-length", "transfer-encoding", "host", "expect"].includes(lower)) {
      throw new UsageError(`--header cannot set ${m[1]}: diskstream sets it itself`);
    }
    headers[m[1]] = m[2];
  }
  return headers;
}

/** Bytes of an error body read for its first line. */
const ERROR_BODY_BYTES = 4096;
/** How long an upload waits for `100 Continue` before sending anyway (as curl does). */
const CONTINUE_WAIT_MS = 1000;
/** Default of {@link HttpClientOptions.idleTimeoutMs}. */
const IDLE_TIMEOUT_MS = 120_000;
/** Request headers that carry credentials: never sent to another origin. */
const CREDENTIAL_HEADERS = ["authorization", "cookie", "proxy-authorization"];

interface Started {
  req: ClientRequest;
  response: Promise<IncomingMessage>;
  /** The first error of the request, also one after its answer came (a reset). */
  error(): unknown;
}

async function startRequest(
  url: URL,
  method: string,
  headers: Record<string, string>,
  opts: HttpClientOptions,
): Promise<Started> {
  const https = url.protocol === "https:";
  const mod = https ? await import("node:https") : await import("node:http");
  const auth = url.username || url.password
    ? `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`
    : undefined;
  const options: RequestOptions & { ca?: string[]; rejectUnauthorized?: boolean } = {
    protocol: url.protocol,
    hostname: url.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: url.port || (https ? 443 : 80),
    path: url.pathname + url.search,
    method,
    headers: { "user-agent": "diskstream", ...opts.headers, ...headers },
    auth,
    agent: false,
  };
  if (https) {
    if (opts.caCerts) options.ca = opts.caCerts;
    if (opts.insecure) options.rejectUnauthorized = false;
  }
  const req = mod.request(options);
  const response = new Promise<IncomingMessage>((resolve, reject) => {
    req.once("response", resolve);
    req.once("error", reject);
  });
  response.catch(() => {}); // observed by whoever awaits it
  let error: unknown = null;
  req.on("error", (err) => error ??= err);
  // A stall or a stop fails what is pending: the answer's body as well as the request.
  let answer: IncomingMessage | undefined;
  req.once("response", (res) => answer = res);
  const fail = (err: unknown) => {
    answer?.destroy(err as Error);
    req.destroy(err as Error);
  };
  const idle = opts.idleTimeoutMs ?? IDLE_TIMEOUT_MS;
  if (idle > 0) {
    req.setTimeout(idle, () =>
      fail(Object.assign(
        new Error(`no byte moved for ${idle / 1000} s: the server stalled (or the network)`),
        { code: "EIDLE" },
      )));
  }
  const signal = opts.signal;
  if (signal) {
    const abort = () => fail(signal.reason);
    if (signal.aborted) abort();
    signal.addEventListener("abort", abort, { once: true });
    req.once("close", () => signal.removeEventListener("abort", abort));
  }
  return { req, response, error: () => error };
}

/** The first readable line of an error body (HTML tags dropped), at most 200 chars. */
async function firstBodyLine(res: IncomingMessage): Promise<string> {
  const parts: Uint8Array[] = [];
  let size = 0;
  try {
    for await (const chunk of res) {
      parts.push(chunk as Uint8Array);
      size += (chunk as Uint8Array).length;
      if (size >= ERROR_BODY_BYTES) break;
    }
  } catch {
    // what arrived is enough
  }
  res.destroy();
  const text = new TextDecoder().decode(Buffer.concat(parts).subarray(0, ERROR_BODY_BYTES));
  const line = text.replace(/<[^>]*>/g, "\n").split(/\r?\n/).map((l) => l.trim())
    .find((l) => l.length > 0) ?? "";
  // A binary or hostile body must not drive the terminal the message is printed on.
  return escapeControls(line.length > 200 ? `${line.slice(0, 200)}…` : line);
}

async function statusError(
  method: string,
  url: URL,
  res: IncomingMessage,
): Promise<HttpStatusError> {
  const status = res.statusCode ?? 0;
  const line = await firstBodyLine(res);
  return new HttpStatusError(
    `${method} ${redactUrl(url)}: HTTP ${status} ${escapeControls(res.statusMessage ?? "")}`
      .trimEnd() + (line ? `: ${line}` : ""),
    status,
  );
}

function is2xx(res: IncomingMessage): boolean {
  return (res.statusCode ?? 0) >= 200 && (res.statusCode ?? 0) <= 299;
}

/**
 * A 2xx whose body lasts until the connection closes, sent before the upload's body
 * (XAPI's import_raw_vdi): the upload succeeded only if that body then ends cleanly.
 */
function isProvisional(res: IncomingMessage): boolean {
  return is2xx(res) && res.headers["content-length"] === undefined &&
    res.headers["transfer-encoding"] === undefined;
}

function isRedirect(status: number): boolean {
  return [301, 302, 303, 307, 308].includes(status);
}

/**
 * The next hop of a redirect and the headers to send there: credentials (the URL's
 * user-info, `Authorization`, `Cookie`) go to the same origin only; `https:` never
 * leads to `http:`.
 */
function followRedirect<T extends HttpClientOptions>(
  method: string,
  url: URL,
  res: IncomingMessage,
  opts: T,
): { url: URL; opts: T } {
  const next = redirectTarget(method, url, res);
  if (url.protocol === "https:" && next.protocol === "http:") {
    throw new HttpStatusError(
      `${method} ${redactUrl(url)}: HTTP ${res.statusCode} redirects to ${
        redactUrl(next)
      }, which is not HTTPS: the disk and the credentials would cross the network in clear; ` +
        "give that URL yourself if it is meant",
      res.statusCode ?? 0,
    );
  }
  opts.onRedirect?.(redactUrl(url), redactUrl(next));
  if (next.origin === url.origin) return { url: next, opts };
  const headers = Object.fromEntries(
    Object.entries(opts.headers ?? {}).filter(([name]) =>
      !CREDENTIAL_HEADERS.includes(name.toLowerCase())
    ),
  );
  return { url: next, opts: { ...opts, headers } };
}

function redirectTarget(method: string, url: URL, res: IncomingMessage): URL {
  const location = res.headers.location;
  res.resume();
  if (!location) {
    throw new HttpStatusError(
      `${method} ${redactUrl(url)}: HTTP ${res.statusCode} redirect without a Location`,
      res.statusCode ?? 0,
    );
  }
  const next = new URL(location, url);
  if (next.protocol !== "http:" && next.protocol !== "https:") {
    throw new HttpStatusError(
      `${method} ${redactUrl(url)}: redirected to ${redactUrl(next)}, which is not HTTP(S)`,
      res.statusCode ?? 0,
    );
  }
  // Credentials of the user-info go to the same origin only.
  if (next.origin !== url.origin) {
    next.username = "";
    next.password = "";
  } else if (!next.username && url.username) {
    next.username = url.username;
    next.password = url.password;
  }
  return next;
}

function tooManyRedirects(method: string, url: URL, max: number): HttpStatusError {
  return new HttpStatusError(
    `${method} ${redactUrl(url)}: more than ${max} redirects; give the final URL`,
    0,
  );
}

/** What {@link httpGet} returns: the body as a stream, and what the headers said. */
export interface HttpDownload extends Input {
  /** The final URL (after redirects), password redacted. */
  readonly url: string;
  /** `Content-Length`, when the server sent one. */
  readonly length?: number;
  /** `Content-Type`, when the server sent one. */
  readonly contentType?: string;
}

/**
 * Downloads `url` with `GET`, following redirects. Resolves once a 2xx answer has
 * arrived; the body is then read from the returned stream, which fails (naming the
 * bytes received) when the connection drops or the body ends before its
 * `Content-Length`.
 *
 * @example
 * ```ts
 * import { httpGet } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, () =>
 *   new Response("hello", { headers: { "content-type": "application/vhd" } }));
 * const download = await httpGet(`http://127.0.0.1:${server.addr.port}/disk`);
 * assert.equal(download.length, 5);
 * assert.equal(download.contentType, "application/vhd");
 * assert.equal(await new Response(download.stream).text(), "hello");
 * await server.shutdown();
 * ```
 */
export async function httpGet(url: string, opts: HttpClientOptions = {}): Promise<HttpDownload> {
  let u = new URL(url);
  const max = opts.maxRedirects ?? 5;
  const signal = opts.signal;
  for (let hop = 0;; hop++) {
    const { req, response, error } = await startRequest(u, "GET", {}, opts);
    req.end();
    let res: IncomingMessage;
    try {
      res = await response;
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw new HttpTransferError(`GET ${redactUrl(u)}: ${describeNetError(err)}`, { cause: err });
    }
    const status = res.statusCode ?? 0;
    if (isRedirect(status)) {
      if (hop >= max) throw tooManyRedirects("GET", u, max);
      ({ url: u, opts } = followRedirect("GET", u, res, opts));
      continue;
    }
    if (status < 200 || status > 299) throw await statusError("GET", u, res);
    if (status === 204 || status === 205) {
      res.destroy();
      throw new HttpStatusError(
        `GET ${redactUrl(u)}: HTTP ${status} ${
          escapeControls(res.statusMessage ?? "")
        }: the answer holds no body, so no image`,
        status,
      );
    }
    const lengthHeader = res.headers["content-length"];
    const length = lengthHeader !== undefined && /^\d{1,16}$/.test(lengthHeader)
      ? Number(lengthHeader)
      : undefined;
    const name = redactUrl(u);
    return {
      name,
      url: name,
      length: Number.isSafeInteger(length) ? length : undefined,
      contentType: res.headers["content-type"],
      stream: incomingBody(
        res,
        length,
        (done, why, cause) =>
          signal?.aborted ? signal.reason : new HttpTransferError(
            `the download from ${name} broke after ${progressOf(done, length)}: ${
              error() ? describeNetError(error()) : why
            }`,
            { cause: error() ?? cause },
          ),
      ),
    };
  }
}

/** Options of {@link httpPut}. */
export interface HttpPutOptions extends HttpClientOptions {
  /** Called with the bytes sent so far, after each chunk. */
  onProgress?: (sent: number) => void;
}

/**
 * Uploads `stream` to `url` with `PUT` and `Content-Length: length`; `stream` must
 * hold exactly `length` bytes. Each chunk has gone to the socket before the next is
 * read, so the stream may recycle its buffers (export's `reuseBuffers`). The request asks for `100 Continue` first, so a
 * 307/308 redirect that comes before the body is followed with the same method and
 * body; a redirect once the body has started cannot be (the stream is not
 * replayable) and says so. Resolves when the server has answered 2xx.
 *
 * @example
 * ```ts
 * import { httpPut } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * let got = "";
 * const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
 *   got = `${req.headers.get("content-length")} ${await req.text()}`;
 *   return new Response(null, { status: 201 });
 * });
 * await httpPut(`http://127.0.0.1:${server.addr.port}/up`, ReadableStream.from([
 *   new TextEncoder().encode("hello"),
 * ]), 5);
 * assert.equal(got, "5 hello");
 * await server.shutdown();
 * ```
 */
export async function httpPut(
  url: string,
  stream: ReadableStream<Uint8Array>,
  length: number,
  opts: HttpPutOptions = {},
): Promise<void> {
  let u = new URL(url);
  const max = opts.maxRedirects ?? 5;
  const headers = {
    "content-length": String(length),
    "content-type": opts.contentType ?? "application/octet-stream",
    expect: "100-continue",
  };
  const reader = stream.getReader();
  let carry: Uint8Array | null = null; // a chunk read but not sent when the server answered
  try {
    for (let hop = 0;; hop++) {
      const started = await startRequest(u, "PUT", headers, opts);
      const { req, response } = started;
      req.flushHeaders();
      let timer: ReturnType<typeof setTimeout> | undefined;
      let answer = await Promise.race([
        new Promise<"go">((resolve) => {
          req.once("continue", () => resolve("go"));
          timer = setTimeout(() => resolve("go"), CONTINUE_WAIT_MS);
        }),
        response,
      ]).catch((err) => {
        throw new HttpTransferError(`PUT ${redactUrl(u)}: ${describeNetError(err)}`, {
          cause: err,
        });
      }).finally(() => clearTimeout(timer));
      // XAPI answers 200 at once, then reads the body until the connection closes.
      if (answer === "go" || isProvisional(answer)) {
        const sent = await sendBody(started, u, reader, carry, length, opts);
        if (sent.done) return;
        answer = sent.answer;
        carry = sent.carry;
      }
      // The server answered before any byte of the body was sent: the body is whole.
      req.destroy();
      const status = answer.statusCode ?? 0;
      if (status === 307 || status === 308) {
        if (hop >= max) throw tooManyRedirects("PUT", u, max);
        ({ url: u, opts } = followRedirect("PUT", u, answer, opts));
        continue;
      }
      if (isRedirect(status)) {
        throw new HttpStatusError(
          `PUT ${redactUrl(u)}: HTTP ${status} redirects to ${
            escapeControls(answer.headers.location ?? "nowhere")
          }, which would turn the upload into a GET; upload to the new URL directly`,
          status,
        );
      }
      if (is2xx(answer) && length > 0) {
        answer.destroy();
        throw new HttpStatusError(
          `PUT ${redactUrl(u)}: HTTP ${status} ${
            escapeControls(answer.statusMessage ?? "")
          } before any byte of the upload was sent: nothing was uploaded`,
          status,
        );
      }
      if (is2xx(answer)) return void answer.resume();
      throw await statusError("PUT", u, answer);
    }
  } catch (err) {
    await reader.cancel().catch(() => {});
    if (opts.signal?.aborted) throw opts.signal.reason;
    throw err;
  }
}

/** How {@link sendBody} ended: the upload was answered 2xx, or answered before it began. */
type SendResult =
  | { done: true }
  | { done: false; answer: IncomingMessage; carry: Uint8Array | null };

async function sendBody(
  { req, response, error }: Started,
  u: URL,
  reader: ReadableStreamDefaultReader<Uint8Array>,
  carry: Uint8Array | null,
  length: number,
  opts: HttpPutOptions,
): Promise<SendResult> {
  let sent = 0;
  let failure: unknown = null;
  let early: IncomingMessage | null = null; // an answer before the end of the body
  let provisional = false; // … that is XAPI's 200 (see isProvisional)
  let sending = true;
  response.then((res) => {
    if (sending && isProvisional(res)) provisional = true;
    else if (sending) early = res;
  }, (err) => failure = err);
  const reply = async (): Promise<never> => {
    const res = early ?? await response.catch(() => null);
    if (res && isRedirect(res.statusCode ?? 0)) {
      res.resume();
      throw new HttpStatusError(
        `PUT ${redactUrl(u)}: HTTP ${res.statusCode} redirects to ${
          escapeControls(res.headers.location ?? "nowhere")
        } after ${progressOf(sent, length)} of the upload were sent; the export stream ` +
          `cannot be replayed: run again with that URL`,
        res.statusCode ?? 0,
      );
    }
    if (res && (res.statusCode ?? 0) >= 300) throw await statusError("PUT", u, res);
    if (res && early === res && !failure) {
      res.destroy();
      throw new HttpTransferError(
        `the upload to ${redactUrl(u)} was answered ${res.statusCode} after only ${
          progressOf(sent, length)
        }: the server did not wait for the whole image; it cannot be known complete`,
      );
    }
    throw new HttpTransferError(
      `the upload to ${redactUrl(u)} broke after ${progressOf(sent, length)}: ${
        describeNetError(failure ?? { code: "ECONNRESET" })
      }`,
      { cause: failure },
    );
  };
  try {
    for (;;) {
      let value = carry;
      carry = null;
      if (value === null) {
        const step = await reader.read();
        if (step.done) break;
        value = step.value;
      }
      if (early && sent === 0) return { done: false, answer: early, carry: value };
      if (failure || early) await reply();
      if (sent + value.length > length) {
        throw new DiskstreamError(
          `the stream for ${redactUrl(u)} is longer than the ${length} bytes announced`,
        );
      }
      sent += value.length;
      if (!await writeChunk(req, value)) await reply();
      opts.onProgress?.(sent);
    }
    if (sent !== length) {
      throw new DiskstreamError(
        `the stream for ${redactUrl(u)} ended after ${sent} of the ${length} bytes announced`,
      );
    }
    sending = false;
    req.end();
    // The body is out: the server may take long (a sync) before it answers.
    req.setTimeout(0);
    let res: IncomingMessage;
    try {
      res = await response;
    } catch {
      return await reply();
    }
    if (!is2xx(res)) {
      if (sent === 0) return { done: false, answer: res, carry: null };
      return await reply();
    }
    // XAPI's 200 came before the body: the upload went well if the server then
    // closes the connection cleanly (the end of that answer), not if it breaks it.
    const complete = new Promise<boolean>((resolve) => {
      let ended = false;
      res.once("end", () => ended = true);
      res.once("close", () => resolve(ended));
    });
    res.resume();
    if (provisional && (!await complete || error())) {
      failure ??= error();
      return await reply();
    }
    return { done: true };
  } catch (err) {
    req.destroy();
    throw err;
  }
}

/** What {@link httpPut} and {@link httpGet} need from a command line's flags. */
export interface HttpFlags {
  header?: string[];
  cacert?: string;
  insecure?: boolean;
}

/** Client options from `--header`, `--cacert FILE` and `--insecure`. */
export async function clientOptionsFrom(flags: HttpFlags): Promise<HttpClientOptions> {
  const opts: HttpClientOptions = { headers: parseHeaderLines(flags.header ?? []) };
  if (flags.cacert !== undefined) {
    let pem: string;
    try {
      pem = await Deno.readTextFile(flags.cacert);
    } catch (err) {
      throw new UsageError(`--cacert ${flags.cacert}: ${(err as Error).message}`);
    }
    if (!pem.includes("-----BEGIN CERTIFICATE-----")) {
      throw new UsageError(`--cacert ${flags.cacert} holds no PEM certificate`);
    }
    opts.caCerts = [pem];
  }
  opts.insecure = flags.insecure;
  return opts;
}
