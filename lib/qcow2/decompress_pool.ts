/**
 * Compressed clusters decompressed on worker threads while the main thread parses
 * the stream and writes (as QEMU does with its thread pool). Workers start at the
 * first compressed cluster; until one is ready, and whenever every worker has its
 * fill of jobs, the main thread decompresses the cluster itself, so the pool never
 * waits for a thread to start and the bytes in flight stay bounded. Results are
 * handed back in submission order ({@link DeferredWrites}), so the destination is
 * written in stream order as before.
 *
 * Clusters travel in batches (one message each way per batch) in buffers that are
 * transferred, not copied, and recycled once written: every cluster is decoded
 * straight into its place in a batch's output buffer, on a worker or here (fresh
 * buffers cost page faults and garbage: about as much as the decoding, measured).
 * Memory is bounded by {@link BATCHES_PER_WORKER} batches per worker plus what the
 * import loop lets wait for writing.
 *
 * The workers run the source text of {@link makeDecompressor} and
 * {@link makeNativeCodecs} (from a `blob:` URL), so this works the same from a
 * checkout, the bundled file and a compiled binary. A worker that cannot start or
 * fails leaves its jobs to the main thread.
 *
 * @module
 */
import * as zlib from "node:zlib";
import { DiskstreamError } from "../errors.ts";
import type { ImageTarget } from "../io/endpoint.ts";
import { makeNativeCodecs, type NativeCodecs } from "../io/native_codecs.ts";
import { clusterOrThrow, type DecompressedCluster, makeDecompressor } from "./decompress.ts";

/**
 * Batches in flight per worker before the main thread takes new clusters itself. With 2,
 * a worker on a 2-CPU machine sat idle while the main thread decoded more than half of
 * the clusters (its answers wait for the main thread's next turn); with 4 it takes about
 * 60% of them and a 512 MiB zstd import took 1.32–1.36 s instead of 1.35–1.47 s
 * (deflate: 1.73–1.86 s instead of 1.84–2.22 s), measured alternating.
 */
const BATCHES_PER_WORKER = 4;
/** Output bytes of one batch (one message each way per batch, whatever its clusters). */
const BATCH_BYTES = 2 * 1024 * 1024;
/** At most this many workers (the main thread is busy parsing and writing). */
const MAX_WORKERS = 4;
/** Recycled buffers kept, of each kind (a batch in flight per worker, the writes awaited). */
const KEEP_FREE = 8;

// One message per batch: `count` compressed inputs back to back in `input` (cluster i
// at bounds[i]..bounds[i+1]), each decoded into `out` at i * clusterSize; both
// buffers go back to the main thread to be used again.
const WORKER_SOURCE = `import * as zlib from "node:zlib";
const native = (${makeNativeCodecs.toString()})();
const decompress = (${makeDecompressor.toString()})(zlib, native);
self.onmessage = ({ data: batch }) => {
  const { id, bounds, count, clusterSize, compressionType } = batch;
  const input = new Uint8Array(batch.input);
  const out = batch.out ?? new ArrayBuffer(count * clusterSize);
  const errors = [];
  for (let i = 0; i < count; i++) {
    const into = new Uint8Array(out, i * clusterSize, clusterSize);
    const r = decompress(input.subarray(bounds[i], bounds[i + 1]), clusterSize, compressionType, into);
    if ("error" in r) errors.push({ i, error: r.error, at: r.at });
  }
  self.postMessage({ id, out, input: batch.input, errors }, [out, batch.input]);
};
self.postMessage({ ready: true, native: native.names });
`;

interface Job {
  offset: number;
  guest: number;
  resolve: (data: Uint8Array) => void;
  reject: (err: unknown) => void;
}

/** A batch being filled: its jobs and their inputs, copied back to back. */
interface Batch {
  worker: PoolWorker;
  jobs: Job[];
  input: ArrayBuffer;
  bounds: number[];
}

interface PoolWorker {
  worker: Worker;
  ready: boolean;
  failed: boolean;
  /** Batches sent and not answered, by id. */
  inFlight: Map<number, Batch>;
}

/** Worker threads for one image's compressed clusters; see the module comment. */
export class DecompressPool {
  readonly #clusterSize: number;
  readonly #compressionType: number;
  readonly #size: number;
  readonly #batchJobs: number;
  /** Bytes of a batch's input buffer. */
  readonly #inputSize: number;
  readonly #decompress = makeDecompressor(zlib, makeNativeCodecs());
  #workers: PoolWorker[] | null = null;
  #batch: Batch | null = null;
  #nextId = 0;
  #url: string | null = null;
  /** Output buffers with clusters not yet released, and how many. */
  readonly #lent = new Map<ArrayBufferLike, number>();
  /** Output and input buffers to use again. */
  readonly #freeOut: ArrayBuffer[] = [];
  readonly #freeIn: ArrayBuffer[] = [];
  /** The output buffer the main thread decodes into, and its next free cluster. */
  #local: ArrayBuffer | null = null;
  #localNext = 0;
  /** Clusters decompressed by workers / by the main thread (for tests and tuning). */
  readonly counts = { workers: 0, main: 0 };
  /** The libraries the workers decode with (once one is ready; null: `node:zlib`). */
  workerCodecs: NativeCodecs["names"] | null = null;

  /**
   * A pool for clusters of `clusterSize` bytes compressed with `compressionType`
   * (0 deflate, 1 zstd), with `size` workers (default: one per processor but one, at
   * least 1 and at most 4; 0 decompresses everything on the main thread).
   */
  constructor(clusterSize: number, compressionType: number, size = defaultSize()) {
    this.#clusterSize = clusterSize;
    this.#compressionType = compressionType;
    this.#size = size;
    this.#batchJobs = Math.max(1, Math.floor(BATCH_BYTES / clusterSize));
    // Room for a batch of well-compressed clusters; a batch is sent early when full.
    this.#inputSize = Math.max(BATCH_BYTES, 2 * clusterSize);
  }

  /**
   * Guest cluster `guest` from its compressed data `input` (copied: the caller may
   * reuse it) found at stream offset `offset`. Rejects with a `CorruptImageError`
   * naming both. Clusters are sent to the workers in batches: call
   * {@link DecompressPool.send} before waiting for the promise. Give the cluster back
   * with {@link DecompressPool.release} once written.
   */
  decompress(input: Uint8Array, offset: number, guest: number): Promise<Uint8Array> {
    let batch = this.#batch;
    if (batch !== null && batch.bounds[batch.jobs.length] + input.length > batch.input.byteLength) {
      this.send(); // its input buffer is full
      batch = null;
    }
    if (batch === null) {
      const worker = this.#pick();
      if (worker === null) {
        try {
          return Promise.resolve(this.decompressHere(input, offset, guest).data);
        } catch (err) {
          return Promise.reject(err);
        }
      }
      batch = this.#batch = this.#newBatch(worker, input.length);
    }
    const at = batch.bounds[batch.jobs.length];
    new Uint8Array(batch.input, at, input.length).set(input);
    batch.bounds.push(at + input.length);
    this.counts.workers++;
    const done = new Promise<Uint8Array>((resolve, reject) => {
      batch.jobs.push({ offset, guest, resolve, reject });
    });
    if (batch.jobs.length >= this.#batchJobs) this.send();
    return done;
  }

  /**
   * Decompresses `input` on this thread (as {@link DecompressPool.decompress} does),
   * into a recycled buffer: give the cluster back with {@link DecompressPool.release}.
   * The result also says how many input bytes the compressed data used.
   */
  decompressHere(input: Uint8Array, offset: number, guest: number): DecompressedCluster {
    const cs = this.#clusterSize;
    if (this.#local === null || this.#localNext === this.#batchJobs) {
      const full = this.#local;
      this.#local = this.#takeOut();
      this.#localNext = 0;
      if (full !== null && !this.#lent.has(full)) this.#recycle(full);
    }
    const buffer = this.#local;
    const into = new Uint8Array(buffer, this.#localNext * cs, cs);
    const out = clusterOrThrow(
      this.#decompress(input, cs, this.#compressionType, into),
      offset,
      { cluster: guest, clusterSize: cs },
    );
    this.#localNext++;
    this.#lent.set(buffer, (this.#lent.get(buffer) ?? 0) + 1);
    this.counts.main++;
    return out;
  }

  /** Sends the batch being filled to its worker. */
  send(): void {
    const batch = this.#batch;
    this.#batch = null;
    if (batch === null || batch.jobs.length === 0) return;
    const id = this.#nextId++;
    batch.worker.inFlight.set(id, batch);
    const out = this.#freeOut.pop();
    batch.worker.worker.postMessage({
      id,
      input: batch.input,
      bounds: batch.bounds,
      count: batch.jobs.length,
      out,
      clusterSize: this.#clusterSize,
      compressionType: this.#compressionType,
    }, out ? [batch.input, out] : [batch.input]);
  }

  /**
   * A cluster returned by {@link DecompressPool.decompress} or
   * {@link DecompressPool.decompressHere} is no longer needed (it was written): its
   * buffer is used again once all of its clusters are released.
   */
  release(data: Uint8Array): void {
    const left = this.#lent.get(data.buffer);
    if (left === undefined) return;
    if (left > 1) {
      this.#lent.set(data.buffer, left - 1);
      return;
    }
    this.#lent.delete(data.buffer);
    if (data.buffer !== this.#local) this.#recycle(data.buffer as ArrayBuffer);
  }

  #recycle(buffer: ArrayBuffer): void {
    if (buffer.byteLength === this.#batchJobs * this.#clusterSize) {
      if (this.#freeOut.length < KEEP_FREE) this.#freeOut.push(buffer);
    }
  }

  #takeOut(): ArrayBuffer {
    return this.#freeOut.pop() ?? new ArrayBuffer(this.#batchJobs * this.#clusterSize);
  }

  #newBatch(worker: PoolWorker, first: number): Batch {
    const size = this.#inputSize;
    let input = this.#freeIn.pop();
    if (first > size) input = new ArrayBuffer(first); // (a range longer than any qemu-img writes)
    input ??= new ArrayBuffer(size);
    return { worker, jobs: [], input, bounds: [0] };
  }

  /**
   * Starts the workers now (they start at the first cluster otherwise) and resolves
   * with how many are ready once all have started or failed.
   */
  async whenReady(): Promise<number> {
    this.#workers ??= this.#start();
    while (this.#workers.some((w) => !w.ready && !w.failed)) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    return this.#workers.filter((w) => w.ready).length;
  }

  /** A ready worker with room for a batch (the least busy), or null. */
  #pick(): PoolWorker | null {
    this.#workers ??= this.#start();
    let best: PoolWorker | null = null;
    for (const w of this.#workers) {
      const n = w.inFlight.size;
      if (w.ready && n < BATCHES_PER_WORKER && (!best || n < best.inFlight.size)) best = w;
    }
    return best;
  }

  #start(): PoolWorker[] {
    if (this.#size <= 0) return [];
    try {
      this.#url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
      return Array.from({ length: this.#size }, () => this.#spawn(this.#url!));
    } catch {
      return []; // no workers here: the main thread does the work
    }
  }

  #spawn(url: string): PoolWorker {
    const w: PoolWorker = {
      worker: new Worker(url, { type: "module" }),
      ready: false,
      failed: false,
      inFlight: new Map(),
    };
    w.worker.onmessage = ({ data }) => {
      if (data.ready) {
        w.ready = true;
        this.workerCodecs = data.native;
        return;
      }
      const batch = w.inFlight.get(data.id);
      if (!batch) return;
      w.inFlight.delete(data.id);
      this.#answered(batch, data);
    };
    w.worker.onerror = (e) => {
      e.preventDefault();
      this.#retire(w, e.message);
    };
    return w;
  }

  /** A worker's answer: each job resolved with its cluster or rejected. */
  #answered(
    batch: Batch,
    answer: {
      out: ArrayBuffer;
      input: ArrayBuffer;
      errors: { i: number; error: string; at: number }[];
    },
  ): void {
    const cs = this.#clusterSize;
    const out = answer.out;
    if (this.#freeIn.length < KEEP_FREE && answer.input.byteLength === this.#inputSize) {
      this.#freeIn.push(answer.input);
    }
    const good = batch.jobs.length - answer.errors.length;
    if (good > 0) this.#lent.set(out, good);
    else this.#recycle(out);
    const errors = new Map(answer.errors.map((e) => [e.i, e]));
    batch.jobs.forEach((job, i) => {
      const e = errors.get(i);
      if (e === undefined) {
        job.resolve(new Uint8Array(out, i * cs, cs));
        return;
      }
      try {
        clusterOrThrow(e, job.offset, { cluster: job.guest, clusterSize: cs });
      } catch (err) {
        job.reject(err);
      }
    });
  }

  /**
   * A failed worker: stop it; the batch being filled for it is done here, the jobs it
   * had (their inputs went with them) fail.
   */
  #retire(w: PoolWorker, why: string): void {
    w.ready = false;
    w.failed = true;
    w.worker.terminate();
    const batches = [...w.inFlight.values()];
    w.inFlight.clear();
    if (this.#batch?.worker === w) {
      batches.push(this.#batch);
      this.#batch = null;
    }
    for (const batch of batches) {
      if (batch.input.byteLength === 0) { // sent: transferred to the worker
        for (const job of batch.jobs) {
          job.reject(
            new DiskstreamError(
              `a decompression thread failed (${why}) while it held guest cluster ` +
                `${job.guest} (compressed at byte ${job.offset}); import again`,
            ),
          );
        }
        continue;
      }
      const input = new Uint8Array(batch.input);
      batch.jobs.forEach((job, i) => {
        this.counts.workers--;
        try {
          job.resolve(
            this.decompressHere(
              input.subarray(batch.bounds[i], batch.bounds[i + 1]),
              job.offset,
              job.guest,
            ).data,
          );
        } catch (err) {
          job.reject(err);
        }
      });
    }
  }

  /** Stops the workers (pending jobs are abandoned); later calls do nothing. */
  close(): void {
    for (const w of this.#workers ?? []) {
      w.worker.terminate();
      w.inFlight.clear();
    }
    this.#workers = [];
    this.#batch = null;
    if (this.#url !== null) URL.revokeObjectURL(this.#url);
    this.#url = null;
  }
}

/** One worker per processor but one (the main thread decompresses too when they are busy). */
function defaultSize(): number {
  return Math.max(1, Math.min(MAX_WORKERS, (navigator.hardwareConcurrency || 1) - 1));
}

/**
 * An {@link ImageTarget} in front of another that also takes writes whose bytes are
 * still being made (decompressed clusters): {@link DeferredWrites.flush} waits for
 * them in the order they were queued, queues them on the target, then flushes it.
 * The bytes of pending writes count as queued, so the import loop flushes before
 * too many are in flight.
 */
export class DeferredWrites implements ImageTarget {
  readonly #target: ImageTarget;
  #pending: { bytes: Promise<Uint8Array>; write: (bytes: Uint8Array) => void }[] = [];
  #pendingBytes = 0;
  readonly path?: string;
  readonly wroteDirect?: (offset: number, length: number) => void;
  readonly direct?: boolean;

  /**
   * `unit`: the bytes of one deferred write; `hooks.beforeWait` runs before flush
   * waits (to send what is batched), `hooks.written` gets the bytes once written.
   */
  constructor(
    target: ImageTarget,
    readonly unit: number,
    readonly hooks: { beforeWait?: () => void; written?: (bytes: Uint8Array) => void } = {},
  ) {
    this.#target = target;
    this.path = target.path;
    this.direct = target.direct;
    if (target.wroteDirect) this.wroteDirect = (o, l) => target.wroteDirect!(o, l);
  }

  /** Queues `write(bytes)` for when `bytes` is ready (about `unit` bytes). */
  defer(bytes: Promise<Uint8Array>, write: (bytes: Uint8Array) => void): void {
    bytes.catch(() => {}); // reported by flush, in order
    this.#pending.push({ bytes, write });
    this.#pendingBytes += this.unit;
  }

  write(offset: number, bytes: Uint8Array, from: number, to: number): void {
    this.#target.write(offset, bytes, from, to);
  }

  zero(offset: number, length: number): void {
    this.#target.zero(offset, length);
  }

  get queued(): number {
    return this.#target.queued + this.#pendingBytes;
  }

  /** Bytes of the deferred writes not flushed yet. */
  get pending(): number {
    return this.#pendingBytes;
  }

  async flush(): Promise<void> {
    const pending = this.#pending;
    this.#pending = [];
    this.#pendingBytes = 0;
    this.hooks.beforeWait?.();
    const written: Uint8Array[] = [];
    for (const p of pending) {
      const bytes = await p.bytes;
      p.write(bytes);
      written.push(bytes);
    }
    await this.#target.flush();
    if (this.hooks.written) { for (const bytes of written) this.hooks.written(bytes); }
  }
}
