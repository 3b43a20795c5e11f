/**
 * `import`: a qcow2 or VHD image arriving as a stream (a pipe, a socket, stdin) is
 * written to a raw file or block device in one pass, without seeking the input.
 *
 * @module
 */
import { CorruptImageError, UnsupportedError } from "../errors.ts";
import type { ProgressSink } from "../progress.ts";
import type { PipeInput } from "../io/pipe_input.ts";
import { decodeQcow2Stream, type StreamImageInfo } from "../qcow2/stream_reader.ts";
import {
  type DestinationKind,
  type DestinationOptions,
  failedImport,
  RawDestination,
} from "./raw_destination.ts";
import { ChunkStream } from "../io/stream_walker.ts";
import { decodeVhdStream, fixedFooterAtEnd } from "../vhd/stream_reader.ts";
import type { SeekableInput } from "../io/file_input.ts";
import { Spool } from "../io/spool.ts";
import { isNbdUri } from "../nbd/uri.ts";
import type { NbdOptions } from "../nbd/client.ts";
import type { NbdTarget } from "../nbd/target.ts";

/** The stream's format: detected from its first bytes, or forced. */
export type ImportFormat = "auto" | "qcow2" | "vhd";

/**
 * Default of {@link ImportOptions.maxBuffer}: 16 MiB (beyond it, a spool file).
 *
 * @example
 * ```ts
 * import { DEFAULT_MAX_BUFFER, parseSize } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.equal(DEFAULT_MAX_BUFFER, parseSize("16M"));
 * ```
 */
export const DEFAULT_MAX_BUFFER = 16 * 1024 * 1024;

/** Options of {@link importImage}. */
export interface ImportOptions extends DestinationOptions {
  /**
   * `auto` (default) recognises qcow2 (`QFI\xfb`) and dynamic VHD (`conectix`) from
   * the first bytes, and a fixed VHD read from a file by the footer at its end; a
   * fixed VHD from a stream needs `vhd`.
   */
  format?: ImportFormat;
  /**
   * Most memory (bytes) for data that arrives before the metadata that maps it
   * (default {@link DEFAULT_MAX_BUFFER}); beyond it the data goes to a spool file, or
   * without one the import fails with a `LimitError` naming the size that is enough.
   */
  maxBuffer?: number;
  /**
   * Spill what does not fit in `maxBuffer` to a temporary file (default true); false
   * refuses such images instead.
   */
  spool?: boolean;
  /** Folder of the spool file (default: the system temporary folder). */
  spoolDir?: string;
  /** Receives progress in stream bytes. */
  progress?: ProgressSink;
  /** The stream's length when known (a regular file), for progress. */
  streamLength?: number;
  /** How to reach a destination that is an NBD export: connections, CA certificate. */
  nbd?: NbdOptions;
  /**
   * Worker threads that decompress compressed qcow2 clusters (default: one per
   * processor but one, at least 1, at most 4; 0: all on the main thread).
   */
  workers?: number;
}

/** What an import did. */
export interface ImportResult {
  format: "qcow2" | "vhd";
  /** The image's virtual size: the bytes of the destination that were set. */
  virtualSize: number;
  /** Bytes of guest data written (zeros not counted). */
  dataBytes: number;
  /** What the destination was: a new file (left sparse), an existing file, a device, an NBD export. */
  destination: DestinationKind;
  /** Bytes of guest data moved from the input into `dest` by the kernel (splice, copy_file_range). */
  splicedBytes: number;
  /** Stream bytes written to the spool file while they waited for their tables. */
  spooledBytes: number;
  /**
   * Of those, the bytes whose spool space was given back as soon as they were known to be
   * unneeded (a snapshot's own data, bitmaps), before the end.
   */
  releasedBytes: number;
}

const QCOW2_MAGIC = [0x51, 0x46, 0x49, 0xfb];
const VHD_COOKIE = [...new TextEncoder().encode("conectix")];

/**
 * Imports the qcow2 or VHD image in `stream` into the raw file or block device at
 * `dest`. A new file is created at the virtual size and left sparse; an existing
 * file or device gets zeros where the image has none unless `prezeroed`; `delta`
 * applies a diff onto `dest`. The data is synced before the promise resolves (unless
 * `sync` is false); `signal` stops the import (see {@link DestinationOptions}). On
 * failure a file created by the import is removed.
 *
 * Errors are `DiskstreamError`s: {@link CorruptImageError} (truncated or
 * inconsistent stream, with the byte offset), {@link UnsupportedError} (encryption,
 * external data file, backing file without `delta`), `LimitError` (`maxBuffer`).
 *
 * @example Export a disk as a qcow2 stream and import it again
 * ```ts
 * import { exportQcow2, importImage } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(4 << 20);
 * disk.fill(0xab, 1 << 20, 2 << 20); // 1 MiB of data at 1 MiB, zeros elsewhere
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 *
 * const exported = await exportQcow2(`${dir}/disk.raw`);
 * const result = await importImage(exported.stream, `${dir}/copy.raw`);
 * assert.equal(result.format, "qcow2");
 * assert.equal(result.virtualSize, 4 << 20);
 * assert.equal(result.destination, "new file"); // created sparse
 * assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), disk);
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @example Apply a diff onto a copy of its base
 * ```ts
 * import { exportQcow2, importImage } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const base = new Uint8Array(1 << 20).fill(1);
 * const next = base.slice().fill(2, 0, 1000);
 * await Deno.writeFile(`${dir}/base.raw`, base);
 * await Deno.writeFile(`${dir}/next.raw`, next);
 * await Deno.writeFile(`${dir}/copy.raw`, base);
 *
 * const diff = await exportQcow2(`${dir}/next.raw`, { base: `${dir}/base.raw` });
 * await importImage(diff.stream, `${dir}/copy.raw`, { delta: true });
 * assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), next);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function importImage(
  stream: ReadableStream<Uint8Array> | AsyncIterator<Uint8Array>,
  dest: string,
  options: ImportOptions = {},
): Promise<ImportResult> {
  return importChunks(new ChunkStream(stream, options.signal), dest, options);
}

/**
 * {@link importImage} from a pipe read through its descriptor (see
 * `openPipeInput`): the image's data clusters and blocks are spliced from the
 * pipe into `dest` by the kernel, without passing through JavaScript. The pipe is
 * left open.
 */
export function importFromPipe(
  pipe: PipeInput,
  dest: string,
  options: ImportOptions = {},
): Promise<ImportResult> {
  return importChunks(new ChunkStream(pipe, options.signal), dest, options);
}

/**
 * {@link importImage} from a regular file or block device (see `openFileInput`): the
 * image's tables are read by random access first, then its data in file order,
 * seeking over everything else, so nothing is buffered whatever the layout. Data is
 * copied by the kernel (`copy_file_range`) when FFI is allowed. The input is left open.
 */
export function importFromFile(
  file: SeekableInput,
  dest: string,
  options: ImportOptions = {},
): Promise<ImportResult> {
  return importChunks(new ChunkStream(file, options.signal), dest, {
    ...options,
    streamLength: options.streamLength ?? file.size,
  });
}

async function importChunks(
  input: ChunkStream,
  dest: string,
  options: ImportOptions,
): Promise<ImportResult> {
  let target: RawDestination | NbdTarget | null = null;
  const progress = options.progress;
  let lastTotal = -1;
  const spool = options.spool === false || input.seekable ? null : new Spool(options.spoolDir);
  const decodeOpts = {
    maxBuffer: options.maxBuffer ?? DEFAULT_MAX_BUFFER,
    spool,
    delta: options.delta,
    streamLength: options.streamLength,
    workers: options.workers,
    onProgress: progress
      ? (done: number, total: number) => {
        const t = options.streamLength ?? total;
        if (t !== lastTotal) progress.setTotal(lastTotal = t);
        progress.update(done);
      }
      : undefined,
  };
  const open = async (info: StreamImageInfo, sizeKnown = true) => {
    const size = sizeKnown ? info.virtualSize : null;
    if (isNbdUri(dest)) {
      target = await (await import("../nbd/target.ts")).NbdTarget.open(dest, size, info.unit, {
        ...options.nbd,
        signal: options.signal,
        prezeroed: options.prezeroed,
        delta: options.delta,
      });
      // Its sockets progress only while the event loop runs: never block it on the input.
      input.overlapIo = true;
    } else target = await RawDestination.open(dest, size, info.unit, options);
    return target;
  };
  try {
    const format = await detectFormat(input, options.format ?? "auto");
    const info = format === "qcow2"
      ? await decodeQcow2Stream(input, decodeOpts, open)
      : await decodeVhdStream(input, decodeOpts, open);
    const t = target as RawDestination | NbdTarget | null;
    if (!t) throw new Error("the decoder did not open the destination");
    await t.finish(info.virtualSize);
    progress?.finish();
    return {
      format: info.format,
      virtualSize: info.virtualSize,
      dataBytes: t.dataBytes,
      destination: t.kind,
      splicedBytes: t.directBytes,
      spooledBytes: spool?.bytes ?? 0,
      releasedBytes: spool?.punched ?? 0,
    };
  } catch (err) {
    throw await failedImport(err, dest, target as RawDestination | NbdTarget | null, input);
  } finally {
    spool?.close();
  }
}

async function detectFormat(input: ChunkStream, format: ImportFormat): Promise<"qcow2" | "vhd"> {
  if (format !== "auto") return format;
  if (input.seekable && fixedFooterAtEnd(input.seekable)) return "vhd";
  const head = await input.read(8);
  input.unshift(head);
  if (head.length === 0) throw new CorruptImageError("the input stream is empty", 0);
  if (QCOW2_MAGIC.every((b, i) => head[i] === b)) return "qcow2";
  if (head.length === 8 && VHD_COOKIE.every((b, i) => head[i] === b)) return "vhd";
  const hex = Array.from(head, (b) => b.toString(16).padStart(2, "0")).join(" ");
  // A tar stream (ustar magic at 257): an XVA disk's members, or a whole XVA.
  const block = await input.read(263);
  input.unshift(block);
  const tar = new TextDecoder().decode(block.subarray(257, 262)) === "ustar";
  const xva = tar && new TextDecoder().decode(block.subarray(0, 8)) === "ova.xml\0";
  throw new UnsupportedError(
    `the stream is neither qcow2 (magic QFI\\xfb) nor a dynamic VHD (cookie "conectix"): ` +
      `it starts with ${hex}; ` +
      (xva
        ? "it is a whole XVA: extract its disks with 'diskstream xva extract'"
        : tar
        ? "it is a tar stream: for an XVA disk's members give -f tar"
        : "for a fixed VHD from a pipe give the format (-f vhd)"),
  );
}
