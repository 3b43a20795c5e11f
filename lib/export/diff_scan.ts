/**
 * The diff's pass 1 for two plain files or devices, on two threads: the clusters to
 * read are cut into chunks of 16 MiB, and the main thread and one worker take chunk
 * after chunk from a shared counter, each reading both disks' bytes of its chunk with
 * blocking reads (1 MiB windows that stay in the processor's cache) and comparing
 * them natively (a memcmp: `Buffer.compare` on the main thread, libc's `memcmp`
 * through FFI in the worker, which thus needs `--allow-ffi` and no Node
 * compatibility layer). Each thread does about half of the reading and comparing,
 * whichever starts first or runs faster. The worker opens the two disks by their
 * paths and checks that they are the files the main thread has open.
 *
 * The main thread never waits for the worker to start: when it has taken the last
 * chunk before the worker was ready, the worker is told to stop. A chunk the worker
 * could not finish (any failure) is read again on the main thread, whose reads
 * report errors as every other read does. The decisions are one bit per read
 * cluster in shared memory. The scanning code ({@link makeChunkScanner}) runs on
 * both threads; the worker runs its source text (from a `blob:` URL), so this works
 * the same from a checkout, the bundled file and a compiled binary.
 *
 * @module
 */
import { sameTest } from "../zero.ts";
import type { DiskSource, SharedFile } from "../io/disk_source.ts";
import { YIELD_BYTES, yieldToEventLoop } from "./scan.ts";

/** A cluster is exported when the two disks' bytes differ. */
export const COMPARE = 1;
/** A cluster is exported when SOURCE's bytes are not all zeros (BASE is not read). */
export const SOURCE_DATA = 2;
/** A cluster is exported when BASE's bytes are not all zeros (SOURCE is not read). */
export const BASE_DATA = 3;

/** Clusters read with one read of each disk (the window stays in the processor's cache). */
const WINDOW_BYTES = 1024 * 1024;
/** Clusters per chunk, the unit the threads take turns on. */
const CHUNK_BYTES = 16 * 1024 * 1024;
/** At most this many segments are planned (32 bytes each), else the plain scan runs. */
const MAX_SEGMENTS = 1 << 18;
/** At most this many clusters are read (their bits are indexed by 32-bit integers). */
const MAX_BITS = 2 ** 31;
/** Bytes compared in one call before the clusters inside are compared one by one. */
const GROUP_BYTES = 64 * 1024;

// The shared control words.
const NEXT = 0; // the next chunk to take
const STATE = 1; // the worker's state
const STOP = 2; // 1: the worker stops taking chunks
const IDLE = 0;
// RUNNING = 1: the worker took its first chunk or is about to
const CANCELLED = 2;

/** The work of a scan, all in shared memory (posted to the worker as it is). */
export interface DiffJob {
  clusterSize: number;
  /** Bytes of each disk read at a time (whole clusters). */
  windowBytes: number;
  /** Bytes compared in one call before the clusters inside are compared one by one. */
  groupBytes: number;
  /** Bytes at or past these offsets of SOURCE and BASE read as zeros. */
  limits: [number, number];
  /** Segments `[first, last, mode, bit]`: clusters first…last, their bits from `bit` on. */
  segments: Float64Array;
  segmentCount: number;
  /** Chunk k is segments `chunks[k]` up to `chunks[k + 1]`. */
  chunks: Float64Array;
  /** Bytes read by each chunk (for progress). */
  chunkBytes: Float64Array;
  chunkCount: number;
  /** One bit per read cluster: set when it is exported. */
  bits: Int32Array;
  /** Chunk k is done when `done[k]` is 1. */
  done: Uint8Array;
  /** NEXT, STATE, STOP. */
  control: Int32Array;
}

/** Bytes of a shared typed array. */
function shared(bytes: number): SharedArrayBuffer {
  return new SharedArrayBuffer(Math.max(8, bytes));
}

/**
 * The job for runs `[first, last, mode]` (ascending, mode {@link COMPARE},
 * {@link SOURCE_DATA} or {@link BASE_DATA}), cut into chunks; null when the runs are
 * so fragmented that the segments would take more than a few MiB, or hold more than
 * 2^31 clusters. Also returns the bytes to read.
 */
export function planDiffJob(
  runs: Iterable<readonly [number, number, number]>,
  clusterSize: number,
  limits: [number, number],
  chunkBytes = CHUNK_BYTES,
): { job: DiffJob; bytes: number } | null {
  const chunkClusters = Math.max(1, Math.floor(chunkBytes / clusterSize));
  let segs = new Float64Array(4 * 256);
  let count = 0;
  const chunkStarts: number[] = [0];
  const chunkRead: number[] = [];
  let inChunk = 0;
  let bytes = 0;
  let reading = 0;
  let bit = 0;
  for (const [first, last, mode] of runs) {
    for (let a = first; a <= last;) {
      const n = Math.min(last - a + 1, chunkClusters - inChunk);
      if (count === MAX_SEGMENTS || bit + n > MAX_BITS) return null;
      if (4 * count === segs.length) {
        const grown = new Float64Array(segs.length * 2);
        grown.set(segs);
        segs = grown;
      }
      segs.set([a, a + n - 1, mode, bit], 4 * count++);
      bit += n;
      const read = n * clusterSize * (mode === COMPARE ? 2 : 1);
      reading += read;
      bytes += read;
      a += n;
      if ((inChunk += n) === chunkClusters) {
        chunkStarts.push(count);
        chunkRead.push(reading);
        inChunk = 0;
        reading = 0;
      }
    }
  }
  if (inChunk > 0) {
    chunkStarts.push(count);
    chunkRead.push(reading);
  }
  const chunkCount = chunkRead.length;
  const segments = new Float64Array(shared(32 * count));
  segments.set(segs.subarray(0, 4 * count));
  const chunks = new Float64Array(shared(8 * chunkStarts.length));
  chunks.set(chunkStarts);
  const job: DiffJob = {
    clusterSize,
    windowBytes: WINDOW_BYTES,
    groupBytes: GROUP_BYTES,
    limits,
    segments,
    segmentCount: count,
    chunks,
    chunkBytes: Float64Array.from(chunkRead),
    chunkCount,
    bits: new Int32Array(shared(4 * Math.ceil(bit / 32))),
    done: new Uint8Array(shared(chunkCount)),
    control: new Int32Array(shared(12)),
  };
  return { job, bytes };
}

/** Reads `buf.length` bytes of input `which` (0 SOURCE, 1 BASE) at `at`. */
type ReadInput = (which: number, buf: Uint8Array, at: number) => void;

/** `same(start, end)`: true when two buffers hold the same bytes in `[start, end)`. */
type SameTest = (a: Uint8Array, b: Uint8Array) => (start: number, end: number) => boolean;

/**
 * Returns `scan(k, read)`: decides chunk k of `job`, reading with `read`, comparing
 * with `same`, and returns the bytes read. Self-contained (no outside names: the
 * worker runs its source text); the mode numbers are {@link COMPARE},
 * {@link SOURCE_DATA}, {@link BASE_DATA}.
 */
export function makeChunkScanner(
  same: SameTest,
  job: DiffJob,
): (k: number, read: ReadInput) => number {
  const cs = job.clusterSize;
  const span = Math.max(1, Math.floor(job.windowBytes / cs));
  const group = Math.max(1, Math.floor(job.groupBytes / cs));
  const size = span * cs;
  const bufs = [new Uint8Array(size), new Uint8Array(size)];
  const zeros = new Uint8Array(size);
  // By mode: 1 the two disks, 2 SOURCE and zeros, 3 BASE and zeros.
  const tests = [same(bufs[0], bufs[1]), same(bufs[0], zeros), same(bufs[1], zeros)];
  const { segments: segs, chunks, bits } = job;
  return (k, read) => {
    let bytes = 0;
    for (let i = chunks[k]; i < chunks[k + 1]; i++) {
      const first = segs[4 * i];
      const last = segs[4 * i + 1];
      const mode = segs[4 * i + 2];
      const bit = segs[4 * i + 3] - first;
      const test = tests[mode - 1];
      for (let c = first; c <= last; c += span) {
        const n = Math.min(span, last - c + 1);
        const len = n * cs;
        if (mode !== 3) read(0, bufs[0].subarray(0, len), c * cs);
        if (mode !== 2) read(1, bufs[1].subarray(0, len), c * cs);
        bytes += mode === 1 ? 2 * len : len;
        for (let g = 0; g < n; g += group) {
          const end = Math.min(n, g + group);
          if (test(g * cs, end * cs)) continue;
          for (let j = g; j < end; j++) {
            if (end - g > 1 && test(j * cs, (j + 1) * cs)) continue;
            const b = bit + c + j;
            Atomics.or(bits, b >>> 5, 1 << (b & 31));
          }
        }
      }
    }
    return bytes;
  };
}

/**
 * {@link SameTest} through libc's `memcmp` (the worker has no `node:buffer`: loading
 * Node's compatibility layer would double its start-up). Self-contained.
 */
function ffiSameTest(): SameTest {
  const libc = Deno.dlopen(
    "libc.so.6",
    {
      memcmp: { parameters: ["buffer", "buffer", "usize"], result: "i32" },
    } as const,
  ).symbols;
  return (a, b) => (start, end) =>
    libc.memcmp(a.subarray(start, end), b.subarray(start, end), BigInt(end - start)) === 0;
}

/**
 * Returns a reader of `file` (a `Deno.FsFile`) like a disk source's `readAtSync`:
 * bytes at or past `limit` read as zeros, and it throws when the file ends before.
 * Self-contained: the worker runs its source text.
 */
function makeFileReader(
  file: Deno.FsFile,
  limit: number,
): (buf: Uint8Array, at: number) => void {
  let position = -1;
  return (buf, at) => {
    const want = Math.max(0, Math.min(buf.length, limit - at));
    if (want < buf.length) buf.fill(0, want);
    if (want === 0) return;
    if (position !== at) file.seekSync(at, 0); // Deno.SeekMode.Start
    position = -1;
    let got = 0;
    while (got < want) {
      const n = file.readSync(buf.subarray(got, want));
      if (n === null || n === 0) throw new Error(`the file ended at byte ${at + got}`);
      got += n;
    }
    position = at + got;
  };
}

/** The worker's whole work: see the module notes. Self-contained (run from its source text). */
function workerMain(
  job: DiffJob & { files: SharedFile[] },
  makeScanner: typeof makeChunkScanner,
  makeReader: typeof makeFileReader,
  same: () => SameTest,
): void {
  const scope = self as unknown as { postMessage(message: unknown): void; close(): void };
  const control = job.control;
  const files: Deno.FsFile[] = [];
  try {
    const readers = job.files.map((f, i) => {
      const file = Deno.openSync(f.path);
      files.push(file);
      const info = file.statSync();
      if (info.dev !== f.dev || info.ino !== f.ino) throw new Error(`${f.path} was replaced`);
      return makeReader(file, job.limits[i]);
    });
    const scan = makeScanner(same(), job);
    const read = (which: number, buf: Uint8Array, at: number) => readers[which](buf, at);
    // 1 = STATE, 0 = IDLE, 1 = RUNNING: the main thread may have finished already.
    if (Atomics.compareExchange(control, 1, 0, 1) !== 0) return scope.close();
    // 2 = STOP, 0 = NEXT
    while (Atomics.load(control, 2) === 0) {
      const k = Atomics.add(control, 0, 1);
      if (k >= job.chunkCount) break;
      scan(k, read);
      Atomics.store(job.done, k, 1);
    }
    scope.postMessage({ ok: true });
  } catch (err) {
    scope.postMessage({ ok: false, error: String(err) });
  } finally {
    for (const file of files) file.close();
  }
}

const WORKER_SOURCE = `const makeScanner = ${makeChunkScanner.toString()};
const makeReader = ${makeFileReader.toString()};
const main = ${workerMain.toString()};
const same = ${ffiSameTest.toString()};
self.onmessage = ({ data }) => main(data, makeScanner, makeReader, same);
`;

let workerUrl: string | null = null;

/** The helping worker, started; null when no worker can start here. */
function startHelper(
  job: DiffJob,
  files: SharedFile[],
): { finished(): Promise<void>; terminate(): void; readonly failed: boolean } | null {
  let worker: Worker;
  try {
    if (Deno.build.os !== "linux") return null; // the worker's memcmp is in libc.so.6
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
    workerUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    worker = new Worker(workerUrl, { type: "module" });
  } catch {
    return null;
  }
  let failed = false;
  const ended = new Promise<void>((resolve) => {
    worker.onmessage = ({ data }) => {
      failed = !data.ok;
      resolve();
    };
    worker.onerror = (e) => {
      e.preventDefault();
      failed = true;
      resolve();
    };
  });
  worker.postMessage({ ...job, files });
  return {
    get failed() {
      return failed;
    },
    async finished() {
      // A worker that has not started yet never will.
      if (Atomics.compareExchange(job.control, STATE, IDLE, CANCELLED) === IDLE) return;
      await ended;
    },
    terminate: () => worker.terminate(),
  };
}

/** What {@link runDiffJob} did. */
export interface DiffJobResult {
  /** The clusters to export, ascending. */
  clusters: Iterable<number>;
  /** Chunks the worker decided. */
  helperChunks: number;
}

/**
 * Runs `job`: on this thread, reading `sources` (SOURCE, BASE) with their blocking
 * reads, and, with `files` (the same disks by path), on a worker as well. `onRead`
 * gets the bytes read, chunk by chunk. `waitForHelper` (for tests): the main thread
 * starts once the worker has.
 */
export async function runDiffJob(
  job: DiffJob,
  sources: [DiskSource, DiskSource],
  files: SharedFile[] | null,
  onRead: (bytes: number) => void,
  waitForHelper = false,
): Promise<DiffJobResult> {
  const { control, done, chunkCount, chunkBytes } = job;
  const scan = makeChunkScanner(sameTest, job);
  const read: ReadInput = (which, buf, at) =>
    sources[which].readAtSync!(buf, at, job.limits[which]);
  let reported = 0;
  let sinceYield = 0;
  /** Reports the chunks done (in order). */
  const report = () => {
    let bytes = 0;
    while (reported < chunkCount && Atomics.load(done, reported) === 1) {
      bytes += chunkBytes[reported++];
    }
    if (bytes > 0) onRead(bytes);
  };
  /** {@link report}, and lets the event loop run now and then. */
  const progress = async (k: number) => {
    report();
    if ((sinceYield += chunkBytes[k]) >= YIELD_BYTES) {
      sinceYield = 0;
      await yieldToEventLoop();
    }
  };
  let mine = 0;
  const helper = files && chunkCount > 1 ? startHelper(job, files) : null;
  try {
    for (let waited = 0; helper && waitForHelper && waited < 10_000; waited += 5) {
      if (Atomics.load(control, STATE) !== IDLE || helper.failed) break;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    while (true) {
      const k = Atomics.add(control, NEXT, 1);
      if (k >= chunkCount) break;
      scan(k, read);
      mine++;
      Atomics.store(done, k, 1);
      await progress(k);
    }
    await helper?.finished();
    // What the worker took and did not finish.
    for (let k = 0; k < chunkCount; k++) {
      if (Atomics.load(done, k) === 1) continue;
      scan(k, read);
      Atomics.store(done, k, 1);
      await progress(k);
    }
    report();
  } finally {
    Atomics.store(control, STOP, 1);
    helper?.terminate();
  }
  return { clusters: changedClusters(job), helperChunks: chunkCount - mine };
}

/** The clusters whose bits are set, ascending. */
function* changedClusters(job: DiffJob): Generator<number> {
  const { segments: segs, bits } = job;
  for (let i = 0; i < job.segmentCount; i++) {
    const [first, last, , bit] = segs.subarray(4 * i, 4 * i + 4);
    for (let b = bit; b <= bit + last - first; b++) {
      const word = bits[b >>> 5];
      if (word === 0 && (b & 31) === 0 && b + 31 <= bit + last - first) {
        b += 31;
        continue;
      }
      if ((word & (1 << (b & 31))) !== 0) yield first + b - bit;
    }
  }
}
