/**
 * `export -f vhd` and the library's exportVhd: the layout of `vhd-tool stream
 * --destination-format vhd` checked byte by byte (footer copy at 0, dynamic header at
 * 512, spare sector, BAT at 2048 padded with 0xFF, all-ones bitmaps and 2 MiB blocks
 * in ascending order, footer last; checksums), then against qemu-img (`info`,
 * `compare -f raw SOURCE -F vpc OUT`; vpc has no `check`), `headers`, and `import`
 * through a pipe: sparse, unaligned, empty and full disks, allocation hints, diffs.
 */
import assert from "node:assert/strict";
import { formatAllocation } from "../lib/alloc/allocation.ts";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { LimitError, UsageError } from "../lib/errors.ts";
import { exportVhd, type VhdExportOptions } from "../lib/export/vhd.ts";
import { vhdChecksum, vhdGeometry } from "../lib/vhd/footer.ts";
import { VHD_MAX_SIZE, vhdLayout } from "../lib/vhd/writer.ts";
import {
  CLI,
  imagesEqual,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  sha256,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const MiB = 1 << 20;
const BLOCK = 2 * MiB;
const UUID = Uint8Array.from({ length: 16 }, (_, i) => i * 17);
const WHEN = new Date(Date.UTC(2024, 0, 2, 3, 4, 5));
const FIXED: VhdExportOptions = { timestamp: WHEN, uniqueId: UUID };
const latin1 = new TextDecoder("latin1");

/** The source's bytes as the image must hold them: zero padded to 512. */
async function paddedSource(path: string): Promise<Uint8Array> {
  const bytes = await Deno.readFile(path);
  const out = new Uint8Array(Math.ceil(bytes.length / 512) * 512);
  out.set(bytes);
  return out;
}

/** A source for {@link checkLayout}: its size (rounded up to 512) and its blocks. */
interface Source {
  size: number;
  /** The bytes of block `b` (short for the last block). */
  block(b: number): Uint8Array;
}

function sourceOf(bytes: Uint8Array): Source {
  return { size: bytes.length, block: (b) => bytes.subarray(b * BLOCK, (b + 1) * BLOCK) };
}

/**
 * Checks every layout rule on `image`, the export of `source` (padded to 512), and
 * returns the blocks the BAT lists, in file order.
 */
function checkLayout(image: Uint8Array, source: Source): number[] {
  const v = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const size = source.size;
  const entries = Math.ceil(size / BLOCK);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const first = 2048 + batBytes;

  // Footer: a copy at 0, the same bytes at the end.
  const footer = image.subarray(0, 512);
  assert.deepEqual(image.subarray(image.length - 512), footer);
  assert.equal(latin1.decode(footer.subarray(0, 8)), "conectix");
  assert.equal(v.getUint32(8), 2); // features: reserved bit
  assert.equal(v.getUint32(12), 0x00010000);
  assert.equal(v.getBigUint64(16), 512n); // dynamic header offset
  assert.equal(v.getUint32(24), (WHEN.getTime() - Date.UTC(2000, 0, 1)) / 1000);
  assert.equal(latin1.decode(footer.subarray(28, 32)), "qem2");
  assert.equal(v.getUint32(32), 1); // creator version, as vhd-tool
  assert.equal(v.getUint32(36), 0); // creator host OS, as vhd-tool
  assert.equal(v.getBigUint64(40), BigInt(size)); // original size
  assert.equal(v.getBigUint64(48), BigInt(size)); // current size
  const g = vhdGeometry(size);
  assert.deepEqual([v.getUint16(56), v.getUint8(58), v.getUint8(59)], [
    g.cylinders,
    g.heads,
    g.sectorsPerTrack,
  ]);
  assert.equal(v.getUint32(60), 3); // dynamic
  assert.equal(v.getUint32(64), vhdChecksum(footer, 64));
  assert.equal(
    v.getUint32(64),
    ~footer.reduce((s, b, i) => i >= 64 && i < 68 ? s : s + b, 0) >>> 0,
  );
  assert.deepEqual(footer.subarray(68, 84), UUID);
  assert.ok(footer.subarray(84).every((b) => b === 0)); // saved state 0, reserved zeros

  // Dynamic header at 512.
  const header = image.subarray(512, 1536);
  assert.equal(latin1.decode(header.subarray(0, 8)), "cxsparse");
  assert.equal(v.getBigUint64(520), 0xffffffffffffffffn);
  assert.equal(v.getBigUint64(528), 2048n); // BAT offset
  assert.equal(v.getUint32(536), 0x00010000);
  assert.equal(v.getUint32(540), entries);
  assert.equal(v.getUint32(544), BLOCK);
  assert.equal(v.getUint32(548), vhdChecksum(header, 36));
  assert.ok(header.subarray(40).every((b) => b === 0)); // no parent, no locators
  assert.ok(image.subarray(1536, 2048).every((b) => b === 0)); // the spare sector

  // BAT: ascending sector offsets from `first`, 0xFFFFFFFF elsewhere and as padding.
  const blocks: number[] = [];
  let next = first;
  for (let i = 0; i < entries; i++) {
    const e = v.getUint32(2048 + i * 4);
    if (e === 0xffffffff) continue;
    assert.equal(e * 512, next, `BAT entry ${i}`);
    blocks.push(i);
    next += 512 + BLOCK;
  }
  assert.ok(image.subarray(2048 + entries * 4, first).every((b) => b === 0xff));
  assert.equal(image.length, next + 512);

  // Blocks: an all-ones bitmap, then the 2 MiB of the source (zeros past its end).
  blocks.forEach((b, k) => {
    const at = first + k * (512 + BLOCK);
    assert.ok(image.subarray(at, at + 512).every((x) => x === 0xff), `bitmap of block ${b}`);
    const data = image.subarray(at + 512, at + 512 + BLOCK);
    const want = source.block(b);
    assert.deepEqual(data.subarray(0, want.length), want, `data of block ${b}`);
    assert.ok(data.subarray(want.length).every((x) => x === 0), `padding of block ${b}`);
  });
  return blocks;
}

/** Every block's worth of data written with pseudoRandom, as [offset, bytes]. */
function data(...at: [number, number][]): [number, Uint8Array][] {
  return at.map(([offset, length], i) => [offset, pseudoRandom(length, i + 1)]);
}

Deno.test("VHD layout: offsets, checksums, bitmaps and data; stream = writeTo", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    const size = 9 * MiB + 1000; // 5 blocks, the last one partial; rounded up to 512
    await writeSparse(
      src,
      size,
      data([100, 3000], [2 * BLOCK + 5, 70000], [size - 700, 700]),
    );
    const source = await paddedSource(src);
    const e = await exportVhd(src, FIXED);
    assert.deepEqual([...e.clusters], [0, 2, 4]);
    assert.equal(e.layout.virtualSize, 9 * MiB + 1024);
    assert.equal(e.sourceSize, size);
    const streamed = new Uint8Array(await new Response(e.stream).arrayBuffer());
    assert.equal(streamed.length, e.layout.fileSize);
    assert.deepEqual(checkLayout(streamed, sourceOf(source)), [0, 2, 4]);

    // The kernel-copy path, small chunks and recycled buffers give the same bytes.
    await (await exportVhd(src, FIXED)).writeTo({ kind: "path", path: `${dir}/a.vhd` });
    assert.deepEqual(await Deno.readFile(`${dir}/a.vhd`), streamed);
    const small = await exportVhd(src, { ...FIXED, chunkSize: 1, reuseBuffers: true });
    const parts: Uint8Array[] = [];
    for await (const chunk of small.stream) parts.push(chunk.slice());
    assert.ok(parts.length > 4);
    assert.deepEqual(new Uint8Array(await new Blob(parts as BlobPart[]).arrayBuffer()), streamed);
  });
});

Deno.test("VHD layout: empty, one-sector and BAT of more than one sector", async () => {
  await withTempDir(async (dir) => {
    const empty = `${dir}/empty.raw`;
    await Deno.writeFile(empty, new Uint8Array(0));
    const e = await exportVhd(empty, FIXED);
    const bytes = new Uint8Array(await new Response(e.stream).arrayBuffer());
    assert.equal(bytes.length, 2048 + 512); // footer, header, spare sector, footer
    assert.deepEqual(checkLayout(bytes, sourceOf(new Uint8Array(0))), []);

    const one = `${dir}/one.raw`;
    await Deno.writeFile(one, new Uint8Array([7]));
    const o = await exportVhd(one, FIXED);
    const ob = new Uint8Array(await new Response(o.stream).arrayBuffer());
    assert.deepEqual(checkLayout(ob, sourceOf(await paddedSource(one))), [0]);

    // 300 blocks: a BAT of 1200 bytes padded to 1536; the first block at 3584.
    const wide = `${dir}/wide.raw`;
    const last = new Uint8Array(BLOCK);
    last.set(pseudoRandom(512, 5), 4096);
    await writeSparse(wide, 300 * BLOCK, [[299 * BLOCK, last]]);
    const w = await exportVhd(wide, FIXED);
    assert.equal(w.layout.tableBytes, 1536);
    assert.equal(w.layout.firstBlockOffset, 3584);
    const wb = new Uint8Array(await new Response(w.stream).arrayBuffer());
    const wideSource = {
      size: 300 * BLOCK,
      block: (b: number) => b === 299 ? last : new Uint8Array(BLOCK),
    };
    assert.deepEqual(checkLayout(wb, wideSource), [299]);
  });
});

Deno.test("VHD: a disk above 2040 GiB is refused before it is read", async () => {
  assert.equal(vhdLayout(VHD_MAX_SIZE, 0).maxTableEntries, 1044480);
  assert.throws(() => vhdLayout(VHD_MAX_SIZE + 512, 0), LimitError);
  await withTempDir(async (dir) => {
    const src = `${dir}/huge.raw`;
    await writeSparse(src, VHD_MAX_SIZE + 512);
    await assert.rejects(
      () => exportVhd(src),
      (e) => e instanceof LimitError && /2040 GiB/.test(e.message),
    );
    const r = await runCli(["export", "-f", "vhd", src, "-o", `${dir}/out.vhd`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: a VHD holds at most 2040 GiB.*-f qcow2/);
  });
});

/** qemu-img sees the source's size (rounded up to 512) and the same bytes. */
async function assertQemuReads(src: string, out: string, size: number): Promise<void> {
  const info = JSON.parse(await qemu(["info", "--output=json", "-f", "vpc", out]));
  assert.equal(info["virtual-size"], Math.ceil(size / 512) * 512);
  assert.ok(await imagesEqual(src, out, "raw", "vpc"), `${out} ≠ ${src}`);
}

/** `headers OUT` (interval form) equals `blocks`. */
async function assertHeaders(out: string, size: number, blocks: number[]): Promise<void> {
  const r = await runCli(["headers", out]);
  assert.equal(r.code, 0, r.stderr);
  const clusters = new ClusterSet(Math.ceil(size / BLOCK), BLOCK);
  for (const b of blocks) clusters.add(b);
  const virtualSize = Math.ceil(size / 512) * 512;
  assert.equal(new TextDecoder().decode(r.stdout), formatAllocation({ virtualSize, clusters }));
}

/** `export -f vhd ARGS | import DEST [...]` through a pipe; returns DEST's sha256. */
async function pipeImport(args: string[], dest: string, more: string[] = []): Promise<string> {
  const q = (s: string) => `'${s}'`;
  const deno = q(Deno.execPath());
  const r = await run("sh", [
    "-c",
    `${deno} run -A ${q(CLI)} export -f vhd ${args.map(q).join(" ")} | ` +
    `${deno} run -A ${q(CLI)} import ${q(dest)} ${more.map(q).join(" ")}`,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return await sha256File(dest);
}

qemuTest("export -f vhd: sparse, unaligned, empty and full disks", async () => {
  await withTempDir(async (dir) => {
    const cases: [string, number, [number, Uint8Array][], number[]][] = [
      // Sparse, a multiple of 512 but not of 2 MiB; data in the last partial block.
      ["sparse", 40 * MiB + 1536, data([MiB, 4096], [9 * BLOCK - 1, 2], [40 * MiB + 1000, 536]), [
        0,
        8,
        9,
        20,
      ]],
      // Not a multiple of 512: rounded up, the tail reads as zeros.
      ["odd", 5 * MiB + 77, data([0, 5 * MiB + 77]), [0, 1, 2]],
      ["empty", 0, [], []],
      ["zeros", 6 * MiB, [], []],
      ["full", 6 * MiB + 512, data([0, 6 * MiB + 512]), [0, 1, 2, 3]],
    ];
    for (const [name, size, writes, blocks] of cases) {
      const src = `${dir}/${name}.raw`;
      await writeSparse(src, size, writes);
      const out = `${dir}/${name}.vhd`;
      const r = await runCli(["export", src, "-f", "vhd", "-o", out]);
      assert.equal(r.code, 0, r.stderr);
      await assertQemuReads(src, out, size);
      await assertHeaders(out, size, blocks);
      if (name === "sparse" || name === "odd" || name === "empty") {
        const back = await pipeImport([src], `${dir}/${name}.back`);
        assert.equal(back, sha256(await paddedSource(src)), name);
      }
    }
  });
});

qemuTest("export -f vhd without FFI (the stream path) and to a pipe", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, 20 * MiB, data([3 * MiB, 2 * MiB], [19 * MiB, 100]));
    const out = `${dir}/disk.vhd`;
    const r = await run(Deno.execPath(), [
      "run",
      "--allow-read",
      "--allow-write",
      CLI,
      "export",
      "-f",
      "vhd",
      src,
      "-o",
      out,
    ]);
    assert.equal(r.code, 0, r.stderr);
    await assertQemuReads(src, out, 20 * MiB);
    const piped = await runCli(["export", "-f", "vhd", src]); // stdout is a pipe: splice
    assert.equal(piped.code, 0, piped.stderr);
    const file = await Deno.readFile(out);
    assert.equal(piped.stdout.length, file.length);
    const body = (b: Uint8Array) => b.subarray(2048, b.length - 512); // past the footers
    assert.deepEqual(body(piped.stdout), body(file));
  });
});

qemuTest(
  "export -f vhd --allocation: hinted blocks only, rounded outwards; --zero-check",
  async () => {
    await withTempDir(async (dir) => {
      const size = 16 * MiB + 512;
      const src = `${dir}/disk.raw`;
      // Data in blocks 1 and 8 (the last, partial); garbage in block 5, which the hint omits.
      await writeSparse(src, size, data([BLOCK + 10, 1000], [5 * BLOCK, 4096], [16 * MiB, 512]));
      // 64 KiB clusters: 40 lies in block 1, 64–65 in block 2 (zeros), 256 in block 8.
      const hint = `${dir}/hint.json`;
      await Deno.writeTextFile(
        hint,
        `{"virtual_size":${size},"cluster_bits":16,"data_clusters":[[40,40],[64,65],[256,256]]}`,
      );
      const out = `${dir}/hinted.vhd`;
      const r = await runCli(["export", "-f", "vhd", src, "--allocation", hint, "-o", out]);
      assert.equal(r.code, 0, r.stderr);
      await assertHeaders(out, size, [1, 2, 8]);
      // The image reads as the source without the unhinted garbage.
      const clean = `${dir}/clean.raw`;
      await Deno.writeFile(clean, (await Deno.readFile(src)).fill(0, 5 * BLOCK, 6 * BLOCK));
      await assertQemuReads(clean, out, size);
      assert.equal(await imagesEqual(src, out, "raw", "vpc"), false);

      const checked = `${dir}/checked.vhd`;
      const z = await runCli([
        "export",
        "-f",
        "vhd",
        src,
        "--allocation",
        hint,
        "--zero-check",
        "-o",
        checked,
      ]);
      assert.equal(z.code, 0, z.stderr);
      await assertHeaders(checked, size, [1, 8]);

      // Hybrid: the hint is a VHD's BAT (vhd-tool's --source-format hybrid), the bytes the raw disk's.
      const image = `${dir}/clean.vhd`;
      await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", clean, image]);
      const hybrid = `${dir}/hybrid.vhd`;
      const y = await runCli(["export", "-f", "vhd", src, "--allocation", image, "-o", hybrid]);
      assert.equal(y.code, 0, y.stderr);
      const headersOf = async (f: string) => (await runCli(["headers", f])).stdout;
      assert.deepEqual(await headersOf(hybrid), await headersOf(image));
      await assertQemuReads(clean, hybrid, size);

      // The library takes a hint at any cluster size too (here the same 64 KiB clusters).
      const clusters = new ClusterSet(Math.ceil(size / 65536), 65536);
      for (const c of [40, 64, 65, 256]) clusters.add(c);
      const e = await exportVhd(src, { allocation: { virtualSize: size, clusters } });
      assert.deepEqual([...e.clusters], [1, 2, 8]);
      await e.stream.cancel();
    });
  },
);

qemuTest(
  "export -f vhd --diff BASE: changed blocks only; import --delta rebuilds SOURCE",
  async () => {
    await withTempDir(async (dir) => {
      const baseSize = 12 * MiB;
      const base = `${dir}/base.raw`;
      await writeSparse(base, baseSize, data([0, 12 * MiB]));
      const bytes = await Deno.readFile(base);
      // SOURCE: longer than BASE; block 1 changes by one byte, block 3 becomes zero,
      // block 6 (past BASE) holds data, block 7 (past BASE) stays zero.
      const next = new Uint8Array(16 * MiB - 512);
      next.set(bytes);
      next[BLOCK + 12345] ^= 0xff;
      next.fill(0, 3 * BLOCK, 4 * BLOCK);
      next.set(pseudoRandom(1000, 9), 6 * BLOCK + 1);
      const src = `${dir}/next.raw`;
      await Deno.writeFile(src, next);

      const out = `${dir}/diff.vhd`;
      const r = await runCli(["export", "-f", "vhd", src, "--diff", base, "-o", out]);
      assert.equal(r.code, 0, r.stderr);
      await assertHeaders(out, next.length, [1, 3, 6]);

      // Applied onto a copy of BASE (through a pipe) it rebuilds SOURCE.
      const copy = `${dir}/copy.raw`;
      await Deno.copyFile(base, copy);
      const rebuilt = await pipeImport([src, "--diff", base], copy, ["--delta"]);
      assert.equal(rebuilt, sha256(next));

      // With hints for both disks (every block of each), the same blocks are written.
      const hint = (size: number) =>
        `{"virtual_size":${size},"cluster_bits":21,"data_clusters":[[0,${
          Math.ceil(size / BLOCK) - 1
        }]]}`;
      await Deno.writeTextFile(`${dir}/src.json`, hint(next.length));
      await Deno.writeTextFile(`${dir}/base.json`, hint(baseSize));
      const hinted = `${dir}/hinted.vhd`;
      const h = await runCli([
        "export",
        "-f",
        "vhd",
        src,
        "--diff",
        base,
        "--allocation",
        `${dir}/src.json`,
        "--base-allocation",
        `${dir}/base.json`,
        "-o",
        hinted,
      ]);
      assert.equal(h.code, 0, h.stderr);
      await assertHeaders(hinted, next.length, [1, 3, 6, 7]); // block 7 is hinted, not compared
    });
  },
);

Deno.test("export -f vhd refuses -c, -r and unknown formats (exit 2)", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await Deno.writeFile(src, new Uint8Array(4096));
    for (
      const [args, msg] of [
        [["-c", "64K"], /-c applies to qcow2 only/],
        [["-r", "16"], /-r applies to qcow2 only/],
      ] as const
    ) {
      const r = await runCli(["export", "-f", "vhd", src, "-o", `${dir}/x.vhd`, ...args]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, msg);
    }
    const bad = await runCli(["export", "-f", "vmdk", src, "-o", `${dir}/x`]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /must be one of qcow2, vhd, raw, chunked, tar/);
    await assert.rejects(
      () =>
        exportVhd(src, {
          baseAllocation: { virtualSize: 4096, clusters: new ClusterSet(1, BLOCK) },
        }),
      UsageError,
    );
  });
});
