/**
 * What the client and the server share about a message body: a body that arrives
 * as a Web stream which fails when it breaks or ends short, and one-line
 * descriptions of network failures.
 *
 * @module
 */
import type { IncomingMessage } from "node:http";
import type { Writable } from "node:stream";
import { type DiskstreamError, escapeControls } from "../errors.ts";
import { formatBytes } from "../size.ts";

/** Makes the error of a body that broke after `received` bytes. */
export type BrokenBody = (received: number, why: string, cause?: unknown) => DiskstreamError;

export /** One line for a failed connection: what happened and what to do. */
function describeNetError(err: unknown): string {
  const e = err as { code?: string; message?: string };
  const code = e?.code ?? "";
  if (code === "ECONNREFUSED") return "connection refused (is the server running?)";
  if (code.startsWith("HPE_")) {
    return `invalid HTTP/1.1 (${escapeControls(e.message ?? code)})`;
  }
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") return "the host name does not resolve";
  if (code === "ECONNRESET" || code === "EPIPE") return "the server closed the connection";
  if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME/.test(code)) {
    return `the server's certificate is not trusted: ${e.message} ` +
      "(give its CA with --cacert FILE; --insecure skips the check, for tests only)";
  }
  return e?.message ?? String(err);
}

/** "N of M bytes (…)" for messages. */
export function progressOf(done: number, total: number | undefined): string {
  return total === undefined
    ? `${done} bytes (${formatBytes(done)})`
    : `${done} of ${total} bytes (${formatBytes(done)} of ${formatBytes(total)})`;
}

/**
 * The body of `msg` as a stream that fails (through `broken`) when the connection
 * drops or the body ends before `length` bytes; node ends a body cut short by the
 * peer as if it were complete, so both are checked here. Cancelling the stream
 * calls `cancel` (by default: close the connection).
 */
export function incomingBody(
  msg: IncomingMessage,
  length: number | undefined,
  broken: BrokenBody,
  cancel: () => void = () => msg.destroy(),
): ReadableStream<Uint8Array> {
  const it = msg[Symbol.asyncIterator]();
  let received = 0;
  let ended = false;
  msg.once("end", () => ended = true);
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      let step: IteratorResult<Uint8Array>;
      try {
        step = await it.next();
      } catch (err) {
        throw broken(received, describeNetError(err), err);
      }
      if (step.done) {
        if (!ended || msg.readableAborted || (length !== undefined && received < length)) {
          throw broken(received, "the connection closed before the end of the body");
        }
        controller.close();
        return;
      }
      const chunk = step.value;
      received += chunk.length;
      controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
    },
    cancel,
  }, { highWaterMark: 0 });
}

/**
 * Writes `chunk` and waits until it has gone to the socket, so that the caller may
 * reuse the buffer (export's recycled chunks) and memory stays at one chunk per
 * stream. False when the stream closed first.
 */
export function writeChunk(out: Writable, chunk: Uint8Array): Promise<boolean> {
  if (out.destroyed) return Promise.resolve(false);
  return new Promise((resolve) => {
    const closed = () => resolve(false);
    out.once("close", closed);
    out.write(chunk, (err) => {
      out.off("close", closed);
      resolve(!err);
    });
  });
}
