/**
 * Typed errors. Every failure a user can cause or meet is a {@link DiskstreamError}
 * whose message says what went wrong, where (byte offset, cluster) and what to do;
 * the command line prints that message on one line, never a stack trace.
 *
 * @module
 */

/**
 * `text` from a peer (a server's message or status line, an error body, a disk name)
 * fit for one line of a message or a log: control, format and line-separator
 * characters are shown as `\xNN` (`\u{N}` past U+00FF), so they neither break the
 * line nor drive the terminal (escapes, bidirectional overrides).
 */
export function escapeControls(text: string): string {
  return text.replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) => {
    const n = c.codePointAt(0)!;
    return n < 0x100 ? `\\x${n.toString(16).padStart(2, "0")}` : `\\u{${n.toString(16)}}`;
  });
}

/** Base class of every error diskstream raises on purpose. Exit status 1. */
export class DiskstreamError extends Error {
  /** The exit status the command line uses for this error. */
  readonly exitCode: number = 1;
  /**
   * Set by a failed import that wrote no byte to its destination (refused before
   * writing, or failed before its first write): an existing disk is as it was.
   */
  nothingWritten?: boolean;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Bad command-line usage or option value. Exit status 2. */
export class UsageError extends DiskstreamError {
  override readonly exitCode: number = 2;
}

/**
 * The input image is malformed, truncated or inconsistent. `offset` is the byte
 * offset in the image (or stream) where the problem was found, when known.
 */
export class CorruptImageError extends DiskstreamError {
  /** Byte offset in the image or stream where the problem was found. */
  readonly offset?: number;
  constructor(message: string, offset?: number, options?: ErrorOptions) {
    super(offset === undefined ? message : `${message} (at byte offset ${offset})`, options);
    this.offset = offset;
  }
}

/** A valid image that uses a feature diskstream does not handle (encryption, ...). */
export class UnsupportedError extends DiskstreamError {}

/** Deno did not grant a permission the operation needs; the message names the flag. */
export class PermissionError extends DiskstreamError {}

/** The reader of our output went away (EPIPE); the command line exits 1 quietly. */
export class BrokenPipeError extends DiskstreamError {}

/**
 * A resource limit was reached: import's `--max-buffer`, or a destination smaller than the
 * image's virtual size.
 */
export class LimitError extends DiskstreamError {}

/** The source changed while it was being read (size differs between passes). */
export class SourceChangedError extends DiskstreamError {}

/**
 * Turns what Deno throws for a path into a DiskstreamError that names the path and
 * says what to do. Errors that are already DiskstreamErrors pass through.
 */
export function describeIoError(err: unknown, path: string, action: string): DiskstreamError {
  if (err instanceof DiskstreamError) return err;
  if (err instanceof Deno.errors.NotFound) {
    return new DiskstreamError(`cannot ${action} ${path}: no such file or directory`, {
      cause: err,
    });
  }
  if (err instanceof Deno.errors.NotCapable) {
    return new PermissionError(
      `cannot ${action} ${path}: Deno was not given the permission (${
        path.startsWith("/dev/")
          ? "devices need --allow-all"
          : "run with --allow-read --allow-write"
      }, or use 'deno task diskstream')`,
      { cause: err },
    );
  }
  if (err instanceof Deno.errors.PermissionDenied) {
    return new PermissionError(`cannot ${action} ${path}: permission denied`, { cause: err });
  }
  if (err instanceof Deno.errors.IsADirectory) {
    return new DiskstreamError(`cannot ${action} ${path}: it is a directory`, { cause: err });
  }
  if (err instanceof Deno.errors.BrokenPipe) {
    return new BrokenPipeError(`cannot ${action} ${path}: the reader closed the pipe`, {
      cause: err,
    });
  }
  return new DiskstreamError(`cannot ${action} ${path}: ${osErrorText(err)}`, { cause: err });
}

/**
 * The message of what Deno threw, its errno told by name as elsewhere
 * (`No space left on device (ENOSPC)`, not `(os error 28)`).
 */
function osErrorText(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^E[A-Z0-9]+$/.test(code)
    ? msg.replace(/\(os error \d+\)/, `(${code})`)
    : msg;
}

/**
 * An NBD server refused, failed or broke the protocol: a refused export name, an
 * error reply (named: EIO, ENOSPC, …), a dropped connection, a reply that does not
 * fit the request. The message names the URI and, for a request, its offset.
 *
 * @example
 * ```ts
 * import { NbdError, NbdExport } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * await assert.rejects(
 *   NbdExport.open("nbd+unix:///disk?socket=/nonexistent/nbd.sock"),
 *   (e) => e instanceof NbdError && /cannot connect/.test(e.message),
 * );
 * ```
 */
export class NbdError extends DiskstreamError {}

/** Numbers of the signals the commands stop cleanly on (Linux, x86-64 and arm64). */
export const STOP_SIGNALS: Readonly<Record<"SIGHUP" | "SIGINT" | "SIGTERM", number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGTERM: 15,
};

/**
 * The work was stopped by a signal (`signal`, e.g. `"SIGTERM"`) before it finished;
 * the message says what was interrupted and in which state the destination is. Exit
 * status 128 + the signal's number. Give one as the reason of the `signal` option of
 * an import or export to stop it; the error thrown then tells what was left.
 *
 * @example Stop an import from the library
 * ```ts
 * import { exportQcow2, importImage, InterruptedError } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(1 << 20).fill(1));
 * const exported = await exportQcow2(`${dir}/disk.raw`);
 * const controller = new AbortController();
 * controller.abort(new InterruptedError("SIGTERM"));
 * await assert.rejects(
 *   importImage(exported.stream, `${dir}/copy.raw`, { signal: controller.signal }),
 *   (err: InterruptedError) => err.exitCode === 143 && /interrupted by SIGTERM/.test(err.message),
 * );
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class InterruptedError extends DiskstreamError {
  /** The signal's name. */
  readonly signal: string;
  override readonly exitCode: number;
  constructor(signal: string, message = `interrupted by ${signal}`, options?: ErrorOptions) {
    super(message, options);
    this.signal = signal;
    const number = (STOP_SIGNALS as Record<string, number>)[signal];
    this.exitCode = number === undefined ? 1 : 128 + number;
  }

  /** The same interruption, told with what was interrupted and what state it left. */
  retell(message: string): InterruptedError {
    return new InterruptedError(this.signal, message, { cause: this });
  }
}
