/**
 * Inputs and outputs of the streaming commands: stdout/stdin, a path, or an
 * inherited file descriptor (`--output-fd N` / `--input-fd N`, opened through
 * `/dev/fd/N`). Reads and writes move megabytes at a time.
 *
 * @module
 */
import { BrokenPipeError, describeIoError, UsageError } from "../errors.ts";
import { descriptorPath } from "./descriptor.ts";

/** Where a stream goes or comes from. */
export type Endpoint =
  | { kind: "std" }
  | { kind: "path"; path: string }
  | { kind: "fd"; fd: number };

/** Size of the chunks read from inputs. */
export const CHUNK_SIZE = 4 * 1024 * 1024;

/** A byte sink that the export stream is written to. */
export interface Output {
  /** A name for messages: "stdout", a path, or "fd 5". */
  readonly name: string;
  /** True when the output is this process's stdout. */
  readonly isStdout: boolean;
  /** Writes all of `chunk`. */
  write(chunk: Uint8Array): Promise<void>;
  /**
   * Makes what was written durable (fdatasync) when the output is a file or a device
   * opened here; nothing for stdout, pipes and sockets.
   */
  sync(): Promise<void>;
  /** Closes (stdout is left open). */
  close(): Promise<void>;
}

/** Describes an endpoint for messages. */
export function endpointName(e: Endpoint, std: "stdin" | "stdout"): string {
  return e.kind === "std" ? std : e.kind === "path" ? e.path : `fd ${e.fd}`;
}

async function writeAll(w: { write(p: Uint8Array): Promise<number> }, chunk: Uint8Array) {
  let off = 0;
  while (off < chunk.length) off += await w.write(chunk.subarray(off));
}

/**
 * Opens an output. stdout is refused when it is a terminal (an image would garble
 * it); a path is created or truncated.
 */
export async function openOutput(target: Endpoint): Promise<Output> {
  const name = endpointName(target, "stdout");
  if (target.kind === "std") {
    if (Deno.stdout.isTerminal()) {
      throw new UsageError(
        "refusing to write a disk image to a terminal: redirect stdout or use -o FILE",
      );
    }
    return wrap(name, true, Deno.stdout, () => Promise.resolve(), () => Promise.resolve());
  }
  const path = target.kind === "path" ? target.path : descriptorPath(target.fd, name);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(
      path,
      target.kind === "path" ? { write: true, create: true, truncate: true } : { write: true },
    );
  } catch (err) {
    throw describeIoError(err, name, "open for writing");
  }
  const sync = async () => {
    try {
      const info = await file.stat();
      if (info.isFile || info.isBlockDevice) await file.syncData();
    } catch (err) {
      throw describeIoError(err, name, "sync (fdatasync)");
    }
  };
  return wrap(name, false, file, sync, () => Promise.resolve(file.close()));
}

function wrap(
  name: string,
  isStdout: boolean,
  w: { write(p: Uint8Array): Promise<number> },
  sync: () => Promise<void>,
  close: () => Promise<void>,
): Output {
  return {
    name,
    isStdout,
    async write(chunk) {
      try {
        await writeAll(w, chunk);
      } catch (err) {
        if (err instanceof Deno.errors.BrokenPipe) {
          throw new BrokenPipeError(`${name}: the reader closed the pipe`, { cause: err });
        }
        throw describeIoError(err, name, "write to");
      }
    },
    sync,
    close,
  };
}

/**
 * Writes every chunk of `stream` to `output`, syncs it (unless `sync` is false: see
 * {@link Output.sync}), then closes the output.
 */
export async function pipeToOutput(
  stream: ReadableStream<Uint8Array>,
  output: Output,
  sync = true,
): Promise<void> {
  try {
    for await (const chunk of stream) await output.write(chunk);
    if (sync) await output.sync();
  } finally {
    await output.close();
  }
}

/** An opened input: a byte stream of large chunks and a way to release it. */
export interface Input {
  /** A name for messages: "stdin", a path, or "fd 5". */
  readonly name: string;
  /** The bytes, in chunks of up to {@link CHUNK_SIZE}. */
  readonly stream: ReadableStream<Uint8Array>;
}

/** Options of {@link openInput}. */
export interface InputOptions {
  /** Read with blocking reads, whole chunks at a time ({@link blockingReadableFrom}). */
  blocking?: boolean;
}

/** Opens an input stream (stdin, a path, or an inherited descriptor). */
export async function openInput(source: Endpoint, opts: InputOptions = {}): Promise<Input> {
  const name = endpointName(source, "stdin");
  const from = opts.blocking ? blockingReadableFrom : readableFrom;
  if (source.kind === "std") return { name, stream: from(Deno.stdin, name) };
  const path = source.kind === "path" ? source.path : descriptorPath(source.fd, name);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
    // Reopening /dev/fd/N starts at byte 0: continue where the caller's descriptor is.
    if (source.kind === "fd" && (await file.stat()).isFile) {
      await file.seek(descriptorPosition(source.fd), Deno.SeekMode.Start);
    }
  } catch (err) {
    throw describeIoError(err, name, "open");
  }
  return { name, stream: from(file, name, () => file.close()) };
}

/**
 * The file position of this process's descriptor `fd` (Linux `/proc/self/fdinfo`), so
 * that an inherited, already partly read file is read on from where it is; 0 when it
 * cannot be learnt.
 */
export function descriptorPosition(fd: number): number {
  try {
    const m = /^pos:\s+(\d+)/m.exec(Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/**
 * Like {@link readableFrom}, but each chunk is filled completely with blocking reads
 * (`readSync`: no thread hop per 64 KiB pipe read, about twice as fast for a single
 * consumer such as import, whose writes still run in the background). A
 * non-blocking descriptor (EAGAIN) falls back to asynchronous reads. It is a byte
 * stream: a BYOB reader can hand its buffers back for reuse (import does, so its
 * memory stays at a few chunks).
 */
export function blockingReadableFrom(
  reader: {
    read(p: Uint8Array): Promise<number | null>;
    readSync(p: Uint8Array): number | null;
  },
  name: string,
  close: () => void = () => {},
  chunkSize = CHUNK_SIZE,
): ReadableStream<Uint8Array> {
  let blocking = true;
  return chunkedReadable(name, close, chunkSize, async (buf) => {
    let filled = 0;
    while (filled < buf.length) {
      let n: number | null;
      try {
        n = blocking
          ? reader.readSync(buf.subarray(filled))
          : await reader.read(buf.subarray(filled));
      } catch (err) {
        if (!(blocking && err instanceof Deno.errors.WouldBlock)) throw err;
        blocking = false;
        continue;
      }
      if (n === null) break;
      filled += n;
    }
    return filled;
  }, true);
}

/**
 * A ReadableStream over a reader that moves `chunkSize` bytes per chunk (Deno's own
 * `.readable` moves 64 KiB), each chunk a fresh buffer the consumer may keep.
 */
export function readableFrom(
  reader: { read(p: Uint8Array): Promise<number | null> },
  name: string,
  close: () => void = () => {},
  chunkSize = CHUNK_SIZE,
): ReadableStream<Uint8Array> {
  return chunkedReadable(name, close, chunkSize, async (buf) => {
    let filled = 0;
    while (filled < buf.length) {
      const n = await reader.read(buf.subarray(filled));
      if (n === null) break;
      filled += n;
      // A pipe gives what it has: pass on a large enough piece without waiting.
      if (filled >= buf.length / 4) break;
    }
    return filled;
  });
}

/**
 * The stream both readers share: `fill` fills a chunk; 0 bytes = the end. A byte
 * stream fills the reader's own buffer (BYOB) or one of `chunkSize`.
 */
function chunkedReadable(
  name: string,
  close: () => void,
  chunkSize: number,
  fill: (buf: Uint8Array) => Promise<number>,
  byteStream = false,
): ReadableStream<Uint8Array> {
  let closed = false;
  const done = () => {
    if (!closed) {
      closed = true;
      close();
    }
  };
  const read = async (buf: Uint8Array) => {
    try {
      const filled = await fill(buf);
      if (filled === 0) done();
      return filled;
    } catch (err) {
      done();
      throw describeIoError(err, name, "read");
    }
  };
  if (byteStream) {
    return new ReadableStream({
      type: "bytes",
      autoAllocateChunkSize: chunkSize,
      async pull(controller) {
        const req = controller.byobRequest!;
        const view = req.view!;
        const filled = await read(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
        if (filled === 0) controller.close();
        req.respond(filled);
      },
      cancel: done,
    });
  }
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const buf = new Uint8Array(chunkSize);
      const filled = await read(buf);
      if (filled === 0) controller.close();
      else controller.enqueue(filled === chunkSize ? buf : buf.subarray(0, filled));
    },
    cancel: done,
  });
}
