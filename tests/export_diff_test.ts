/**
 * `export --diff BASE` and the `qcow2-to-stdout` drop-in: only the clusters that differ
 * from BASE are written, and the diff with BASE as its backing file
 * (`qemu-img rebase -u -b base.raw -F raw diff.qcow2`) reads exactly as SOURCE.
 * Also the XAPI defects compat.md lists: a short last base cluster that still matches
 * is not exported, and intervals are never counted twice.
 */
import assert from "node:assert/strict";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { type ExportOptions, exportQcow2 } from "../lib/export/export.ts";
import {
  checkClean,
  CLI,
  imagesEqual,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const KiB = 1024;
const MiB = 1 << 20;
const CS = 64 * KiB;

/** Rebases the diff onto `base` and checks it reads as `source`. */
async function assertRebuilds(diff: string, base: string, source: string): Promise<void> {
  await checkClean(diff);
  await qemu(["rebase", "-u", "-b", base, "-F", "raw", diff]);
  assert.ok(await imagesEqual(diff, source, "qcow2", "raw"), `${diff} over ${base} ≠ ${source}`);
}

/** `export SOURCE --diff BASE` with hint files through the CLI; checks the rebuild. */
async function cliDiff(
  source: string,
  base: string,
  out: string,
  sourceHint: string,
  baseHint: string,
  extra: string[] = [],
): Promise<void> {
  const r = await runCli([
    "export",
    source,
    "-o",
    out,
    "--diff",
    base,
    "--allocation",
    sourceHint,
    "--base-allocation",
    baseHint,
    ...extra,
  ]);
  assert.equal(r.code, 0, r.stderr);
  await assertRebuilds(out, base, source);
}

/** qemu-img map and info (JSON) of a qcow2 copy of `dir/NAME.raw`, as `dir/NAME.map|info`. */
async function qemuHints(dir: string, ...names: string[]): Promise<void> {
  for (const name of names) {
    const q = `${dir}/${name}.q`;
    await qemu(["convert", "-f", "raw", "-O", "qcow2", `${dir}/${name}.raw`, q]);
    await Deno.writeTextFile(`${dir}/${name}.map`, await qemu(["map", "--output=json", q]));
    await Deno.writeTextFile(`${dir}/${name}.info`, await qemu(["info", "--output=json", q]));
  }
}

async function exportTo(src: string, out: string, options: ExportOptions) {
  const e = await exportQcow2(src, options);
  await Deno.writeFile(out, e.stream);
  return e;
}

/**
 * BASE: 8 MiB + 1000 bytes with data in clusters 0–3, 10, 20 and the short last
 * one (128). SOURCE (12 MiB): cluster 1 changed, 10 zeroed, 50 new, cluster 128 the
 * same bytes followed by zeros, 150 new data past BASE's end; the rest unchanged.
 */
async function pair(dir: string) {
  const baseSize = 8 * MiB + 1000;
  const base = new Uint8Array(baseSize);
  base.set(pseudoRandom(4 * CS, 1), 0);
  base.set(pseudoRandom(CS, 2), 10 * CS);
  base.set(pseudoRandom(100, 3), 20 * CS + 7);
  base.set(pseudoRandom(1000, 4), 128 * CS);
  const source = new Uint8Array(12 * MiB);
  source.set(base);
  source[1 * CS + 12345] ^= 0xff;
  source.fill(0, 10 * CS, 11 * CS);
  source.set(pseudoRandom(10, 5), 50 * CS + 3);
  source.set(pseudoRandom(3000, 6), 150 * CS);
  await Deno.writeFile(`${dir}/base.raw`, base);
  await Deno.writeFile(`${dir}/source.raw`, source);
  return { base: `${dir}/base.raw`, source: `${dir}/source.raw`, expected: [1, 10, 50, 150] };
}

qemuTest("diff: only changed clusters; zeroed and new ones; rebuilds over BASE", async () => {
  await withTempDir(async (dir) => {
    const { base, source, expected } = await pair(dir);
    const e = await exportTo(source, `${dir}/d.qcow2`, { base });
    assert.deepEqual([...e.clusters], expected);
    await assertRebuilds(`${dir}/d.qcow2`, base, source);
    // The zeroed cluster is a data cluster of zeros, not a hole.
    const map = JSON.parse(await qemu(["map", "--output=json", `${dir}/d.qcow2`])) as {
      start: number;
      depth: number;
      data: boolean;
    }[];
    assert.ok(map.some((x) => x.start === 10 * CS && x.depth === 0 && x.data));
    // Sparse copies (holes where zeros are): the data extents of both are used.
    for (const name of ["base", "source"]) {
      const r = await run("cp", ["--sparse=always", `${dir}/${name}.raw`, `${dir}/${name}-s.raw`]);
      assert.equal(r.code, 0, r.stderr);
    }
    const sparse = await exportTo(`${dir}/source-s.raw`, `${dir}/s.qcow2`, {
      base: `${dir}/base-s.raw`,
    });
    assert.deepEqual([...sparse.clusters], expected);
    await assertRebuilds(`${dir}/s.qcow2`, `${dir}/base-s.raw`, source);
  });
});

qemuTest("diff: a source smaller than BASE, with unaligned sizes", async () => {
  await withTempDir(async (dir) => {
    const base = pseudoRandom(8 * MiB, 9);
    const source = base.slice(0, 6 * MiB + 700);
    source.fill(0, 6 * MiB + 512); // bytes up to the 512 boundary are padding
    source[4 * MiB] ^= 1;
    await Deno.writeFile(`${dir}/b.raw`, base);
    await Deno.writeFile(`${dir}/s.raw`, source);
    const e = await exportTo(`${dir}/s.raw`, `${dir}/d.qcow2`, { base: `${dir}/b.raw` });
    // Cluster 96 holds the source's last 700 bytes, of which 188 differ (zeros).
    assert.deepEqual([...e.clusters], [64, 96]);
    await assertRebuilds(`${dir}/d.qcow2`, `${dir}/b.raw`, `${dir}/s.raw`);
  });
});

qemuTest("diff: an identical source gives an empty diff, an empty base a full one", async () => {
  await withTempDir(async (dir) => {
    const { base, source } = await pair(dir);
    const same = await exportTo(base, `${dir}/same.qcow2`, { base });
    assert.equal(same.clusters.count, 0);
    await assertRebuilds(`${dir}/same.qcow2`, base, base);
    await Deno.writeFile(`${dir}/empty.raw`, new Uint8Array(0));
    const full = await exportTo(source, `${dir}/full.qcow2`, { base: `${dir}/empty.raw` });
    const plain = await exportQcow2(source);
    await plain.stream.cancel();
    assert.deepEqual([...full.clusters], [...plain.clusters]);
    await assertRebuilds(`${dir}/full.qcow2`, `${dir}/empty.raw`, source);
  });
});

qemuTest("diff with allocation hints for SOURCE and BASE (CLI, any cluster size)", async () => {
  await withTempDir(async (dir) => {
    const { base, source } = await pair(dir);
    // Hints from qemu-img map of qcow2 copies (what XAPI passes).
    await qemuHints(dir, "base", "source");
    for (const cs of ["512", "64K", "2M"]) {
      const [hs, hb] = [`${dir}/source.map`, `${dir}/base.map`];
      await cliDiff(source, base, `${dir}/d-${cs}.qcow2`, hs, hb, ["-c", cs]);
    }
  });
});

qemuTest("diff: trusted hints export base-only clusters unread; --zero-check", async () => {
  await withTempDir(async (dir) => {
    const { base, source } = await pair(dir);
    const clusters = (size: number, runs: [number, number][]) => {
      const set = new ClusterSet(Math.ceil(size / CS), CS);
      for (const [a, b] of runs) set.addRange(a, b);
      return { virtualSize: size, clusters: set };
    };
    // SOURCE hint: 0–3, 10 (now zero), 50, 128, 150. BASE hint: 0–3, 10, 20, 128.
    const allocation = clusters(12 * MiB, [[0, 3], [10, 10], [50, 50], [128, 128], [150, 150]]);
    const baseAllocation = clusters(8 * MiB + 1000, [[0, 3], [10, 10], [20, 20], [128, 128]]);
    // Clusters in both hints are compared; 50 and 150 are taken unread; 20 (only in
    // the base hint — the source hint says it is empty) is exported as it is.
    const e = await exportTo(source, `${dir}/d.qcow2`, { base, allocation, baseAllocation });
    assert.deepEqual([...e.clusters], [1, 10, 20, 50, 150]);
    // The source really holds base's bytes at 20, so the rebuild still matches.
    await assertRebuilds(`${dir}/d.qcow2`, base, source);
    // A hint naming zero clusters past BASE's end: taken as data unless --zero-check.
    const wide = clusters(12 * MiB, [[0, 3], [10, 10], [50, 50], [128, 128], [150, 170]]);
    const loose = await exportTo(source, `${dir}/l.qcow2`, { base, allocation: wide });
    assert.ok(loose.clusters.has(160));
    await assertRebuilds(`${dir}/l.qcow2`, base, source);
    const checked = await exportTo(source, `${dir}/c.qcow2`, {
      base,
      allocation: wide,
      zeroCheck: true,
    });
    // 20 again: the source hint leaves it out and BASE (no hint: read) holds data there.
    assert.deepEqual([...checked.clusters], [1, 10, 20, 50, 150]);
    await assertRebuilds(`${dir}/c.qcow2`, base, source);
  });
});

qemuTest(
  "diff: interval hints split at a cluster never count it twice; overlaps are refused",
  async () => {
    await withTempDir(async (dir) => {
      const { base, source } = await pair(dir);
      await Deno.writeTextFile(
        `${dir}/s.json`,
        `{"virtual_size":${12 * MiB},"cluster_bits":16,"data_clusters":[[0,1],[2,60],[128,191]]}`,
      );
      await Deno.writeTextFile(
        `${dir}/b.json`,
        `{"virtual_size":${
          8 * MiB + 1000
        },"cluster_bits":16,"data_clusters":[[0,1],[2,3],[10,20],[128,128]]}`,
      );
      await cliDiff(source, base, `${dir}/d.qcow2`, `${dir}/s.json`, `${dir}/b.json`);
      // Overlapping intervals are not a valid hint (issue 8): refused, naming the entry.
      await Deno.writeTextFile(
        `${dir}/o.json`,
        `{"virtual_size":${12 * MiB},"cluster_bits":16,"data_clusters":[[0,60],[2,5],[128,191]]}`,
      );
      const r = await runCli([
        "export",
        source,
        "-o",
        `${dir}/o.qcow2`,
        "--diff",
        base,
        "--allocation",
        `${dir}/o.json`,
      ]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /data_clusters\[1\] \(cluster 2\) is not after cluster 60/);
    });
  },
);

qemuTest("qcow2-to-stdout: XAPI's flags, with qemu-img map/info on descriptors", async () => {
  await withTempDir(async (dir) => {
    const { base, source } = await pair(dir);
    await qemuHints(dir, "base", "source");
    // Plain: the same bytes as `export` with the defaults.
    const plain = await runCli(["qcow2-to-stdout", source]);
    assert.equal(plain.code, 0, plain.stderr);
    const ours = await runCli(["export", source]);
    assert.deepEqual(plain.stdout, ours.stdout);
    // Diff with all four descriptors, -c and -r as XAPI may pass them.
    const out = `${dir}/d.qcow2`;
    const r = await run("bash", [
      "-c",
      `exec 3<"$1.map" 4<"$1.info" 5<"$2.map" 6<"$2.info"
       "${Deno.execPath()}" run -A "${CLI}" qcow2-to-stdout "$3" -c 65536 -r 16 --diff "$4" \
         --json-header-map 3 --json-header-info 4 \
         --json-header-diff-map 5 --json-header-diff-info 6 > "$5"`,
      "x",
      `${dir}/source`,
      `${dir}/base`,
      source,
      base,
      out,
    ]);
    assert.equal(r.code, 0, r.stderr);
    await assertRebuilds(out, base, source);
    // Errors: a missing input, unsupported flags, a diff map without --diff.
    const missing = await runCli(["qcow2-to-stdout", `${dir}/nope.raw`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /nope\.raw: no such file/);
    const d = await runCli(["qcow2-to-stdout", source, "-d"]);
    assert.equal(d.code, 1);
    assert.match(d.stderr, /external data files/);
    const noDiff = await runCli(["qcow2-to-stdout", source, "--json-header-diff-map", "0"]);
    assert.equal(noDiff.code, 2);
    assert.match(noDiff.stderr, /needs --diff/);
    const badC = await runCli(["qcow2-to-stdout", source, "-c", "1234"]);
    assert.equal(badC.code, 2);
  });
});

Deno.test("diff: a missing base is one line and status 1", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/s.raw`, MiB, [[0, pseudoRandom(10)]]);
    const r = await runCli(["export", `${dir}/s.raw`, "-o", `${dir}/o`, "--diff", `${dir}/b.raw`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: cannot open .*b\.raw: no such file or directory\n$/);
  });
});
