/**
 * `diskstream import` of qcow2 streams made by qemu-img (and by `diskstream export`),
 * fed through a pipe: every cluster size, compression (deflate, zstd), compat=0.10,
 * many L2 tables, ZERO and ZERO_ALLOC clusters, tables after their data, diffs with
 * --delta, and what happens to new, existing and too-small destinations.
 */
import assert from "node:assert/strict";
import { importImage } from "../lib/import/import.ts";
import {
  CLI,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import {
  assertOk,
  assertSameBytes,
  importMatches,
  importPiped,
  MiB,
  qcow2Tables,
  qemuRaw,
  readU64At,
  sourceDisk,
} from "./import_fixtures.ts";

/** Converts `src` to qcow2 with `opts`, imports it through a pipe, compares. */
async function roundTrip(dir: string, src: string, name: string, opts: string[]) {
  const img = `${dir}/${name}.qcow2`;
  await qemu(["convert", "-f", "raw", "-O", "qcow2", ...opts, src, img]);
  const out = `${dir}/${name}.raw`;
  await importMatches(img, src, out);
  await Deno.remove(img);
  await Deno.remove(out);
}

qemuTest("import: qemu-img convert output at every cluster size, 512 B to 2 MiB", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src);
    const sizes = Array.from({ length: 13 }, (_, i) => 512 << i);
    // Two at a time: each is a qemu-img run and a diskstream run.
    for (let i = 0; i < sizes.length; i += 2) {
      await Promise.all(
        sizes.slice(i, i + 2).map((cs) =>
          roundTrip(dir, src, `c${cs}`, ["-o", `cluster_size=${cs}`])
        ),
      );
    }
  });
});

qemuTest("import: many L2 tables interleaved with their data (512 B clusters)", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src, 7);
    const img = `${dir}/small.qcow2`;
    await qemu(["convert", "-O", "qcow2", "-o", "cluster_size=512", src, img]);
    const t = await qcow2Tables(img);
    const l2 = t.l2.filter((o) => o !== 0);
    assert.ok(l2.length > 10, `${l2.length} L2 tables`);
    // qemu-img convert writes each L2 table just before the data it maps.
    assert.ok(l2.some((o, i) => i > 0 && o - l2[i - 1] > t.clusterSize));
    await importMatches(img, src, `${dir}/out.raw`);
  });
});

qemuTest("import: compressed clusters (deflate at 4K, 64K, 2M; zstd), compat=0.10", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src, 3);
    await Promise.all([
      roundTrip(dir, src, "deflate4k", ["-c", "-o", "cluster_size=4096"]),
      roundTrip(dir, src, "deflate64k", ["-c"]),
    ]);
    await Promise.all([
      roundTrip(dir, src, "deflate2m", ["-c", "-o", "cluster_size=2M"]),
      roundTrip(dir, src, "zstd", ["-c", "-o", "compression_type=zstd,cluster_size=8192"]),
    ]);
    await roundTrip(dir, src, "v2", ["-o", "compat=0.10"]);
  });
});

qemuTest("import: compressed clusters spread over many L2 tables share sectors", async () => {
  await withTempDir(async (dir) => {
    // 512 B clusters: compressed data of one L2 table's range often lands in the
    // free end of a cluster written before that L2 table (the input bytes each
    // cluster used then decide where the next range's bytes are).
    const size = 2 * MiB;
    const src = `${dir}/src.raw`;
    const text = new Uint8Array(size).map((_, i) => (i % 1000 < 600 ? 65 + (i % 23) : i & 255));
    await writeSparse(src, size, [[0, text.subarray(0, size - 4096)]]);
    for (const type of ["zlib", "zstd"]) {
      const img = `${dir}/${type}.qcow2`;
      const opts = `cluster_size=512,compression_type=${type}`;
      await qemu(["convert", "-c", "-O", "qcow2", "-o", opts, src, img]);
      await importMatches(img, src, `${dir}/${type}.raw`);
    }
  });
});

qemuTest(
  "import: streams of many chunks (input buffers reused), plain and compressed",
  async () => {
    await withTempDir(async (dir) => {
      // 40 MiB: ten 4 MiB input chunks; half random, half compressible.
      const size = 40 * MiB;
      const src = `${dir}/src.raw`;
      const text = new Uint8Array(MiB).map((_, i) => 40 + ((i * 13) % 50));
      const writes: [number, Uint8Array][] = [];
      for (let m = 0; m < 40; m += 2) {
        writes.push([m * MiB, pseudoRandom(MiB, m)], [(m + 1) * MiB, text]);
      }
      await writeSparse(src, size, writes);
      await Promise.all([
        roundTrip(dir, src, "plain", ["-o", "cluster_size=16384"]),
        roundTrip(dir, src, "compressed", ["-c", "-o", "cluster_size=4096"]),
      ]);
    });
  },
);

qemuTest("import: ZERO_ALLOC clusters read as zeros, never their stale host bytes", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/z.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "2M"]);
    // Data, then zero it without unmapping: the host clusters keep 0xaa.
    await qemu(
      ["-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c", "write -z 64k 192k", img],
      "qemu-io",
    );
    const map = JSON.parse(await qemu(["map", "--output=json", img])) as {
      start: number;
      zero: boolean;
      data: boolean;
      offset?: number;
    }[];
    const zeroAlloc = map.find((e) => e.start === 65536)!;
    assert.ok(zeroAlloc.zero && zeroAlloc.offset !== undefined, JSON.stringify(zeroAlloc));
    const stale = await readU64At(img, zeroAlloc.offset!);
    assert.equal(stale, 0xaaaaaaaaaaaaaaaan, "the ZERO_ALLOC cluster keeps its old bytes");
    const out = `${dir}/out.raw`;
    await importMatches(img, await qemuRaw(img, "qcow2", `${dir}/want.raw`), out);
    const bytes = await Deno.readFile(out);
    assert.equal(bytes[65536], 0);
    assert.equal(bytes[65535], 0xaa);
  });
});

qemuTest("import: internal snapshots ignored, bitmaps extension skipped", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/s.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "8M"]);
    await qemu(["-f", "qcow2", "-c", "write -P 0x11 0 2M", img], "qemu-io");
    await qemu(["snapshot", "-c", "s1", img]);
    await qemu(
      ["-f", "qcow2", "-c", "write -P 0x22 1M 2M", "-c", "write -z 0 64k", img],
      "qemu-io",
    );
    await qemu(["bitmap", "--add", img, "b0"]);
    await qemu(["-f", "qcow2", "-c", "write -P 0x33 4M 1M", img], "qemu-io");
    const info = JSON.parse(await qemu(["info", "--output=json", img]));
    assert.equal(info.snapshots.length, 1);
    await importMatches(img, await qemuRaw(img, "qcow2", `${dir}/want.raw`), `${dir}/out.raw`);
  });
});

qemuTest("import: tables after their data (a resized image) are held in the buffer", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/r.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"]);
    await qemu(["-f", "qcow2", "-c", "write -P 0x11 0 300k", img], "qemu-io");
    await qemu(["resize", "-q", img, "64M"]); // the L1 table moves to the end
    const t = await qcow2Tables(img);
    assert.ok(t.l2.every((o) => o < t.l1Offset));
    await importMatches(img, await qemuRaw(img, "qcow2", `${dir}/want.raw`), `${dir}/out.raw`);
  });
});

qemuTest("import: diskstream export → import through pipes, and --diff → --delta", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.raw`;
    const size = await sourceDisk(base, 11);
    const next = `${dir}/next.raw`;
    await Deno.copyFile(base, next);
    const f = await Deno.open(next, { write: true });
    await f.seek(MiB, Deno.SeekMode.Start);
    await f.write(pseudoRandom(70_000, 99));
    await f.seek(0, Deno.SeekMode.Start);
    await f.write(new Uint8Array(65536)); // a cluster that became zero
    f.close();
    const full = `${dir}/full.qcow2`;
    assertOk(await runCli(["export", next, "-o", full]));
    await importMatches(full, next, `${dir}/full.raw`);
    const diff = `${dir}/diff.qcow2`;
    assertOk(await runCli(["export", next, "--diff", base, "-o", diff]));
    const rebuilt = `${dir}/rebuilt.raw`;
    await Deno.copyFile(base, rebuilt);
    await importMatches(diff, next, rebuilt, ["--delta"]);
    assert.equal((await Deno.stat(rebuilt)).size, size);
  });
});

qemuTest("import --delta: a qcow2 diff with a backing file rebuilds the disk", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.raw`;
    await writeSparse(base, 4 * MiB, [[0, pseudoRandom(4 * MiB, 5)]]);
    const diff = `${dir}/diff.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", diff]);
    await qemu([
      "-f",
      "qcow2",
      "-c",
      "write -P 0x55 100k 200k",
      "-c",
      "write -z 1M 256k",
      "-c",
      "write -z -u 2M 64k",
      diff,
    ], "qemu-io");
    const want = await qemuRaw(diff, "qcow2", `${dir}/want.raw`);
    const got = `${dir}/got.raw`;
    await Deno.copyFile(base, got);
    await importMatches(diff, want, got, ["--delta"]);
  });
});

qemuTest("import: new file sparse; existing file zero-filled; --prezeroed; size kept", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    const size = await sourceDisk(src, 21);
    const img = `${dir}/img.qcow2`;
    await qemu(["convert", "-O", "qcow2", src, img]);
    // A new file: created at the virtual size, holes where the image has nothing.
    const fresh = `${dir}/fresh.raw`;
    await importMatches(img, src, fresh);
    const st = await Deno.stat(fresh);
    assert.ok(st.blocks !== null && st.blocks * 512 < 2 * MiB, `${st.blocks} blocks allocated`);
    // An existing non-sparse file, larger than the disk: zeros where the image has
    // none, and nothing at or past the virtual size is touched.
    const existing = `${dir}/existing.raw`;
    await Deno.writeFile(existing, new Uint8Array(size + 4096).fill(0xff));
    assertOk(await importPiped(img, existing));
    const bytes = await Deno.readFile(existing);
    assert.equal(bytes.length, size + 4096);
    assert.deepEqual(bytes.subarray(0, size), await Deno.readFile(src));
    assert.ok(bytes.subarray(size).every((b) => b === 0xff));
    // A smaller existing file grows to the virtual size, no further.
    const small = `${dir}/small.raw`;
    await Deno.writeFile(small, new Uint8Array(100_000).fill(0xee));
    await importMatches(img, src, small);
    // --prezeroed trusts the destination: its garbage between the data stays.
    const pre = `${dir}/pre.raw`;
    await Deno.writeFile(pre, new Uint8Array(size).fill(0x77));
    assertOk(await importPiped(img, pre, ["--prezeroed"]));
    const p = await Deno.readFile(pre);
    assert.equal(p[2 * MiB - 1], 0x77);
    assert.equal(p[0], (await Deno.readFile(src))[0]);
  });
});

qemuTest("stream_decode OUTPUT, -i, --input-fd, --progress --machine", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src, 31);
    const img = `${dir}/img.qcow2`;
    await qemu(["convert", "-O", "qcow2", "-o", "cluster_size=4096", src, img]);
    const a = `${dir}/a.raw`;
    assertOk(await runCli(["stream_decode", a], { stdinFile: img }));
    await assertSameBytes(src, a);
    const b = `${dir}/b.raw`;
    const r = await runCli(["import", b, "-i", img, "--progress", "--machine"]);
    assertOk(r);
    await assertSameBytes(src, b);
    const digits = new TextDecoder().decode(r.stdout);
    assert.equal(
      digits,
      Array.from({ length: 101 }, (_, i) => String(i).padStart(3, "0")).join(""),
    );
    const c = `${dir}/c.raw`;
    const cmd = `'${Deno.execPath()}' run -A '${CLI}' import '${c}' --input-fd 3 3<'${img}'`;
    const sh = await run("sh", ["-c", cmd]);
    assertOk(sh);
    await assertSameBytes(src, c);
  });
});

qemuTest("importImage: the library API on a ReadableStream", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    const size = await sourceDisk(src, 41);
    const img = `${dir}/img.qcow2`;
    await qemu(["convert", "-c", "-O", "qcow2", src, img]);
    const file = await Deno.open(img);
    const out = `${dir}/out.raw`;
    const result = await importImage(file.readable, out, { maxBuffer: 4 * MiB });
    assert.equal(result.format, "qcow2");
    assert.equal(result.virtualSize, size);
    assert.equal(result.destination, "new file");
    assert.ok(result.dataBytes > 0 && result.dataBytes <= size);
    await assertSameBytes(src, out);
  });
});
