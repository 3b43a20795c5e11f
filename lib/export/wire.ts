/**
 * Export to XAPI's wire formats, planned by the same pass 1 and written by the same
 * pass 2 as qcow2 and VHD:
 *
 * - `raw`: the whole disk as a plain stream (the hinted-out clusters as zeros, never
 *   read); a diff is refused, a raw stream cannot say what is unchanged.
 * - `chunked` (vhd-tool's protocol): a 12-byte header `{u64 offset, u32 length}`
 *   (little-endian) before each run of planned clusters, `{0, 0}` at the end. With
 *   `base` it carries only what changed, and applies as a diff.
 * - `tar` (the XVA disk encoding): 1 MiB members `PREFIX/%08d`, each followed by its
 *   checksum member; chunks that hold no data are left out except the first and the
 *   last; the tar end closes the stream. With a hint, unhinted chunks are never read.
 *
 * @module
 */
import { alignUp } from "../bytes.ts";
import { type Run, setRuns } from "../alloc/runs.ts";
import { ClusterSet } from "../alloc/cluster_set.ts";
import { CHUNK_HEADER_BYTES, encodeChunkHeader } from "../chunked/chunked.ts";
import { UsageError } from "../errors.ts";
import type { DiskSource } from "../io/disk_source.ts";
import { CHUNK_SIZE } from "../io/stream.ts";
import { ChunkSink, READS_AHEAD, type WriterOptions } from "../qcow2/writer.ts";
import type { ChecksumKind } from "../xva/checksum.ts";
import { DEFAULT_TAR_PREFIX, DiskMemberWriter, memberStreamBytes, XVA_CHUNK } from "../xva/disk.ts";
import { TAR_END } from "../xva/tar.ts";
import { type ExportPlan, openSource } from "./plan.ts";
import { planExport, type PlannedExport, plannedExport, type SourceRange } from "./export.ts";
import type { StreamExportOptions } from "./options.ts";

/** The layout of a raw, chunked or tar export. */
export interface WireLayout {
  /** Exact length of the stream in bytes. */
  fileSize: number;
  /** The disk's size in bytes: the source's, exactly (not rounded up to 512 as in qcow2). */
  diskSize: number;
  /** Bytes of the disk the stream carries as data. */
  dataBytes: number;
}

/** A planned raw, chunked or tar export. */
export type WireExport = PlannedExport<WireLayout>;

/** Granularity of the plan of raw and chunked exports. */
const WIRE_CLUSTER = 64 * 1024;
/** The longest run one chunked header announces (a multiple of every cluster size). */
const MAX_CHUNKED_RUN = 1 << 30;
const ZEROS = new Uint8Array(CHUNK_SIZE);

/** The image as chunks from its pieces: bytes copied, source ranges read into place. */
async function* piecesChunks(
  pieces: Iterable<Uint8Array | SourceRange>,
  fileSize: number,
  plan: ExportPlan,
  options: WriterOptions,
): AsyncGenerator<Uint8Array> {
  const chunkSize = options.chunkSize ?? CHUNK_SIZE;
  const sink = new ChunkSink(fileSize, chunkSize, options.reuseBuffers === true);
  const limit = options.sourceSize ?? plan.src.size;
  for (const piece of pieces) {
    const isBytes = piece instanceof Uint8Array;
    const length = isBytes ? piece.length : piece.length;
    for (let done = 0; done < length;) {
      if (sink.free === 0) {
        sink.flush();
        yield* sink.drain();
      }
      const n = Math.min(length - done, sink.free || chunkSize);
      const space = sink.take(n, false);
      if (isBytes) space.set(piece.subarray(done, done + n));
      else {
        await plan.src.readAt(space, piece.offset + done, limit);
        options.onData?.(n);
      }
      done += n;
    }
  }
  sink.flush();
  yield* sink.drain();
}

function refuseDiff(options: StreamExportOptions, format: string, why: string): void {
  if (options.base !== undefined) {
    throw new UsageError(`--diff cannot be exported as ${format}: ${why}`);
  }
}

/**
 * Plans the export of the raw disk at `source` as a plain raw stream of its
 * `sourceSize` bytes. With `allocation`, the clusters it leaves out are written as
 * zeros without being read; without it, every byte is copied (by the kernel when it
 * can). A diff (`base`) is refused.
 *
 * @example
 * ```ts
 * import { exportRaw } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(100_000).fill(5);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const exported = await exportRaw(`${dir}/disk.raw`);
 * assert.equal(exported.layout.fileSize, 100_000);
 * assert.deepEqual(new Uint8Array(await new Response(exported.stream).arrayBuffer()), disk);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exportRaw(
  source: string | DiskSource,
  options: StreamExportOptions = {},
): Promise<WireExport> {
  refuseDiff(options, "raw", "a raw stream cannot say what is unchanged (use -f chunked or qcow2)");
  const plan = options.allocation
    ? await planExport(source, options, WIRE_CLUSTER, () => {})
    : await wholeDiskPlan(source, WIRE_CLUSTER, options);
  const size = plan.src.size;
  return plannedExport(plan, options, () => {
    const pieces = function* (): Generator<Uint8Array | SourceRange> {
      let at = 0;
      const gapTo = function* (end: number) {
        for (; at < end; at += Math.min(ZEROS.length, end - at)) {
          yield ZEROS.subarray(0, Math.min(ZEROS.length, end - at));
        }
      };
      for (const [first, last] of setRuns(plan.clusters)) {
        yield* gapTo(Math.min(size, first * WIRE_CLUSTER));
        const end = Math.min(size, (last + 1) * WIRE_CLUSTER);
        if (end > at) yield { offset: at, length: end - at };
        at = Math.max(at, end);
      }
      yield* gapTo(size);
    };
    const layout = { fileSize: size, diskSize: size, dataBytes: plannedBytes(plan, size) };
    return {
      layout,
      fileSize: size,
      chunks: (o) => piecesChunks(pieces(), size, plan, o),
      pieces,
    };
  });
}

/** A plan that takes every cluster, without reading anything. */
async function wholeDiskPlan(
  source: string | DiskSource,
  cs: number,
  options: StreamExportOptions,
): Promise<ExportPlan> {
  // A file, a device or an NBD export (read as given: not direct).
  const src = typeof source === "string" ? await openSource(source, options, false) : source;
  const count = Math.ceil(src.size / cs);
  const clusters = new ClusterSet(count, cs);
  if (count > 0) clusters.addRange(0, count - 1);
  return { src, virtualSize: alignUp(src.size, 512), clusters, scanned: 0 };
}

function plannedBytes(plan: ExportPlan, size: number): number {
  let n = 0;
  const cs = plan.clusters.clusterSize;
  for (const [first, last] of setRuns(plan.clusters)) {
    n += Math.min(size, (last + 1) * cs) - first * cs;
  }
  return n;
}

/** Options of {@link exportChunked}. */
export interface ChunkedExportOptions extends StreamExportOptions {
  /**
   * Also send the clusters left out as pieces of zeros (never read), so that the
   * stream sets every byte of the destination: vhd-tool's `stream` without
   * `--prezeroed`. Not with a diff.
   */
  fillGaps?: boolean;
}

/**
 * Plans the export of the raw disk at `source` in vhd-tool's chunked protocol: each
 * run of planned clusters (non-zero, hinted, or changed against `base`) behind its
 * 12-byte header, and the end header. Applying the stream onto a copy of `base`
 * (`importChunked`) rebuilds the disk; onto a zeroed destination, the disk itself
 * (`fillGaps` writes the zeros too).
 *
 * @example
 * ```ts
 * import { exportChunked } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(1 << 20);
 * disk.fill(9, 65536, 65536 + 10); // one 64 KiB cluster holds data
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const exported = await exportChunked(`${dir}/disk.raw`);
 * const bytes = new Uint8Array(await new Response(exported.stream).arrayBuffer());
 * assert.equal(bytes.length, 12 + 65536 + 12);
 * const view = new DataView(bytes.buffer);
 * assert.equal(view.getBigUint64(0, true), 65536n); // offset
 * assert.equal(view.getUint32(8, true), 65536); // length
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exportChunked(
  source: string | DiskSource,
  options: ChunkedExportOptions = {},
): Promise<WireExport> {
  if (options.fillGaps && options.base !== undefined) {
    throw new UsageError("a chunked diff cannot fill the gaps with zeros: they mean unchanged");
  }
  // The stream does not say the disk's size: applied onto a copy of a base of another
  // size, it cannot make the source (the copy keeps its own size).
  let baseSize: number | null = null;
  if (options.base !== undefined) {
    const base = await openSource(options.base, options);
    baseSize = base.size;
    base.close();
  }
  const plan = await planExport(source, options, WIRE_CLUSTER, (_, size) => {
    if (baseSize !== null && baseSize !== size) {
      throw new UsageError(
        `the base ${options.base} holds ${baseSize} bytes and the disk ${size}: a chunked ` +
          `stream does not carry the disk's size, so applied onto a copy of the base it ` +
          `cannot make the disk (export -f qcow2 or -f vhd, which carry it, or diff against ` +
          `a base of the disk's size)`,
      );
    }
  });
  // The stream carries the source's exact size: an importer given that size (or an
  // existing copy of the disk) must not see a piece reaching past it.
  return plannedExport(plan, options, () => {
    const virtualSize = plan.src.size;
    // [offset, length, zeros]: pieces of the disk, or of zeros (`fillGaps`).
    const runs: [number, number, boolean][] = [];
    const add = (start: number, end: number, zeros: boolean) => {
      for (let at = start; at < end; at += MAX_CHUNKED_RUN) {
        runs.push([at, Math.min(MAX_CHUNKED_RUN, end - at), zeros]);
      }
    };
    let done = 0;
    for (const [first, last] of setRuns(plan.clusters)) {
      if (options.fillGaps) add(done, first * WIRE_CLUSTER, true);
      done = Math.min(virtualSize, (last + 1) * WIRE_CLUSTER);
      add(first * WIRE_CLUSTER, done, false);
    }
    if (options.fillGaps) add(done, virtualSize, true);
    const dataBytes = runs.reduce((n, [, len]) => n + len, 0);
    const fileSize = dataBytes + (runs.length + 1) * CHUNK_HEADER_BYTES;
    const pieces = function* (): Generator<Uint8Array | SourceRange> {
      for (const [offset, length, zeros] of runs) {
        yield encodeChunkHeader(offset, length);
        if (!zeros) {
          yield { offset, length };
          continue;
        }
        for (let n = 0; n < length; n += ZEROS.length) {
          yield ZEROS.subarray(0, Math.min(ZEROS.length, length - n));
        }
      }
      yield encodeChunkHeader(0, 0);
    };
    return {
      layout: { fileSize, diskSize: virtualSize, dataBytes },
      fileSize,
      chunks: (o) => piecesChunks(pieces(), fileSize, plan, o),
      pieces,
    };
  });
}

/** Options of {@link exportTar}. */
export interface TarExportOptions extends StreamExportOptions {
  /** The members' prefix (default `Ref:0`): `PREFIX/%08d`. */
  prefix?: string;
  /** The checksum members: `xxhash` (XXH64, `.xxhash`, the default) or `sha1` (`.checksum`). */
  checksum?: ChecksumKind;
  /** Name members `PREFIX%08d`, the prefix glued on as vhd-tool does (default `PREFIX/%08d`). */
  gluePrefix?: boolean;
}

/**
 * Plans the export of the raw disk at `source` as an XVA disk: a tar stream of 1 MiB
 * members `PREFIX/%08d` (the last one shorter when the disk is not a whole number of
 * MiB), each followed by its checksum member, then the tar end. Chunks that hold no
 * data (or, with `allocation`, that the hint leaves out — those are never read) are
 * left out, except the first and the last. A diff is refused: in a tar stream a gap
 * means zeros.
 *
 * @example
 * ```ts
 * import { exportTar } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(5 << 20);
 * disk[2 << 20] = 1; // chunk 2 holds data; chunks 1 and 3 are left out
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const exported = await exportTar(`${dir}/disk.raw`, { prefix: "Ref:7" });
 * assert.deepEqual([...exported.clusters], [0, 2, 4]);
 * const tar = new Uint8Array(await new Response(exported.stream).arrayBuffer());
 * assert.equal(tar.length, exported.layout.fileSize);
 * assert.equal(new TextDecoder().decode(tar.subarray(0, 14)), "Ref:7/00000000");
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exportTar(
  source: string | DiskSource,
  options: TarExportOptions = {},
): Promise<WireExport> {
  refuseDiff(options, "tar", "in a tar stream a missing chunk means zeros (use -f chunked)");
  const writer = await DiskMemberWriter.create(
    options.prefix ?? DEFAULT_TAR_PREFIX,
    options.checksum ?? "xxhash",
    options.gluePrefix,
  );
  const plan = await planExport(source, options, XVA_CHUNK, () => {});
  const readSync = plan.src.readAtSync?.bind(plan.src);
  // Members cover the source's exact size (the last one shorter), as XAPI's do.
  return plannedExport(plan, options, () => {
    const virtualSize = plan.src.size;
    const chunks = plan.clusters;
    const count = Math.ceil(virtualSize / XVA_CHUNK);
    if (count > 0) {
      chunks.add(0); // XAPI's readers need the first and the last member
      chunks.add(count - 1);
    }
    const lastSize = virtualSize - (count - 1) * XVA_CHUNK;
    /** Bytes of data of member `i`. */
    const sizeOf = (i: number) => i === count - 1 ? lastSize : XVA_CHUNK;
    const full = memberStreamBytes(XVA_CHUNK, writer.kind);
    const memberBytes = (i: number) => memberStreamBytes(sizeOf(i), writer.kind);
    const n = chunks.count;
    const fileSize = (count > 0 ? (n - 1) * full + memberBytes(count - 1) : 0) + TAR_END.length;
    const dataBytes = count > 0 ? (n - 1) * XVA_CHUNK + lastSize : 0;
    // The members in order: [number, bytes of data].
    const members = function* (): Generator<[number, number]> {
      for (const [first, last] of setRuns(chunks)) {
        for (let i = first; i <= last; i++) yield [i, sizeOf(i)];
      }
    };
    return {
      layout: { fileSize, diskSize: virtualSize, dataBytes },
      fileSize,
      // Each member's data read into its place in a chunk, hashed once read, then
      // framed; the reads of the next chunk run while the consumer writes this one.
      chunks: async function* (o: WriterOptions) {
        const chunkSize = Math.max(o.chunkSize ?? CHUNK_SIZE, full);
        const sink = new ChunkSink(fileSize, chunkSize, o.reuseBuffers === true);
        const limit = o.sourceSize ?? plan.src.size;
        for (const [i, size] of members()) {
          const bytes = memberBytes(i);
          if (bytes > sink.free) {
            sink.flush();
            yield* sink.drainRead(READS_AHEAD);
          }
          const space = sink.take(bytes, false);
          sink.reading(
            plan.src.readAt(space.subarray(512, 512 + size), i * XVA_CHUNK, limit).then(() => {
              o.onData?.(size);
              writer.frame(space, 0, i, size);
            }),
          );
        }
        if (sink.free < TAR_END.length) {
          sink.flush();
          yield* sink.drainRead(READS_AHEAD);
        }
        sink.take(TAR_END.length).fill(0);
        sink.flush();
        yield* sink.drainRead();
      },
      // For writeTo's kernel copies and synchronous writes: one buffer, each member read
      // into it (one read) and hashed (one call). Its data then goes by kernel copy
      // (splice: no copy into the pipe; writing the buffer costs twice the time), or,
      // from a source read with O_DIRECT (a second read would be a second device
      // request), written from the buffer with the member's framing (one write). A
      // source written to meanwhile may then send other bytes than were hashed: the
      // importer refuses that member by its checksum (never silently wrong). Each
      // run of members is read ahead as the run before it starts: on a cold disk the
      // device reads the next allocated range while this one is hashed and sent.
      pieces: readSync && function* () {
        const buf = new Uint8Array(full);
        const copyData = !plan.src.direct;
        const runs = setRuns(chunks)[Symbol.iterator]();
        const readAhead = (run: IteratorResult<Run>) => {
          if (run.done || plan.src.prefetch === undefined) return;
          const [first, last] = run.value;
          plan.src.prefetch(first * XVA_CHUNK, Math.min(last - first + 1, 64) * XVA_CHUNK);
        };
        let next = runs.next();
        readAhead(next);
        while (!next.done) {
          const [first, last] = next.value;
          readAhead(next = runs.next());
          for (let i = first; i <= last; i++) {
            const size = sizeOf(i);
            readSync(buf.subarray(512, 512 + size), i * XVA_CHUNK, plan.src.size);
            const end = writer.frame(buf, 0, i, size);
            if (!copyData) {
              yield buf.subarray(0, end);
              continue;
            }
            yield buf.subarray(0, 512);
            yield { offset: i * XVA_CHUNK, length: size };
            yield buf.subarray(512 + size, end);
          }
        }
        yield TAR_END;
      },
    };
  });
}
