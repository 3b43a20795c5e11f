/**
 * Pass 2 of an export: the image from the plan, as a stream or written to an
 * endpoint, reading the planned clusters straight into the output chunks or copying
 * them in the kernel. Shared by every output format; each format brings an
 * {@link ImageWriter}.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import type { DiskSource } from "../io/disk_source.ts";
import { type Endpoint, endpointName, openOutput, pipeToOutput } from "../io/stream.ts";
import { COPY_STEP, type KernelCopy, openKernelCopy } from "../io/kernel_copy.ts";
import { DiskstreamError, InterruptedError, SourceChangedError, UsageError } from "../errors.ts";
import type { WriterOptions } from "../qcow2/writer.ts";
import type { ProgressSink } from "../progress.ts";
import { blockDeviceSize, endpointPath, pathExists, sameFile } from "../io/same_file.ts";
import { formatBytes } from "../size.ts";
import { openPageCache, type PageCache } from "../io/page_cache.ts";
import type { PlannedExport, StreamExportOptions } from "./options.ts";
import type { ExportPlan } from "./plan.ts";

/** Source bytes `[offset, offset + length)` to copy; those past the source's end are zeros. */
export interface SourceRange {
  offset: number;
  length: number;
}

/** How pass 2 writes one format's image from a plan. */
export interface ImageWriter<Layout> {
  layout: Layout;
  /** Exact length of the image in bytes. */
  fileSize: number;
  /** The image as chunks of megabytes, data read from the source into them. */
  chunks(options: WriterOptions): AsyncGenerator<Uint8Array>;
  /**
   * The image as bytes to write and source ranges to copy (for kernel copies); absent
   * when there is no such way (then writeTo writes {@link ImageWriter.chunks}). Each
   * piece is written before the next is asked for, so bytes may be a view of a buffer
   * the generator reuses (a tar member read and hashed in place).
   */
  pieces?(): Iterable<Uint8Array | SourceRange>;
}

/**
 * The export of a plan in the format `writer` makes for the plan's virtual size:
 * its stream or {@link PlannedExport.writeTo}. Closes the source if that fails.
 */
export function plannedExport<Layout>(
  plan: ExportPlan,
  options: StreamExportOptions,
  writer: (virtualSize: number) => ImageWriter<Layout>,
): PlannedExport<Layout> {
  const { src, clusters, scanned } = plan;
  try {
    const image = writer(plan.virtualSize);
    options.progress?.setTotal(scanned + image.fileSize);
    const pass2 = new Pass2(src, image, options, scanned, {
      chunkSize: options.chunkSize,
      reuseBuffers: options.reuseBuffers,
      sourceSize: src.size,
    }, [
      ["source", src.path],
      ...(src.files ?? []).map((f): [string, string] => ["source's parent", f]),
      ...(options.base === undefined ? [] : [["base", options.base]] as [string, string][]),
      ...(options.allocation?.files ?? []).map((f): [string, string] => ["allocation hint", f]),
      ...(options.baseAllocation?.files ?? []).map((f): [string, string] => [
        "base's allocation hint",
        f,
      ]),
    ]);
    return {
      // Made on first use: a ReadableStream starts pulling (prefetching) at once.
      get stream() {
        return pass2.stream();
      },
      layout: image.layout,
      clusters,
      sourceSize: src.size,
      scannedBytes: scanned,
      writeTo: (target) => pass2.writeTo(target),
    };
  } catch (err) {
    src.close();
    throw err;
  }
}

/** Pass 2: the image from the plan, as a stream or written to an endpoint. */
class Pass2<Layout> {
  #sent = 0;
  #started = false;
  #stream: ReadableStream<Uint8Array> | null = null;
  readonly progress: ProgressSink | undefined;
  readonly signal: AbortSignal | undefined;
  readonly sync: boolean;
  /** Keep the copied data out of the page cache (see page_cache.ts). */
  readonly direct: boolean;

  constructor(
    readonly src: DiskSource,
    readonly image: ImageWriter<Layout>,
    options: StreamExportOptions,
    readonly scanned: number,
    readonly writerOptions: WriterOptions,
    /** Files the output must not be: the source, and the base of a diff. */
    readonly protect: [role: string, path: string][],
  ) {
    this.progress = options.progress;
    this.signal = options.signal;
    this.sync = options.sync ?? true;
    this.direct = !!options.direct;
  }

  /** Refuses a second start and a source whose size changed since pass 1. */
  async #start(): Promise<void> {
    if (this.#started) throw new UsageError("an export can be written only once");
    this.#started = true;
    const now = await this.src.currentSize();
    if (now !== this.src.size) {
      throw new SourceChangedError(
        `${this.src.path} changed size between the passes (${this.src.size} → ${now} bytes); export it again`,
      );
    }
  }

  #sentBytes(bytes: number): void {
    this.signal?.throwIfAborted();
    this.#sent += bytes;
    this.progress?.update(this.scanned + this.#sent);
  }

  /** The image as a ReadableStream (made once) that prefetches two chunks. */
  stream(): ReadableStream<Uint8Array> {
    this.#stream ??= this.#makeStream();
    return this.#stream;
  }

  #makeStream(): ReadableStream<Uint8Array> {
    const { src, image, writerOptions } = this;
    let chunks: AsyncGenerator<Uint8Array> | null = null;
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          if (chunks === null) {
            await this.#start();
            chunks = image.chunks(writerOptions);
          }
          const r = await chunks.next();
          if (r.done) {
            src.close();
            this.progress?.finish();
            controller.close();
            return;
          }
          this.#sentBytes(r.value.length);
          controller.enqueue(r.value);
        } catch (err) {
          src.close();
          throw err;
        }
      },
      cancel: async () => {
        src.close();
        await chunks?.return(undefined).catch(() => {});
      },
    }, new CountQueuingStrategy({ highWaterMark: 2 }));
  }

  /** Writes the image to `target`, with kernel copies of the data when possible. */
  async writeTo(target: Endpoint): Promise<void> {
    if (this.#stream !== null || this.#started) {
      throw new UsageError("an export can be written only once");
    }
    if (target.kind === "std") await openOutput(target); // refuses a terminal
    const out = endpointPath(target, "stdout");
    for (const [role, path] of this.protect) {
      if (await sameFile(out, path)) {
        throw new UsageError(
          `the output ${
            endpointName(target, "stdout")
          } is the ${role} itself (${path}): write elsewhere`,
        );
      }
    }
    const name = endpointName(target, "stdout");
    const capacity = await blockDeviceSize(out);
    if (capacity !== null && capacity < this.image.fileSize) {
      throw new DiskstreamError(
        `${name} holds ${capacity} bytes (${formatBytes(capacity)}), less than the image's ` +
          `${this.image.fileSize} bytes (${formatBytes(this.image.fileSize)}): refusing to write`,
      );
    }
    // An output file this export creates is removed if it fails; one that existed is
    // truncated and rewritten from byte 0 on.
    const created = target.kind === "path" && !(await pathExists(target.path));
    try {
      await this.#write(target, name);
    } catch (err) {
      this.src.close();
      if (created) await Deno.remove(target.path).catch(() => {});
      if (!(err instanceof InterruptedError)) {
        // An existing file was truncated when opened: say so, as an import does.
        if (err instanceof DiskstreamError && !created && target.kind === "path") {
          err.message += `; ${name} (an existing file) is partly written from byte 0 on: ` +
            `it holds an incomplete image`;
        }
        throw err;
      }
      throw err.retell(
        `export of ${this.src.path} to ${name} interrupted by ${err.signal}: ` +
          (created
            ? `${name} (created by this export) was removed`
            : this.#sent === 0
            ? `nothing was written to ${name}`
            : `${name} is partly written from byte 0 on (up to ${this.#sent} of the image's ` +
              `${this.image.fileSize} bytes)`),
      );
    }
  }

  async #write(target: Endpoint, name: string): Promise<void> {
    // Kernel copies (and synchronous writes) only when the format gives pieces and the
    // source's path holds its bytes (not a disk inside an XVA, not a VHD chain).
    const copier = this.image.pieces && this.src.kernelCopy !== false && !this.src.remote
      ? openKernelCopy(
        this.src.path,
        target.kind === "path"
          ? { path: target.path }
          : { fd: target.kind === "fd" ? target.fd : 1 },
        name,
        this.sync,
        this.direct,
      )
      : null;
    if (copier === null) {
      return await pipeToOutput(this.stream(), await openOutput(target), this.sync);
    }
    const drop = this.direct
      ? {
        src: copier.readsDirect ? null : openPageCache(this.src.path, true),
        out: target.kind === "path" && !copier.writesDirect
          ? openPageCache(target.path, true)
          : null,
      }
      : null;
    try {
      await this.#start();
      await this.#copyWith(copier, drop?.src ?? null, drop?.out ?? null);
      await copier.finish(this.sync);
    } finally {
      copier.close();
      drop?.src?.close();
      drop?.out?.close();
      this.src.close();
    }
    this.progress?.finish();
  }

  async #copyWith(
    copier: KernelCopy,
    srcCache: PageCache | null,
    outCache: PageCache | null,
  ): Promise<void> {
    const src = this.src;
    // Let timers and signals run every few MiB (not after each member or scattered cluster).
    let sinceYield = 0;
    const yieldAfter = async (bytes: number) => {
      if ((sinceYield += bytes) < COPY_STEP) return;
      sinceYield = 0;
      await new Promise((resolve) => setImmediate(resolve));
    };
    for (const piece of this.image.pieces!()) {
      if (piece instanceof Uint8Array) {
        await copier.write(piece);
        outCache?.wrote(this.#sent, piece.length);
        this.#sentBytes(piece.length);
        await yieldAfter(piece.length);
        continue;
      }
      const end = piece.offset + piece.length;
      for (let at = piece.offset; at < end;) {
        const step = Math.min(copier.step, end - at);
        const real = Math.max(0, Math.min(step, src.size - at));
        if (real > 0) await copier.copy(at, real);
        if (real < step) await copier.write(new Uint8Array(step - real)); // the last cluster's padding
        srcCache?.read(at, real);
        outCache?.wrote(this.#sent, step);
        this.#sentBytes(step);
        at += step;
        await yieldAfter(step);
      }
    }
  }
}
