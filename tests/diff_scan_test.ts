/**
 * The diff's two-thread scan (lib/export/diff_scan.ts): the main thread and a worker
 * decide the same clusters as an independent byte-by-byte reading of the disks, with
 * every mode, unaligned sizes, a base shorter than the source, cluster sizes from 512
 * bytes to 2 MiB; a worker that cannot read leaves its chunks to the main thread.
 */
import assert from "node:assert/strict";
import {
  type DiskSource,
  openDiskSource,
  type SharedFile,
  sharedFileOf,
} from "../lib/io/disk_source.ts";
import {
  BASE_DATA,
  COMPARE,
  planDiffJob,
  runDiffJob,
  SOURCE_DATA,
} from "../lib/export/diff_scan.ts";
import { exportQcow2 } from "../lib/export/export.ts";
import { checkClean, imagesEqual, pseudoRandom, qemu, qemuTest, withTempDir } from "./helpers.ts";

const MiB = 1 << 20;

type Runs = [number, number, number][];

/** What a mode decides for cluster c, from the bytes (zeros past each limit). */
function expected(src: Uint8Array, base: Uint8Array, cs: number, runs: Runs): number[] {
  const at = (d: Uint8Array, i: number) => (i < d.length ? d[i] : 0);
  const out: number[] = [];
  for (const [first, last, mode] of runs) {
    for (let c = first; c <= last; c++) {
      let hit = false;
      for (let i = c * cs; i < (c + 1) * cs && !hit; i++) {
        hit = mode === COMPARE
          ? at(src, i) !== at(base, i)
          : mode === SOURCE_DATA
          ? at(src, i) !== 0
          : at(base, i) !== 0;
      }
      if (hit) out.push(c);
    }
  }
  return out;
}

/** SOURCE and BASE files: BASE's bytes with some clusters changed, zeroed, cut short. */
async function disks(dir: string, cs: number, srcSize: number, baseSize: number, seed: number) {
  const base = pseudoRandom(baseSize, seed);
  base.fill(0, 3 * cs, 5 * cs); // zeros in both
  const src = new Uint8Array(srcSize);
  src.set(base.subarray(0, Math.min(baseSize, srcSize)));
  const clusters = Math.ceil(srcSize / cs);
  for (let k = 0; k < clusters / 7; k++) {
    const c = (k * 7919 + seed) % clusters;
    src[c * cs + ((k * 131) % cs)] ^= 1 + (k % 255); // one byte of a cluster
  }
  src.fill(0, 8 * cs, 9 * cs); // zeroed in the source
  await Deno.writeFile(`${dir}/s.raw`, src);
  await Deno.writeFile(`${dir}/b.raw`, base);
  return { src, base };
}

async function scan(dir: string, cs: number, limits: [number, number], runs: Runs, opts: {
  chunkBytes: number;
  files?: (f: SharedFile[]) => SharedFile[];
}) {
  const sources: [DiskSource, DiskSource] = [
    await openDiskSource(`${dir}/s.raw`),
    await openDiskSource(`${dir}/b.raw`),
  ];
  try {
    const planned = planDiffJob(runs, cs, limits, opts.chunkBytes);
    assert.ok(planned !== null);
    let read = 0;
    const shared = sources.map(sharedFileOf).filter((f) => f !== null);
    assert.equal(shared.length, 2);
    const files = (opts.files ?? ((f) => f))(shared);
    const r = await runDiffJob(planned.job, sources, files, (n) => read += n, true);
    assert.equal(read, planned.bytes);
    return { clusters: [...r.clusters], helperChunks: r.helperChunks, chunks: planned.job };
  } finally {
    sources.forEach((s) => s.close());
  }
}

Deno.test("diff scan: two threads decide as the bytes say, every mode, a short base", async () => {
  await withTempDir(async (dir) => {
    for (const [cs, chunkBytes] of [[65536, 256 << 10], [512, 16 << 10], [2 << 20, 2 << 20]]) {
      const srcSize = 24 * cs + 700; // the last cluster partial
      const baseSize = 17 * cs + 100; // shorter, unaligned
      const { src, base } = await disks(dir, cs, srcSize, baseSize, cs % 97);
      const limits: [number, number] = [srcSize, baseSize];
      const guest = Math.ceil(srcSize / cs);
      const baseClusters = Math.ceil(baseSize / cs);
      const runs: Runs = [
        [0, 9, COMPARE],
        [10, 11, SOURCE_DATA],
        [12, 13, BASE_DATA],
        [15, baseClusters - 1, COMPARE],
        [baseClusters, guest - 1, SOURCE_DATA],
      ];
      const want = expected(src, base, cs, runs);
      assert.ok(want.length > 3 && want.length < guest - 3, `cs ${cs}: ${want}`);
      const r = await scan(dir, cs, limits, runs, { chunkBytes });
      assert.deepEqual(r.clusters, want, `cluster size ${cs}`);
      if (r.chunks.chunkCount > 2) assert.ok(r.helperChunks > 0, `cs ${cs}: the worker helped`);
    }
  });
});

Deno.test("diff scan: a worker that cannot read leaves its chunks to the main thread", async () => {
  await withTempDir(async (dir) => {
    const cs = 4096;
    const { src, base } = await disks(dir, cs, 300 * cs, 300 * cs, 5);
    const runs: Runs = [[0, 299, COMPARE]];
    const want = expected(src, base, cs, runs);
    // The worker finds another file at the path: it takes no chunk.
    const r = await scan(dir, cs, [300 * cs, 300 * cs], runs, {
      chunkBytes: 16 * cs,
      files: (f) => f.map((x) => ({ ...x, ino: x.ino + 1 })),
    });
    assert.equal(r.helperChunks, 0);
    assert.deepEqual(r.clusters, want);
    // A path the worker cannot open at all.
    const gone = await scan(dir, cs, [300 * cs, 300 * cs], runs, {
      chunkBytes: 16 * cs,
      files: (f) => f.map((x) => ({ ...x, path: `${dir}/missing` })),
    });
    assert.equal(gone.helperChunks, 0);
    assert.deepEqual(gone.clusters, want);
  });
});

Deno.test("diff scan: a source that shrank fails on the main thread, named", async () => {
  await withTempDir(async (dir) => {
    const cs = 4096;
    await disks(dir, cs, 64 * cs, 64 * cs, 3);
    const runs: Runs = [[0, 79, COMPARE]];
    // Limits past the files' ends: the worker's reads end early, then the main thread's.
    await assert.rejects(
      scan(dir, cs, [80 * cs, 64 * cs], runs, { chunkBytes: 8 * cs }),
      /s\.raw ended at byte (262144|294912) .* the source shrank/,
    );
  });
});

qemuTest("export --diff of two 72 MiB disks (two threads) rebuilds SOURCE over BASE", async () => {
  await withTempDir(async (dir) => {
    const cs = 65536;
    const size = 72 * MiB + 4096; // enough to read for the worker; a partial last cluster
    const { src } = await disks(dir, cs, size, size - 3 * cs, 11);
    const out = `${dir}/d.qcow2`;
    const e = await exportQcow2(`${dir}/s.raw`, { base: `${dir}/b.raw` });
    await Deno.writeFile(out, e.stream);
    const base = await Deno.readFile(`${dir}/b.raw`);
    const clusters = Math.ceil(size / cs);
    assert.deepEqual([...e.clusters], expected(src, base, cs, [[0, clusters - 1, COMPARE]]));
    await checkClean(out);
    await qemu(["rebase", "-u", "-b", `${dir}/b.raw`, "-F", "raw", out]);
    assert.ok(await imagesEqual(out, `${dir}/s.raw`, "qcow2", "raw"));
  });
});

Deno.test("diff scan: runs too fragmented to plan are left to the window scan", () => {
  function* scattered(n: number): Generator<[number, number, number]> {
    for (let i = 0; i < n; i++) yield [2 * i, 2 * i, COMPARE];
  }
  assert.ok(planDiffJob(scattered(1000), 65536, [1 << 30, 1 << 30]) !== null);
  assert.equal(planDiffJob(scattered((1 << 18) + 1), 65536, [1 << 40, 1 << 40]), null);
  // Chunks of 4 clusters across 3 runs of 5 (COMPARE reads twice the bytes).
  const job = planDiffJob([[0, 4, COMPARE], [10, 14, SOURCE_DATA], [20, 24, BASE_DATA]], 512, [
    1 << 20,
    1 << 20,
  ], 2048)!;
  assert.equal(job.job.chunkCount, 4);
  assert.deepEqual([...job.job.chunkBytes], [4096, 2560, 2048, 1536]);
  assert.equal(job.bytes, 5 * 512 * 2 + 5 * 512 + 5 * 512);
});
