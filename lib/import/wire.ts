/**
 * Import from XAPI's wire formats into a raw file or block device:
 *
 * - `raw`: the stream's bytes from offset 0 on.
 * - `chunked` (vhd-tool's protocol): each piece written at its offset, nothing else
 *   touched, so a chunked diff applies onto a copy of its base.
 * - `tar` (an XVA disk): members written at the offsets their numbers give, zeros for
 *   the gaps (holes in a new file), every checksum verified before its data is written.
 *
 * @module
 */
import { decodeChunkedStream } from "../chunked/chunked.ts";
import { CorruptImageError, UsageError } from "../errors.ts";
import { ChunkStream, DECODE_FLUSH_BYTES } from "../io/chunk_stream.ts";
import { openDiskSource } from "../io/disk_source.ts";
import type { ProgressSink } from "../progress.ts";
import type { ChecksumKind } from "../xva/checksum.ts";
import { decodeXvaDisk } from "../xva/disk.ts";
import { shownName, TarReader } from "../xva/tar.ts";
import {
  type DestinationKind,
  type DestinationOptions,
  failedImport,
  RawDestination,
} from "./raw_destination.ts";

/** Options of the wire-format imports. */
export interface WireImportOptions extends DestinationOptions {
  /** Where `size` came from, for messages (default `--size`). */
  sizeOrigin?: string;
  /** Receives progress in bytes of the disk. */
  progress?: ProgressSink;
}

/** Options of {@link importTar}. */
export interface TarImportOptions extends WireImportOptions {
  /** The members' prefix; by default the first member's. */
  prefix?: string;
  /** Do not verify the checksums (their members may then be missing). */
  ignoreChecksums?: boolean;
}

/** What a wire-format import did. */
export interface WireImportResult {
  format: "raw" | "chunked" | "tar";
  /** The disk's size in bytes. */
  virtualSize: number;
  /** Bytes of data written (gaps not counted). */
  dataBytes: number;
  destination: DestinationKind;
  /** For tar: the checksums verified, by kind. */
  verified?: Record<ChecksumKind, number>;
}

type Source = ReadableStream<Uint8Array> | ChunkStream;

function chunkStream(s: Source, signal?: AbortSignal): ChunkStream {
  return s instanceof ChunkStream ? s : new ChunkStream(s, signal);
}

/** The size of an existing destination, or null when it does not exist. */
async function existingSize(dest: string): Promise<number | null> {
  try {
    await Deno.stat(dest);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return null;
    throw err;
  }
  const src = await openDiskSource(dest);
  src.close();
  return src.size;
}

/**
 * Opens the destination and runs `body`, which ends with the destination's `finish`
 * (its last writes and its sync can fail too): on any failure the destination is
 * aborted (a file this import created is removed) and an existing one is named with
 * what was left in it.
 */
async function run<T>(
  dest: string,
  input: ChunkStream,
  open: () => Promise<RawDestination>,
  body: (target: RawDestination) => Promise<T>,
): Promise<[RawDestination, T]> {
  let target: RawDestination | null = null;
  try {
    target = await open();
    const out = await body(target);
    return [target, out];
  } catch (err) {
    throw await failedImport(err, dest, target, input);
  }
}

/**
 * Writes vhd-tool's chunked stream `stream` into `dest`: every piece at its offset,
 * nothing else touched. The disk's size is `size`, else the size of the existing file
 * or device (a new file needs `size`).
 *
 * @example Apply a chunked diff onto a copy of its base
 * ```ts
 * import { exportChunked, importChunked } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const base = new Uint8Array(1 << 20).fill(1);
 * const next = base.slice().fill(2, 70000, 70010);
 * await Deno.writeFile(`${dir}/base.raw`, base);
 * await Deno.writeFile(`${dir}/next.raw`, next);
 * await Deno.writeFile(`${dir}/copy.raw`, base);
 * const diff = await exportChunked(`${dir}/next.raw`, { base: `${dir}/base.raw` });
 * assert.equal(diff.layout.dataBytes, 65536); // one changed cluster
 * await importChunked(diff.stream, `${dir}/copy.raw`);
 * assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), next);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function importChunked(
  stream: Source,
  dest: string,
  options: WireImportOptions = {},
): Promise<WireImportResult> {
  const input = chunkStream(stream, options.signal);
  const size = options.size ?? await existingSize(dest);
  if (size === null) {
    throw new UsageError(
      `${dest} does not exist and a chunked stream does not say the disk's size: give --size`,
    );
  }
  options.progress?.setTotal(size);
  const [target, r] = await run(
    dest,
    input,
    () => RawDestination.open(dest, size, 65536, { ...options, delta: true }),
    async (t) => {
      const r = await decodeChunkedStream(input, t, {
        size,
        onProgress: (done) => options.progress?.update(Math.min(done, size)),
      });
      await t.finish();
      return r;
    },
  );
  options.progress?.finish();
  return { format: "chunked", virtualSize: size, dataBytes: r.dataBytes, destination: target.kind };
}

/**
 * Writes the XVA disk in the tar stream `stream` (members `PREFIX/%08d` and their
 * checksum members, as `exportTar` or XAPI write them) into `dest`. The disk ends at
 * `size` when given, else with the stream (the tar end, or the end of the input).
 * Gaps are zeros (holes in a new file; skipped with `prezeroed`). A checksum
 * mismatch fails the import naming the member, before that member's data is written;
 * so does a member of another prefix (a stream holds one disk: for an XVA see
 * `extractXva`). An archive with no member at all is an empty disk.
 *
 * @example
 * ```ts
 * import { exportTar, importTar } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(3 << 20);
 * disk.fill(4, 2 << 20); // the last MiB holds data, the middle one is a gap
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const exported = await exportTar(`${dir}/disk.raw`, { checksum: "sha1" });
 * const r = await importTar(exported.stream, `${dir}/copy.raw`);
 * assert.equal(r.virtualSize, 3 << 20);
 * assert.equal(r.verified?.sha1, 2); // members 0 and 2
 * assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), disk);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function importTar(
  stream: Source,
  dest: string,
  options: TarImportOptions = {},
): Promise<WireImportResult> {
  const input = chunkStream(stream, options.signal);
  const size = options.size ?? null;
  if (size !== null) options.progress?.setTotal(size);
  const reader = new TarReader(input);
  const [target, r] = await run(
    dest,
    input,
    () => RawDestination.open(dest, size, 1 << 20, options),
    async (t) => {
      const r = await decodeXvaDisk(reader, null, t, {
        prefix: options.prefix,
        size,
        ignoreChecksums: options.ignoreChecksums,
        onProgress: (done) => options.progress?.update(done),
      });
      if (r.next !== null) {
        // A stream of one disk: members of another prefix are not this disk's end.
        throw new CorruptImageError(
          `member ${shownName(r.next.name)} does not belong to the disk of prefix ` +
            `${shownName(r.prefix)}: a tar ` +
            `stream of one disk holds one prefix's members (a whole XVA: 'diskstream xva ` +
            `extract'; another disk's members: give --tar-prefix)`,
          r.next.headerOffset,
        );
      }
      await t.finish(r.size);
      return r;
    },
  );
  options.progress?.finish();
  return {
    format: "tar",
    virtualSize: r.size,
    dataBytes: r.dataBytes,
    destination: target.kind,
    verified: r.verified,
  };
}

/**
 * Writes the raw stream `stream` into `dest` from offset 0. With `size`, the stream
 * must hold exactly that many bytes; without it the disk is as long as the stream.
 *
 * @example
 * ```ts
 * import { importRaw } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const r = await importRaw(ReadableStream.from([new Uint8Array([1, 2, 3])]), `${dir}/d.raw`);
 * assert.equal(r.virtualSize, 3);
 * assert.deepEqual([...await Deno.readFile(`${dir}/d.raw`)], [1, 2, 3]);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function importRaw(
  stream: Source,
  dest: string,
  options: WireImportOptions = {},
): Promise<WireImportResult> {
  const input = chunkStream(stream, options.signal);
  const size = options.size ?? null;
  const origin = options.sizeOrigin ?? "--size";
  if (size !== null) options.progress?.setTotal(size);
  const [target, total] = await run(
    dest,
    input,
    () => RawDestination.open(dest, size, 65536, options),
    async (t) => {
      let at = 0;
      let held: Uint8Array[] = [];
      for (;;) {
        // All the bytes given: a peer that keeps its connection open sends no more.
        if (size !== null && at === size && input.idle()) break;
        const c = await input.next();
        if (c === null) break;
        if (size !== null && at + c.length > size) {
          throw new CorruptImageError(
            `the raw stream holds more than the ${size} bytes given (${origin})`,
            size,
          );
        }
        t.write(at, c, 0, c.length);
        held.push(c);
        at += c.length;
        if (t.queued >= DECODE_FLUSH_BYTES) {
          await t.flush();
          for (const h of held) input.release(h);
          held = [];
        }
        options.progress?.update(at);
      }
      if (size !== null && at < size) {
        throw new CorruptImageError(
          `the raw stream ended after ${at} of the ${size} bytes given (${origin}): it was cut ` +
            `short`,
          at,
        );
      }
      await t.finish(at);
      return at;
    },
  );
  options.progress?.finish();
  return {
    format: "raw",
    virtualSize: total,
    dataBytes: target.dataBytes,
    destination: target.kind,
  };
}
