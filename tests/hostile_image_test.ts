/**
 * Work and memory follow the file, not what it claims (issue 8, item 4): shared or
 * looping L2 tables are refused as corruption, a huge declared size with an empty L1
 * costs nothing, a VHD above 2040 GiB is refused and a large sparse BAT is read in
 * pieces, and import counts its metadata against --max-buffer. Each case runs the CLI
 * with a time and peak-RSS bound (a safety net far above the fixed behaviour, far below
 * the old one: minutes and gigabytes).
 */
import assert from "node:assert/strict";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { buildVhdDynamicHeader, buildVhdFooter } from "../mod.ts";
import { runMeasured } from "../tasks/fuzz_run.ts";
import {
  assertOneLineError,
  patchAt,
  qcow2Tables,
  qemuRaw,
  readU64At,
  writeU64At,
} from "./import_fixtures.ts";
import { CLI, qemu, qemuTest, sha256File, withTempDir } from "./helpers.ts";

const MiB = 2 ** 20;
/** Bounds of every run here: the fixed code stays far below them. */
const BOUNDS = { timeLimitMs: 60_000, rssLimit: 400 * MiB };

function cli(args: string[], stdin?: Uint8Array) {
  return runMeasured(Deno.execPath(), ["run", "-A", CLI, ...args], { ...BOUNDS, stdin });
}

async function bounded(args: string[], stdin?: Uint8Array) {
  const r = await cli(args, stdin);
  assert.equal(r.killed, undefined, `${args.join(" ")}: ${r.killed}`);
  return r;
}

const u64 = (v: bigint) => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v);
  return b;
};

qemuTest("headers/info: L1 entries that all name one L2 table are refused, quickly", async () => {
  await withTempDir(async (dir) => {
    // 4 GiB at 512-byte clusters: a 1 MiB L1 table (131072 entries) in a 1 MB file.
    const img = `${dir}/shared.qcow2`;
    await qemu(["create", "-f", "qcow2", "-o", "cluster_size=512", img, "4G"]);
    await qemu(["-f", "qcow2", "-c", "write -P 7 0 512", img], "qemu-io");
    const t = await qcow2Tables(img);
    const entry = u64(BigInt(t.l2[0]) | (1n << 63n));
    const l1 = new Uint8Array(t.l2.length * 8);
    for (let i = 0; i < t.l2.length; i++) l1.set(entry, i * 8);
    await patchAt(img, t.l1Offset, l1);
    for (const cmd of ["headers", "info"]) {
      const r = await bounded([cmd, img]);
      assertOneLineError(
        { ...r, stdout: r.stdout },
        /L1 entries 0 and 1 both point to the L2 table at \d+: a table shared between entries is corruption/,
      );
      assert.ok(r.peakRss < 200 * MiB, `${cmd}: peak RSS ${r.peakRss}`);
    }
    // The same image through a pipe.
    const r = await bounded(["import", `${dir}/out.raw`], await Deno.readFile(img));
    assertOneLineError(r, /overlap|claims|L2 table/);
  });
});

qemuTest("headers: an L1 entry pointing into the L1 table itself is refused", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/loop.qcow2`;
    await qemu(["create", "-f", "qcow2", "-o", "cluster_size=512", img, "1G"]);
    const t = await qcow2Tables(img);
    await patchAt(img, t.l1Offset + 8, u64(BigInt(t.l1Offset) | (1n << 63n)));
    const r = await bounded(["headers", img]);
    assertOneLineError(r, /L1 entry 1 points to an L2 table at \d+, inside the L1 table/);
  });
});

qemuTest("headers/info: 8 PiB declared with an empty L1 costs what the file holds", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/huge.qcow2`;
    await qemu(["create", "-f", "qcow2", "-o", "cluster_size=2M", img, "8191T"]);
    const h = await bounded(["headers", img]);
    assert.equal(h.code, 0, h.stderr);
    assert.equal(
      new TextDecoder().decode(h.stdout),
      '{"virtual_size":9006099743113216,"cluster_bits":21,"data_clusters":[]}',
    );
    assert.ok(h.peakRss < 200 * MiB, `peak RSS ${h.peakRss}`);
    const i = await bounded(["info", img, "--json"]);
    assert.equal(i.code, 0, i.stderr);
    assert.equal(JSON.parse(new TextDecoder().decode(i.stdout)).allocated_clusters, 0);
    // One cluster written at the very end: listed, still cheaply.
    await qemu(["-f", "qcow2", "-c", "write -P 9 9006099741016064 512", img], "qemu-io");
    const h2 = await bounded(["headers", img]);
    assert.equal(
      new TextDecoder().decode(h2.stdout),
      '{"virtual_size":9006099743113216,"cluster_bits":21,"data_clusters":[[4294443007,4294443007]]}',
    );
  });
});

Deno.test("cluster set: memory follows the clusters added, not the length", () => {
  const set = new ClusterSet(2 ** 40, 512);
  set.add(3);
  set.addRange(2 ** 39, 2 ** 39 + 100);
  set.add(2 ** 40 - 1);
  assert.equal(set.count, 103);
  assert.deepEqual([...set.runs()], [[3, 3], [2 ** 39, 2 ** 39 + 100], [2 ** 40 - 1, 2 ** 40 - 1]]);
  assert.equal(set.nextSet(4), 2 ** 39);
  assert.equal(set.nextClear(2 ** 39), 2 ** 39 + 101);
  assert.ok(set.has(2 ** 40 - 1) && !set.has(2 ** 40 - 2));
  const remapped = set.remap(65536, 2 ** 49);
  assert.deepEqual([...remapped.runs()], [[0, 0], [2 ** 32, 2 ** 32], [2 ** 33 - 1, 2 ** 33 - 1]]);
});

/**
 * A dynamic VHD file: footer copy, header, BAT of `entries` unused entries (or a hole,
 * without `fill`), footer.
 */
async function sparseVhd(path: string, currentSize: number, entries: number, fill = true) {
  const footer = buildVhdFooter({ diskType: 3, currentSize });
  const header = buildVhdDynamicHeader({ tableOffset: 1536, maxTableEntries: entries });
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await f.write(footer);
    await f.write(header);
    await f.truncate(1536 + batBytes + 512);
    await f.seek(1536 + batBytes, Deno.SeekMode.Start);
    await f.write(footer);
  } finally {
    f.close();
  }
  if (!fill) return;
  // An unused BAT reads as all ones: written in 4 MiB pieces.
  const ones = new Uint8Array(4 * MiB).fill(0xff);
  const g = await Deno.open(path, { write: true });
  try {
    for (let at = 0; at < entries * 4; at += ones.length) {
      await g.seek(1536 + at, Deno.SeekMode.Start);
      await g.write(ones.subarray(0, Math.min(ones.length, entries * 4 - at)));
    }
  } finally {
    g.close();
  }
}

Deno.test("VHD: a disk above 2040 GiB is refused before its BAT is read", async () => {
  await withTempDir(async (dir) => {
    // 2^50 bytes: a 2 GiB BAT (sparse in the file) that would be read whole before.
    const img = `${dir}/huge.vhd`;
    const footer = buildVhdFooter({ diskType: 3, currentSize: 2 ** 50 });
    const entries = 2 ** 29;
    const header = buildVhdDynamicHeader({ tableOffset: 1536, maxTableEntries: entries });
    const f = await Deno.open(img, { write: true, create: true });
    await f.write(footer);
    await f.write(header);
    await f.truncate(1536 + entries * 4 + 512);
    await f.seek(1536 + entries * 4, Deno.SeekMode.Start);
    await f.write(footer);
    f.close();
    for (const cmd of ["headers", "info"]) {
      const r = await bounded([cmd, img]);
      assertOneLineError(r, /VHD current size 1125899906842624 is above the 2040 GiB/);
      assert.ok(r.peakRss < 200 * MiB, `${cmd}: peak RSS ${r.peakRss}`);
    }
    // Through a pipe: refused at the header, before the BAT.
    const head = new Uint8Array(1536 + 4096);
    {
      using file = await Deno.open(img);
      await file.read(head);
    }
    const r = await bounded(["import", `${dir}/out.raw`], head);
    assertOneLineError(r, /above the 2040 GiB/);
  });
});

Deno.test("VHD: a 2040 GiB disk's 4 MiB BAT is read in pieces", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/max.vhd`;
    const size = 2040 * 2 ** 30;
    await sparseVhd(img, size, size / (2 * MiB));
    const r = await bounded(["headers", img]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      new TextDecoder().decode(r.stdout),
      `{"virtual_size":${size},"cluster_bits":21,"data_clusters":[]}`,
    );
    assert.ok(r.peakRss < 200 * MiB, `peak RSS ${r.peakRss}`);
  });
});

Deno.test("VHD: a BAT that is a hole (blocks at sector 0, on the footer) is refused", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/hole.vhd`;
    const size = 1024 * 2 ** 30;
    await sparseVhd(img, size, size / (2 * MiB), false);
    const r = await bounded(["headers", img]);
    assertOneLineError(r, /VHD BAT entry 0 places block 0 at sector 0, inside the footer copy/);
  });
});

/**
 * A qcow2 stream (64 KiB clusters) of `tables` L2 tables right after the L1 table,
 * each naming 8192 data clusters far beyond the stream, two clusters apart (so that
 * no two are contiguous).
 */
function farAwayStream(tables: number): Uint8Array {
  const cs = 65536;
  const size = tables * 8192 * cs;
  const out = new Uint8Array((3 + tables) * cs);
  const v = new DataView(out.buffer);
  v.setUint32(0, 0x514649fb);
  v.setUint32(4, 3);
  v.setUint32(20, 16);
  v.setBigUint64(24, BigInt(size));
  v.setUint32(36, tables); // l1_size
  v.setBigUint64(40, BigInt(2 * cs)); // L1 at cluster 2
  v.setBigUint64(48, BigInt(cs)); // refcount table at cluster 1
  v.setUint32(56, 1);
  v.setUint32(96, 4);
  v.setUint32(100, 104);
  for (let t = 0; t < tables; t++) {
    const l2 = (3 + t) * cs;
    v.setBigUint64(2 * cs + t * 8, BigInt(l2) | (1n << 63n));
    for (let j = 0; j < 8192; j++) {
      const host = 2 ** 40 + ((t * 8192 + j) * 2) * cs;
      v.setBigUint64(l2 + j * 8, BigInt(host) | (1n << 63n));
    }
  }
  return out;
}

Deno.test("import: tables naming far-away clusters count against --max-buffer", async () => {
  await withTempDir(async (dir) => {
    // 40 MB of L2 tables: 5 million ranges still to come (about 125 MB of metadata).
    const stream = farAwayStream(600);
    const r = await bounded(["import", `${dir}/out.raw`, "--max-buffer", "16M"], stream);
    assertOneLineError(
      r,
      /the image's tables name \d+ ranges still to come .* more than --max-buffer 16\.0 MiB allows .*needs --max-buffer (\d+)M \(enough for every table still to come\)/,
    );
    assert.ok(r.peakRss < 16 * MiB + 150 * MiB, `peak RSS ${r.peakRss}`);
    // No file left behind by the failed import.
    await assert.rejects(() => Deno.stat(`${dir}/out.raw`));
    // The size named is enough: the import then reads every table and fails only because
    // the clusters they name are past the end of the stream.
    const need = /needs --max-buffer (\d+M)/.exec(r.stderr)![1];
    assert.ok(parseInt(need) <= 512, `named ${need} for about 125 MB of metadata`);
    const again = await bounded(["import", `${dir}/out.raw`, "--max-buffer", need], stream);
    assertOneLineError(again, /the stream ends at byte \d+, but the data of guest cluster 0 /);
  });
});

Deno.test("import: a VHD BAT naming blocks far away counts against --max-buffer", async () => {
  await withTempDir(async (dir) => {
    // 2040 GiB: 1044480 blocks, every one allocated far beyond the stream.
    const size = 2040 * 2 ** 30;
    const entries = size / (2 * MiB);
    const footer = buildVhdFooter({ diskType: 3, currentSize: size });
    const header = buildVhdDynamicHeader({ tableOffset: 1536, maxTableEntries: entries });
    const stream = new Uint8Array(1536 + entries * 4 + 512);
    stream.set(footer, 0);
    stream.set(header, 512);
    const v = new DataView(stream.buffer);
    for (let i = 0; i < entries; i++) v.setUint32(1536 + i * 4, 2 ** 20 + i * 4200);
    stream.set(footer, 1536 + entries * 4);
    const r = await bounded(["import", `${dir}/out.raw`, "--max-buffer", "8M"], stream);
    assertOneLineError(r, /more than --max-buffer 8\.00 MiB allows/);
    assert.ok(r.peakRss < 8 * MiB + 150 * MiB, `peak RSS ${r.peakRss}`);
  });
});

qemuTest(
  "import: extended L2 bits for subclusters past the disk's end are ignored, as QEMU does " +
    "(pipe and -i)",
  async () => {
    await withTempDir(async (dir) => {
      // 64 KiB clusters, 2 KiB subclusters; the disk ends 4 KiB into cluster 1 (two of its
      // 32 subclusters). qemu-io writes subcluster 0 of cluster 1: the file ends there.
      const make = async (name: string, writes: string[]) => {
        const img = `${dir}/${name}.qcow2`;
        await qemu(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "69632"]);
        await qemu(["-f", "qcow2", ...writes.flatMap((w) => ["-c", w]), img], "qemu-io");
        return { img, l2: (await qcow2Tables(img)).l2[0] };
      };
      const same = async (img: string, what: string) => {
        const want = await sha256File(await qemuRaw(img, "qcow2", `${dir}/want.raw`));
        for (const how of ["pipe", "-i"]) {
          const out = `${dir}/out.raw`;
          const r = await cli(
            ["import", out, ...(how === "-i" ? ["-i", img] : [])],
            how === "pipe" ? await Deno.readFile(img) : undefined,
          );
          assert.equal(r.code, 0, `${what}, ${how}: ${r.stderr}`);
          assert.equal(await sha256File(out), want, `${what}, ${how}`);
          await Deno.remove(out);
        }
      };
      // Subcluster 0 of cluster 1 and the 30 past the end marked allocated: those are not
      // in the file (it used to be refused as truncated).
      const all = await make("all", ["write -P 0x11 0 8K", "write -P 0x22 64K 2K"]);
      const entry1 = all.l2 + 16;
      assert.equal(await readU64At(all.img, entry1 + 8), 1n, "subcluster 0 allocated");
      await writeU64At(all.img, entry1 + 8, 0xfffffffdn);
      await same(all.img, "allocated past the end");
      // No host cluster, a bit allocated only past the end: QEMU finds the cluster
      // invalid (any allocated bit without a host cluster), and so does import.
      const none = await make("none", ["write -P 0x11 0 8K"]);
      await writeU64At(none.img, none.l2 + 16 + 8, 1n << 9n);
      await assert.rejects(qemuRaw(none.img, "qcow2", `${dir}/x.raw`));
      const n = await cli(["import", `${dir}/out.raw`], await Deno.readFile(none.img));
      assertOneLineError(n, /marks subcluster 9 allocated but gives no host offset/);
      // With a host cluster, one subcluster both allocated and zero past the end: QEMU
      // finds the whole cluster invalid, and so does import.
      const both = await make("both", ["write -P 0x22 64K 2K"]);
      await writeU64At(both.img, both.l2 + 16 + 8, (1n << 40n) | (1n << 8n) | 1n);
      await assert.rejects(qemuRaw(both.img, "qcow2", `${dir}/x.raw`));
      const r = await cli(["import", `${dir}/out.raw`], await Deno.readFile(both.img));
      assertOneLineError(r, /marks subcluster 8 both allocated and reading as zeros/);
    });
  },
);
