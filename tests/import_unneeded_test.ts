/**
 * `diskstream import` through a pipe lets go of what it never needs as soon as it is
 * known: a snapshot's own data (its L2 tables say which clusters it maps, the refcount
 * blocks that nothing else does), bitmap tables and bitmap data (from the bitmap
 * directory), whatever order these tables come in; the spool space they took is given
 * back at once. With --no-spool, bytes not kept for want of memory cost nothing unless
 * an active table claims them. Every import is compared with `qemu-img convert -O raw`.
 */
import assert from "node:assert/strict";
import { LOST_RANGE, StreamBuffer } from "../lib/io/stream_buffer.ts";
import { Spool } from "../lib/io/spool.ts";
import { pseudoRandom, qemu, qemuTest, withTempDir } from "./helpers.ts";
import { assertOk, assertSameBytes, importPiped, MiB, qemuRaw } from "./import_fixtures.ts";

const KiB = 1024;

/** `qemu-io -c CMD…` on a qcow2 image. */
async function io(img: string, ...cmds: string[]) {
  await qemu(["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), img], "qemu-io");
}

/** The bytes the closing line says were let go early (0 when it says nothing of it). */
function letGo(stderr: string): number {
  const m = /; ([\d.]+) (KiB|MiB|GiB) of it was let go as soon as it was known to be unneeded/
    .exec(stderr);
  if (!m) return 0;
  return Number(m[1]) * { KiB, MiB, GiB: 1024 * MiB }[m[2] as "KiB" | "MiB" | "GiB"];
}

/** Imports `img` through a pipe with `args` and compares it with qemu-img's reading. */
async function importChecked(img: string, want: string, out: string, args: string[]) {
  const r = await importPiped(img, out, args);
  assertOk(r);
  await assertSameBytes(want, out);
  await Deno.remove(out);
  return r;
}

Deno.test("stream buffer: a dropped part of a spooled piece is cut out and given back", () => {
  const spool = new Spool();
  try {
    const buf = new StreamBuffer(8192, 512, spool);
    const held = pseudoRandom(4096, 1);
    const spooled = pseudoRandom(MiB, 2);
    buf.add(0, held, 0, held.length); // fills memory
    buf.add(4096, spooled, 0, spooled.length); // one spooled piece
    assert.equal(spool.bytes, MiB);
    // The middle of the piece is metadata: cut out, its spool space punched.
    buf.drop(4096 + 128 * KiB, 256 * KiB);
    assert.equal(spool.punched, 256 * KiB, "the dropped range's space is given back");
    assert.ok(buf.dropped(4096 + 200 * KiB));
    assert.equal(buf.take(4096 + 128 * KiB, 64 * KiB), undefined, "dropped bytes are gone");
    // What is left on either side reads back exactly, across the cut too.
    assert.deepEqual(buf.take(4096, 128 * KiB), spooled.subarray(0, 128 * KiB));
    assert.deepEqual(buf.read(4096 + 384 * KiB, 640 * KiB), spooled.subarray(384 * KiB));
    assert.deepEqual(buf.take(0, 4096), held);
    // A range that was never spooled, and the end of the piece.
    buf.drop(4096 + 1000 * KiB, 100 * KiB);
    assert.deepEqual(
      buf.take(4096 + 384 * KiB, 616 * KiB),
      spooled.subarray(384 * KiB, MiB - 24 * KiB),
    );
  } finally {
    spool.close();
  }
});

Deno.test("stream buffer: bytes not kept without a spool fail only when claimed", () => {
  const buf = new StreamBuffer(4096, 512);
  const bytes = pseudoRandom(64 * KiB, 3);
  buf.add(0, bytes, 0, bytes.length);
  assert.equal(buf.overflowed, false, "nothing claimed yet");
  buf.drop(8192, 8192); // stale: never claimed
  assert.equal(buf.take(4096, 4096, true), LOST_RANGE);
  assert.equal(buf.overflowed, false, "an optional look at lost bytes is no failure");
  buf.take(32 * KiB, 512);
  assert.equal(buf.overflowed, true, "data that was not kept was claimed");
  assert.match(buf.overflowError().message, /needs --max-buffer 1M to be imported from a pipe/);
});

qemuTest("import: a snapshot's own data is let go as soon as its tables are known", async () => {
  await withTempDir(async (dir) => {
    // Snapshotted, then every cluster rewritten: the old data is the snapshot's alone.
    const img = `${dir}/snap.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", img, "16M"]);
    await io(img, "write -P 0x51 0 16M");
    await qemu(["snapshot", "-c", "old", img]);
    await io(img, "write -P 0x52 0 16M");
    const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
    const spooled = await importChecked(img, want, `${dir}/a.raw`, ["--max-buffer", "1M"]);
    assert.ok(letGo(spooled.stderr) >= 14 * MiB, spooled.stderr);
    // Without a spool: the old data is never claimed, so not keeping it costs nothing.
    await importChecked(img, want, `${dir}/b.raw`, ["--max-buffer", "1M", "--no-spool"]);

    // Half rewritten: the other half is shared (refcount 2) and must be imported.
    const half = `${dir}/half.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", half, "16M"]);
    await io(half, "write -P 0x61 0 16M");
    await qemu(["snapshot", "-c", "old", half]);
    await io(half, "write -P 0x62 4M 8M", "write -z 12M 1M");
    const wantHalf = await qemuRaw(half, "qcow2", `${dir}/want-half.raw`);
    const r = await importChecked(half, wantHalf, `${dir}/c.raw`, ["--max-buffer", "1M"]);
    const gone = letGo(r.stderr);
    assert.ok(gone >= 7 * MiB && gone <= 10 * MiB, `let go ${gone}: ${r.stderr}`);
  });
});

qemuTest(
  "import: a snapshot's L1 table before the active one (resize after a snapshot)",
  async () => {
    await withTempDir(async (dir) => {
      // 512 B clusters: the resize moves the active L1 table after the snapshot's.
      const img = `${dir}/r.qcow2`;
      await qemu(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"]);
      await io(img, "write -P 0x71 0 1M");
      await qemu(["snapshot", "-c", "s1", img]);
      await qemu(["resize", "-q", img, "64M"]);
      await io(img, "write -P 0x72 0 1M", "write -P 0x73 40M 64k");
      const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
      const r = await importChecked(img, want, `${dir}/a.raw`, ["--max-buffer", "64K"]);
      assert.ok(letGo(r.stderr) >= 900 * KiB, r.stderr);
    });
  },
);

qemuTest("import: bitmap tables and bitmap data are dropped, never counted", async () => {
  await withTempDir(async (dir) => {
    // 16 persistent bitmaps of 512 B granularity (a bitmap cluster covers 256 MiB):
    // 2 MiB of bitmap data after the writes.
    const img = `${dir}/bm.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", img, "1G"]);
    for (let b = 0; b < 16; b++) await qemu(["bitmap", "--add", "-g", "512", img, `b${b}`]);
    await io(img, "write -P 1 0 64k", "write -P 2 300M 64k");
    // Then an L2 table (and its data) after the bitmaps, as a later writer that left
    // the bitmaps alone would put it: patched in by hand, L1 entry 1 (512 MiB on).
    const bytes = await Deno.readFile(img);
    const v = new DataView(bytes.buffer);
    const cs = 2 ** v.getUint32(20);
    const l1 = Number(v.getBigUint64(40));
    assert.equal(v.getBigUint64(l1 + 8), 0n, "L1 entry 1 is free");
    const end = Math.ceil(bytes.length / cs) * cs;
    const tail = new Uint8Array(2 * cs);
    new DataView(tail.buffer).setBigUint64(8, BigInt(end + cs) | (1n << 63n));
    tail.fill(0x7c, cs);
    v.setBigUint64(l1 + 8, BigInt(end) | (1n << 63n));
    const patched = new Uint8Array(end + tail.length);
    patched.set(bytes);
    patched.set(tail, end);
    await Deno.writeFile(img, patched);
    const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
    const r = await importChecked(img, want, `${dir}/a.raw`, ["--max-buffer", "256K"]);
    assert.ok(letGo(r.stderr) >= 1.5 * MiB, `bitmap data let go: ${r.stderr}`);
    await importChecked(img, want, `${dir}/b.raw`, ["--max-buffer", "256K", "--no-spool"]);
  });
});
