/**
 * Compressed clusters decompressed on worker threads while the main thread parses
 * the stream and writes (as QEMU does with its thread pool). Workers start at the
 * first compressed cluster; until one is ready, and whenever every worker has its
 * fill of jobs, the main thread decompresses the cluster itself, so the pool never
 * waits for a thread to start and the bytes in flight stay bounded. Results are
 * handed back in submission order ({@link DeferredWrites}), so the destination is
 * written in stream order as before.
 *
 * The workers run the source text of {@link makeDecompressor} (from a `blob:` URL),
 * so this works the same from a checkout, the bundled file and a compiled binary. A
 * worker that cannot start or fails leaves its jobs to the main thread.
 *
 * @module
 */
import type { ImageTarget } from "../io/endpoint.ts";
import {
  clusterOrThrow,
  decompressCluster,
  type DecompressResult,
  makeDecompressor,
} from "./decompress.ts";

/** Batches in flight per worker before the main thread takes new clusters itself. */
const BATCHES_PER_WORKER = 2;
/** Output bytes of one batch (one message each way per batch, whatever its clusters). */
const BATCH_BYTES = 2 * 1024 * 1024;
/** At most this many workers (the main thread is busy parsing and writing). */
const MAX_WORKERS = 4;

// One message per batch: the compressed inputs back to back, each cluster's output
// written at `i * clusterSize` of one buffer, recycled once its clusters are written
// (fresh buffers cost page faults: about as much as the decompression, measured).
const WORKER_SOURCE = `import * as zlib from "node:zlib";
const decompress = (${makeDecompressor.toString()})(zlib);
self.onmessage = ({ data: batch }) => {
  const { input, bounds, clusterSize, compressionType } = batch;
  const size = clusterSize * (bounds.length - 1);
  const out = batch.out && batch.out.byteLength >= size ? new Uint8Array(batch.out) : new Uint8Array(size);
  const results = [];
  for (let i = 0; i + 1 < bounds.length; i++) {
    const r = decompress(input.subarray(bounds[i], bounds[i + 1]), clusterSize, compressionType);
    if ("data" in r) out.set(r.data, i * clusterSize);
    results.push("data" in r ? { used: r.used } : { error: r.error, at: r.at });
  }
  self.postMessage({ id: batch.id, out, results }, [out.buffer]);
};
self.postMessage({ ready: true });
`;

interface Job {
  input: Uint8Array;
  offset: number;
  resolve: (data: Uint8Array) => void;
  reject: (err: unknown) => void;
}

interface PoolWorker {
  worker: Worker;
  ready: boolean;
  failed: boolean;
  /** Batches sent and not answered, by id. */
  inFlight: Map<number, Job[]>;
}

/** Worker threads for one image's compressed clusters; see the module comment. */
export class DecompressPool {
  readonly #clusterSize: number;
  readonly #compressionType: number;
  readonly #size: number;
  readonly #batchJobs: number;
  #workers: PoolWorker[] | null = null;
  /** The batch being filled, and the worker it is for. */
  #batch: Job[] = [];
  #batchWorker: PoolWorker | null = null;
  #nextId = 0;
  #url: string | null = null;
  /** Output buffers of answered batches: views not yet released, by buffer. */
  readonly #lent = new Map<ArrayBufferLike, number>();
  /** Output buffers to send again. */
  readonly #free: ArrayBuffer[] = [];
  /** Clusters decompressed by workers / by the main thread (for tests and tuning). */
  readonly counts = { workers: 0, main: 0 };

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
  }

  /**
   * The cluster compressed in `input` (the pool may keep it: the caller must not
   * reuse it) found at stream offset `offset`. Rejects with a `CorruptImageError`.
   * Clusters are sent to the workers in batches: call {@link DecompressPool.send}
   * before waiting for the promise.
   */
  decompress(input: Uint8Array, offset: number): Promise<Uint8Array> {
    const w = this.#batchWorker ?? this.#pick();
    if (w === null) return this.#here(input, offset);
    this.#batchWorker = w;
    this.counts.workers++;
    const done = new Promise<Uint8Array>((resolve, reject) => {
      this.#batch.push({ input, offset, resolve, reject });
    });
    if (this.#batch.length >= this.#batchJobs) this.send();
    return done;
  }

  /** Sends the batch being filled to its worker. */
  send(): void {
    const w = this.#batchWorker;
    const jobs = this.#batch;
    this.#batch = [];
    this.#batchWorker = null;
    if (w === null || jobs.length === 0) return;
    const bounds = [0];
    for (const job of jobs) bounds.push(bounds[bounds.length - 1] + job.input.length);
    const input = new Uint8Array(bounds[bounds.length - 1]);
    jobs.forEach((job, i) => input.set(job.input, bounds[i]));
    const id = this.#nextId++;
    w.inFlight.set(id, jobs);
    const out = this.#free.pop();
    w.worker.postMessage({
      id,
      input,
      bounds,
      out,
      clusterSize: this.#clusterSize,
      compressionType: this.#compressionType,
    }, out ? [input.buffer, out] : [input.buffer]);
  }

  /**
   * A cluster returned by {@link DecompressPool.decompress} is no longer needed (it
   * was written): its batch's buffer is reused once all of its clusters are.
   */
  release(data: Uint8Array): void {
    const left = this.#lent.get(data.buffer);
    if (left === undefined) return;
    if (left > 1) {
      this.#lent.set(data.buffer, left - 1);
      return;
    }
    this.#lent.delete(data.buffer);
    if (this.#free.length < 2 * MAX_WORKERS) this.#free.push(data.buffer as ArrayBuffer);
  }

  #here(input: Uint8Array, offset: number): Promise<Uint8Array> {
    this.counts.main++;
    try {
      const out = decompressCluster(input, this.#clusterSize, this.#compressionType, offset);
      return Promise.resolve(out.data);
    } catch (err) {
      return Promise.reject(err);
    }
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
        return;
      }
      const jobs = w.inFlight.get(data.id);
      if (!jobs) return;
      w.inFlight.delete(data.id);
      const cs = this.#clusterSize;
      this.#lent.set(data.out.buffer, jobs.length);
      jobs.forEach((job, i) => {
        const r = data.results[i];
        const result: DecompressResult = r.error === undefined
          ? { data: data.out.subarray(i * cs, (i + 1) * cs), used: r.used }
          : { error: r.error, at: r.at };
        try {
          job.resolve(clusterOrThrow(result, job.offset).data);
        } catch (err) {
          job.reject(err);
        }
      });
    };
    w.worker.onerror = (e) => {
      e.preventDefault();
      this.#retire(w);
    };
    return w;
  }

  /** A failed worker: stop it and do its jobs here. */
  #retire(w: PoolWorker): void {
    w.ready = false;
    w.failed = true;
    w.worker.terminate();
    const jobs = [...w.inFlight.values()].flat();
    w.inFlight.clear();
    if (this.#batchWorker === w) {
      jobs.push(...this.#batch);
      this.#batch = [];
      this.#batchWorker = null;
    }
    for (const job of jobs) {
      this.counts.workers--;
      this.#here(job.input, job.offset).then(job.resolve, job.reject);
    }
  }

  /** Stops the workers (pending jobs are abandoned); later calls do nothing. */
  close(): void {
    for (const w of this.#workers ?? []) {
      w.worker.terminate();
      w.inFlight.clear();
    }
    this.#workers = [];
    this.#batch = [];
    this.#batchWorker = null;
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
