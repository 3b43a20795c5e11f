/**
 * `diskstream export` and the library's exportQcow2, checked with qemu-img: sparse,
 * unaligned and empty sources, allocation hints in the three JSON shapes (any hint
 * cluster size), --zero-check, the command line's outputs, progress and error paths.
 */
import assert from "node:assert/strict";
import { parseAllocation } from "../lib/alloc/allocation.ts";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { DiskstreamError, SourceChangedError } from "../lib/errors.ts";
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

const MiB = 1 << 20;

/** Exports `src` with the library into `out` and returns the plan. */
async function exportTo(src: string, out: string, options: ExportOptions = {}) {
  const e = await exportQcow2(src, options);
  await Deno.writeFile(out, e.stream);
  assert.equal((await Deno.stat(out)).size, e.layout.fileSize);
  return e;
}

/** The `[start, length]` of the extents qemu-img map lists as data (depth 0). */
async function dataExtents(image: string): Promise<[number, number][]> {
  const map = JSON.parse(await qemu(["map", "--output=json", image])) as {
    start: number;
    length: number;
    data: boolean;
    depth: number;
  }[];
  return map.filter((e) => e.data && e.depth === 0).map((e) => [e.start, e.length]);
}

/** A sparse 64 MiB + 1000 byte disk with data in clusters 0, 16–17, 500 and the last. */
async function sparseDisk(path: string): Promise<number> {
  const size = 64 * MiB + 1000;
  await writeSparse(path, size, [
    [0, pseudoRandom(4096, 1)],
    [16 * 65536 + 100, pseudoRandom(65536, 2)],
    [500 * 65536, pseudoRandom(10, 3)],
    [size - 1000, pseudoRandom(1000, 4)],
  ]);
  return size;
}

qemuTest("export: a sparse unaligned disk; only its non-zero clusters, last one kept", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    const size = await sparseDisk(src);
    const out = `${dir}/disk.qcow2`;
    const e = await exportTo(src, out);
    assert.equal(e.layout.virtualSize, Math.ceil(size / 512) * 512);
    assert.deepEqual([...e.clusters], [0, 16, 17, 500, 1024]);
    await checkClean(out);
    assert.ok(await imagesEqual(src, out, "raw", "qcow2"));
    assert.deepEqual(await dataExtents(out), [
      [0, 65536],
      [16 * 65536, 2 * 65536],
      [500 * 65536, 65536],
      [1024 * 65536, e.layout.virtualSize - 1024 * 65536],
    ]);
    const info = JSON.parse(await qemu(["info", "--output=json", out]));
    assert.equal(info["virtual-size"], 64 * MiB + 1024);
    // With hole detection, pass 1 reads only the data extents, not 64 MiB.
    if (Deno.build.os === "linux") assert.ok(e.scannedBytes < 4 * MiB, `${e.scannedBytes}`);
  });
});

qemuTest("export: empty, all-zero and tiny sources", async () => {
  await withTempDir(async (dir) => {
    const empty = `${dir}/empty.raw`;
    await Deno.writeFile(empty, new Uint8Array(0));
    const e = await exportTo(empty, `${dir}/empty.qcow2`);
    assert.equal(e.layout.fileSize, 3 * 65536);
    await checkClean(`${dir}/empty.qcow2`);
    const zeros = `${dir}/zeros.raw`;
    await Deno.writeFile(zeros, new Uint8Array(3 * MiB));
    const z = await exportTo(zeros, `${dir}/zeros.qcow2`, { clusterSize: 4096 });
    assert.equal(z.clusters.count, 0);
    assert.ok(await imagesEqual(zeros, `${dir}/zeros.qcow2`, "raw", "qcow2"));
    assert.deepEqual(await dataExtents(`${dir}/zeros.qcow2`), []);
    const tiny = `${dir}/tiny.raw`;
    await Deno.writeFile(tiny, new TextEncoder().encode("hello, disk"));
    const t = await exportTo(tiny, `${dir}/tiny.qcow2`, { clusterSize: 512 });
    assert.equal(t.layout.virtualSize, 512);
    assert.ok(await imagesEqual(tiny, `${dir}/tiny.qcow2`, "raw", "qcow2"));
  });
});

qemuTest("export: data only late in a cluster, zeros written out (not holes)", async () => {
  await withTempDir(async (dir) => {
    // Written in full, so there are no holes to skip: every cluster is looked at.
    const bytes = new Uint8Array(8 * MiB + 512);
    bytes[3 * 65536 + 65535] = 1; // the last byte of cluster 3
    bytes[9 * 65536 + 5000] = 2; // after the first 4 KiB of cluster 9
    bytes.set(pseudoRandom(20 * 65536, 8), 20 * 65536); // clusters 20–39
    bytes[bytes.length - 1] = 3; // the last, partial cluster
    const src = `${dir}/late.raw`;
    await Deno.writeFile(src, bytes);
    for (const cs of [4096, 65536, 2 ** 21]) {
      const e = await exportTo(src, `${dir}/late.qcow2`, { clusterSize: cs });
      const expected = new Set<number>();
      bytes.forEach((b, i) => b !== 0 && expected.add(Math.floor(i / cs)));
      assert.deepEqual([...e.clusters], [...expected].sort((a, b) => a - b), `cs ${cs}`);
      assert.ok(await imagesEqual(src, `${dir}/late.qcow2`, "raw", "qcow2"));
    }
  });
});

qemuTest(
  "export: probes in batches (and --direct) — zero first 4 KiB at batch edges, zero runs across them",
  async () => {
    await withTempDir(async (dir) => {
      // 700 clusters of 64 KiB written in full (no holes): the probes go 256 at a time.
      const cs = 65536;
      const bytes = new Uint8Array(700 * cs + 777);
      for (let c = 0; c < 700; c++) if (c % 3 !== 2) bytes[c * cs + (c * 7) % 4096] = 1;
      for (const c of [255, 256, 511, 512, 600]) {
        bytes.fill(0, c * cs, (c + 1) * cs);
        bytes[c * cs + 4096 + c] = 2; // data only after the probed 4 KiB
      }
      bytes.fill(0, 240 * cs, 330 * cs); // a zero run read whole, past a batch's end
      bytes[300 * cs + 65535] = 3; // inside it, the last byte of a cluster
      bytes[bytes.length - 1] = 4; // the last, partial cluster
      const src = `${dir}/batches.raw`;
      await Deno.writeFile(src, bytes);
      // --direct: the probes are O_DIRECT reads, queued together.
      for (const [clusterSize, direct] of [[16384, false], [cs, false], [cs, true]] as const) {
        const e = await exportTo(src, `${dir}/batches.qcow2`, { clusterSize, direct });
        const expected = new Set<number>();
        bytes.forEach((b, i) => b !== 0 && expected.add(Math.floor(i / clusterSize)));
        const what = `cs ${clusterSize}${direct ? " --direct" : ""}`;
        assert.deepEqual([...e.clusters], [...expected].sort((a, b) => a - b), what);
        assert.ok(await imagesEqual(src, `${dir}/batches.qcow2`, "raw", "qcow2"), what);
      }
    });
  },
);

qemuTest(
  "export: probed cluster decisions against every byte — random clusters, holes, zero runs, odd tails",
  async () => {
    await withTempDir(async (dir) => {
      let x = 4242;
      const random = (n: number) => (x = (x * 1_103_515_245 + 12_345) % 2 ** 31) % n;
      for (const [cs, clusters] of [[16384, 1200], [65536, 700], [2 * MiB, 12]]) {
        const size = clusters * cs + [1, 777, 4095, 4097, cs - 1][random(5)];
        const bytes = new Uint8Array(size);
        const writes: [number, Uint8Array][] = [];
        for (let c = 0; c * cs < size;) {
          // Mostly clusters decided by their probe, so that batches run full; now and
          // then one whose probe is zero (read whole), a zero run or a hole.
          const r = random(40);
          const kind = [0, 3, 1, 2, 6, 4, 5][[28, 32, 34, 36, 38, 39, 40].findIndex((w) => r < w)];
          const run = kind === 4 || kind === 5 ? 1 + random(300) : 1; // past batches
          const end = Math.min(c + run, Math.ceil(size / cs));
          for (; c < end; c++) {
            const [lo, hi] = [c * cs, Math.min((c + 1) * cs, size)];
            if (kind === 0) bytes[lo + random(Math.min(4096, hi - lo))] = 1; // in the probe
            if (kind === 1 && hi - lo > 4096) bytes[lo + 4096 + random(hi - lo - 4096)] = 2;
            if (kind === 2) bytes[hi - 1] = 3; // the cluster's (or the disk's) last byte
            if (kind === 3) bytes.set(pseudoRandom(hi - lo, c), lo);
            if (kind !== 5) writes.push([lo, bytes.subarray(lo, hi)]); // 5: a hole, else written
          }
        }
        const src = `${dir}/random.raw`;
        await writeSparse(src, size, writes);
        const expected = new Set<number>();
        bytes.forEach((b, i) => b !== 0 && expected.add(Math.floor(i / cs)));
        for (const direct of [false, true]) {
          const e = await exportTo(src, `${dir}/random.qcow2`, { clusterSize: cs, direct });
          const what = `cs ${cs}, ${size} bytes${direct ? ", --direct" : ""}`;
          assert.deepEqual([...e.clusters], [...expected].sort((a, b) => a - b), what);
          assert.ok(await imagesEqual(src, `${dir}/random.qcow2`, "raw", "qcow2"), what);
        }
      }
    });
  },
);

qemuTest(
  "export: probes of full batches — a zero cluster at the first, middle and last probe of a batch",
  async () => {
    await withTempDir(async (dir) => {
      // Every cluster has data in its probe but a few zero ones: a probe read at the wrong
      // place, or left from the batch before, would make a zero cluster data. Where they
      // sit follows the batches (256 probes; a zero probe reads 4 MiB of clusters whole):
      // at 64 KiB, batch 0 is clusters 0–255 and batch 1 starts at 319 (after 255's read);
      // at 16 KiB, batch 1 starts at 511 and batch 2 at 856.
      const layouts = [
        { cs: 65536, clusters: 600, zero: [255, 319, 500, 574], late: [400] },
        { cs: 16384, clusters: 1200, zero: [255, 600, 1111], late: [] },
      ];
      for (const { cs, clusters, zero, late } of layouts) {
        const bytes = new Uint8Array(clusters * cs + 777);
        // Data somewhere in each probe (its first and last byte too), in the last cluster's 777.
        const at = (c: number) => c * cs + (c * 389) % (c === clusters ? 777 : 4096);
        for (let c = 0; c <= clusters; c++) bytes[at(c)] = zero.includes(c) ? 0 : 1;
        for (const c of late) {
          bytes[at(c)] = 0;
          bytes[c * cs + cs - 1] = 2; // not in the probe: read whole
        }
        const src = `${dir}/full.raw`;
        await Deno.writeFile(src, bytes);
        const expected = [...Array(clusters + 1).keys()].filter((c) => !zero.includes(c));
        for (const direct of [false, true]) {
          const e = await exportTo(src, `${dir}/full.qcow2`, { clusterSize: cs, direct });
          const what = `cs ${cs}${direct ? ", --direct" : ""}`;
          assert.deepEqual([...e.clusters], expected, what);
          assert.ok(await imagesEqual(src, `${dir}/full.qcow2`, "raw", "qcow2"), what);
        }
      }
    });
  },
);

qemuTest("export: a 1 TiB sparse disk (and an allocation hint for it)", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/big.raw`;
    const size = 2 ** 40;
    await writeSparse(src, size, [[700 * 2 ** 30, pseudoRandom(1000, 7)]]);
    const hint = new ClusterSet(size / 2 ** 21, 2 ** 21);
    hint.add((700 * 2 ** 30) / 2 ** 21);
    const e = await exportTo(src, `${dir}/big.qcow2`, {
      allocation: { virtualSize: size, clusters: hint },
    });
    assert.equal(e.scannedBytes, 0, "a trusted hint needs no pass 1");
    assert.equal(e.clusters.count, 32);
    await checkClean(`${dir}/big.qcow2`);
    assert.deepEqual(await dataExtents(`${dir}/big.qcow2`), [[700 * 2 ** 30, 2 ** 21]]);
  });
});

/** The disk of the hint tests: 8 MiB + 1000 bytes, data in the last partial 2 MiB block. */
async function hintDisk(dir: string) {
  const src = `${dir}/h.raw`;
  const size = 8 * MiB + 1000;
  await writeSparse(src, size, [
    [100, pseudoRandom(5000, 11)], // block 0
    [5 * MiB, pseudoRandom(70000, 12)], // block 2
    [size - 500, pseudoRandom(500, 13)], // block 4, partial
  ]);
  return { src, size };
}

qemuTest("export --allocation: legacy, interval and qemu-img map hints", async () => {
  await withTempDir(async (dir) => {
    const { src, size } = await hintDisk(dir);
    const legacy = `{"virtual_size":${size},"cluster_bits":21,"data_clusters":[0,2,4]}`;
    const interval =
      `{"virtual_size":${size},"cluster_bits":21,"data_clusters":[[0,0],[2,2],[4,4]]}`;
    // qemu-img map of a qcow2 copy with 512-byte clusters: an unaligned last extent.
    await qemu([
      "convert",
      "-f",
      "raw",
      "-O",
      "qcow2",
      "-o",
      "cluster_size=512",
      src,
      `${dir}/h.q`,
    ]);
    const map = await qemu(["map", "--output=json", `${dir}/h.q`]);
    const info = await qemu(["info", "--output=json", `${dir}/h.q`]);
    await Deno.writeTextFile(`${dir}/legacy.json`, legacy);
    await Deno.writeTextFile(`${dir}/interval.json`, "\n  " + interval);
    await Deno.writeTextFile(`${dir}/map.json`, map);
    for (const [name, cs] of [["legacy", 65536], ["interval", 512], ["map", 2 ** 21]] as const) {
      const out = `${dir}/${name}.qcow2`;
      const r = await runCli([
        "export",
        src,
        "-o",
        out,
        "-c",
        String(cs),
        "--allocation",
        `${dir}/${name}.json`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      await checkClean(out);
      assert.ok(await imagesEqual(src, out, "raw", "qcow2"), `${name} hint`);
      // The last data extent reaches the end of the disk: the partial cluster is kept.
      const extents = await dataExtents(out);
      const [start, length] = extents[extents.length - 1];
      assert.equal(start + length, Math.ceil(size / 512) * 512, name);
    }
    // The hint's clusters are written as they are: the whole 2 MiB blocks.
    const blocks = await dataExtents(`${dir}/legacy.qcow2`);
    assert.deepEqual(blocks[0], [0, 2 * MiB]);
    // qemu-img map with its info on descriptors (fd:N).
    const out = `${dir}/fd.qcow2`;
    const r = await run("bash", [
      "-c",
      `exec 3<"$1" 4<"$2"; "${Deno.execPath()}" run -A "${CLI}" export "$3" -o "$4" --allocation fd:3`,
      "x",
      `${dir}/map.json`,
      `${dir}/legacy.json`,
      src,
      out,
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(await imagesEqual(src, out, "raw", "qcow2"));
    // parseAllocation of the map with its info gives the disk's clusters at 2 MiB.
    const parsed = parseAllocation(map, 2 ** 21, "map", JSON.parse(info));
    assert.deepEqual([...parsed.clusters.runs()], [[0, 0], [2, 2], [4, 4]]);
    assert.equal(parsed.virtualSize, Math.ceil(size / 512) * 512);
  });
});

qemuTest(
  "export --allocation: only hinted clusters are read; --zero-check drops zeros",
  async () => {
    await withTempDir(async (dir) => {
      const { src, size } = await hintDisk(dir);
      // Hint blocks 1 (all zero) and 2, not 0 or 4 which hold data.
      const hint = { virtualSize: size, clusters: new ClusterSet(5, 2 ** 21) };
      hint.clusters.addRange(1, 2);
      const plain = await exportTo(src, `${dir}/a.qcow2`, { allocation: hint, clusterSize: 65536 });
      assert.equal(plain.clusters.count, 64);
      assert.deepEqual(await dataExtents(`${dir}/a.qcow2`), [[2 * MiB, 4 * MiB]]);
      assert.equal(await imagesEqual(src, `${dir}/a.qcow2`, "raw", "qcow2"), false);
      const checked = await exportTo(src, `${dir}/b.qcow2`, {
        allocation: hint,
        zeroCheck: true,
        clusterSize: 65536,
      });
      // 70000 bytes at 5 MiB: clusters 80 and 81 only.
      assert.deepEqual([...checked.clusters], [80, 81]);
      assert.deepEqual(await dataExtents(`${dir}/b.qcow2`), [[5 * MiB, 2 * 65536]]);
      await checkClean(`${dir}/b.qcow2`);
    });
  },
);

Deno.test("export --allocation: a hint for another disk size is refused", async () => {
  await withTempDir(async (dir) => {
    const { src, size } = await hintDisk(dir);
    const wrong = { virtualSize: size + 4096, clusters: new ClusterSet(5, 2 ** 21) };
    await assert.rejects(
      () => exportQcow2(src, { allocation: wrong }),
      (err) =>
        err instanceof DiskstreamError && /describes a disk of .* bytes but/.test(err.message),
    );
    // The size rounded up to 512 (what qemu-img reports for the raw file) is accepted.
    const rounded = {
      virtualSize: Math.ceil(size / 512) * 512,
      clusters: new ClusterSet(5, 2 ** 21),
    };
    const e = await exportQcow2(src, { allocation: rounded });
    await e.stream.cancel();
    await Deno.writeTextFile(
      `${dir}/bad.json`,
      `{"virtual_size":${size * 2},"cluster_bits":16,"data_clusters":[]}`,
    );
    const r = await runCli([
      "export",
      src,
      "-o",
      `${dir}/x.qcow2`,
      "--allocation",
      `${dir}/bad.json`,
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: allocation \S+ describes a disk of \d+ bytes/);
  });
});

Deno.test("export: a source that changes size between the passes is refused", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/s.raw`;
    await Deno.writeFile(src, pseudoRandom(MiB));
    const e = await exportQcow2(src);
    await Deno.truncate(src, MiB / 2);
    await assert.rejects(() => new Response(e.stream).arrayBuffer(), SourceChangedError);
  });
});

qemuTest("export CLI: stdout, -o, --output-fd and --machine progress", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await sparseDisk(src);
    const viaStdout = await runCli(["export", src, "-c", "4K", "-r", "1"]);
    assert.equal(viaStdout.code, 0, viaStdout.stderr);
    await Deno.writeFile(`${dir}/1.qcow2`, viaStdout.stdout);
    await checkClean(`${dir}/1.qcow2`);
    assert.ok(await imagesEqual(src, `${dir}/1.qcow2`, "raw", "qcow2"));
    const machine = await runCli([
      "export",
      src,
      "-o",
      `${dir}/2.qcow2`,
      "-c",
      "4096",
      "-r",
      "1",
      "--progress",
      "--machine",
    ]);
    assert.equal(machine.code, 0, machine.stderr);
    const digits = new TextDecoder().decode(machine.stdout);
    assert.match(digits, /^(\d{3})+$/);
    assert.ok(digits.endsWith("100"));
    const steps = digits.match(/\d{3}/g)!.map(Number);
    assert.deepEqual(steps, [...steps].sort((a, b) => a - b));
    assert.deepEqual(await Deno.readFile(`${dir}/2.qcow2`), viaStdout.stdout, "same bytes");
    const fd = await run("bash", [
      "-c",
      `"${Deno.execPath()}" run -A "${CLI}" export "$1" -c 4096 -r 1 --output-fd 5 5>"$2"`,
      "x",
      src,
      `${dir}/3.qcow2`,
    ]);
    assert.equal(fd.code, 0, fd.stderr);
    assert.deepEqual(await Deno.readFile(`${dir}/3.qcow2`), viaStdout.stdout);
  });
});

Deno.test("export CLI: bad input gives one line and the right status", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/s.raw`;
    await Deno.writeFile(src, pseudoRandom(4096));
    const out = `${dir}/o.qcow2`;
    const cases: [string[], number, RegExp][] = [
      [["export", `${dir}/missing.raw`, "-o", out], 1, /cannot open .*missing\.raw: no such file/],
      [["export", dir, "-o", out], 1, /is a directory/],
      [["export", src, "-o", out, "-c", "1000"], 2, /-c\/--cluster-size must be a power of two/],
      [["export", src, "-o", out, "-c", "4M"], 2, /-c\/--cluster-size/],
      [["export", src, "-o", out, "-r", "3"], 2, /-r\/--refcount-bits/],
      [["export", src, "-o", out, "-r", "128"], 2, /-r\/--refcount-bits/],
      [["export", src, "--machine"], 2, /--machine prints progress on stdout/],
      [
        ["export", src, "-o", out, "-f", "vmdk"],
        2,
        /-f\/--format must be one of qcow2, vhd, raw, chunked, tar/,
      ],
      [["export", src, "-o", out, "-f", "vhd", "-c", "2M"], 2, /-c applies to qcow2 only/],
      [["export", src, "-o", out, "--base-allocation", src], 2, /needs --diff/],
      [["export", src, "-o", out, "--output-fd", "x"], 2, /--output-fd needs a file descriptor/],
      [["export", src, "-o", out, "--allocation", `${dir}/nope.json`], 1, /nope\.json/],
      [["export", src, "-o", out, "--allocation", "fd:x"], 2, /not a file descriptor/],
      [["export", src, "-o", src], 2, /is the source itself/],
      // Flags for what this export does not use are refused, never ignored.
      [["export", src, "-o", out, "--connections", "2"], 2, /--connections applies to NBD URIs/],
      [["export", src, "-o", out, "--insecure"], 2, /--insecure applies to an http/],
    ];
    for (const [args, code, message] of cases) {
      const r = await runCli(args);
      assert.equal(r.code, code, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, message, args.join(" "));
      assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /\bat .*\.ts:\d+/, "no stack trace");
    }
  });
});

Deno.test("export CLI: an image too large for the cluster size", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/huge.raw`;
    await writeSparse(src, 129 * 2 ** 30);
    const r = await runCli(["export", src, "-o", `${dir}/o.qcow2`, "-c", "512"]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^diskstream: image too large for 512 B clusters.*use a larger cluster size/,
    );
  });
});

Deno.test("export CLI: a closed pipe ends quietly with status 1", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/s.raw`;
    await Deno.writeFile(src, pseudoRandom(16 * MiB));
    const r = await run("bash", [
      "-c",
      `set -o pipefail; "${Deno.execPath()}" run -A "${CLI}" export "$1" | head -c 1000 >/dev/null`,
      "x",
      src,
    ]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "");
  });
});

qemuTest(
  "writeTo: kernel copies into files, pipes, sockets, other filesystems; same bytes",
  async () => {
    await withTempDir(async (dir) => {
      const src = `${dir}/disk.raw`;
      await sparseDisk(src);
      const viaStream = `${dir}/stream.qcow2`;
      await exportTo(src, viaStream);
      const want = await Deno.readFile(viaStream);
      // In-process (tests run with FFI: copy_file_range into a file).
      const e = await exportQcow2(src);
      await e.writeTo({ kind: "path", path: `${dir}/kernel.qcow2` });
      assert.deepEqual(await Deno.readFile(`${dir}/kernel.qcow2`), want);
      await assert.rejects(() => e.writeTo({ kind: "path", path: `${dir}/again` }), /only once/);
      const s = await exportQcow2(src);
      await s.stream.cancel();
      await assert.rejects(() => s.writeTo({ kind: "path", path: `${dir}/again` }), /only once/);
      // tmpfs: copy_file_range refuses another filesystem, pread/write take over.
      if ((await Deno.stat("/dev/shm").catch(() => null))?.isDirectory) {
        const shm = await Deno.makeTempDir({ dir: "/dev/shm" });
        try {
          await (await exportQcow2(src)).writeTo({ kind: "path", path: `${shm}/o.qcow2` });
          assert.deepEqual(await Deno.readFile(`${shm}/o.qcow2`), want);
        } finally {
          await Deno.remove(shm, { recursive: true });
        }
      }
      // The CLI through a pipe (splice), into a TCP socket as stdout (sendfile, as XAPI
      // hands over its HTTP connection) and without FFI (the stream).
      const piped = await runCli(["export", src]);
      assert.deepEqual(piped.stdout, want);
      const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const received = (async () => {
        const conn = await listener.accept();
        return new Uint8Array(await new Response(conn.readable).arrayBuffer());
      })();
      const port = (listener.addr as Deno.NetAddr).port;
      const sent = await run("bash", [
        "-c",
        `"${Deno.execPath()}" run -A "${CLI}" export "$1" > /dev/tcp/127.0.0.1/${port}`,
        "x",
        src,
      ]);
      assert.equal(sent.code, 0, sent.stderr);
      assert.deepEqual(await received, want);
      listener.close();
      const noFfi = await run(Deno.execPath(), [
        "run",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        CLI,
        "export",
        src,
        "-o",
        `${dir}/noffi.qcow2`,
      ]);
      assert.equal(noFfi.code, 0, noFfi.stderr);
      assert.deepEqual(await Deno.readFile(`${dir}/noffi.qcow2`), want);
      await checkClean(`${dir}/kernel.qcow2`);
    });
  },
);
