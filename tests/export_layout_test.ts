/**
 * The streaming layout, stated as rules and checked on real output (formats.md, "The
 * streaming layout"; the bytes QEMU's scripts/qcow2-to-stdout.py writes):
 * - cluster 0: v3 header, header_length 112, bytes 104–111 zero, no backing file,
 *   no snapshots, no feature bits, then the feature name table (8 entries) at 112;
 * - refcount table at cluster 1, then the refcount blocks, the L1 table, the
 *   non-empty L2 tables in L1 order, the data clusters in ascending guest order;
 * - every cluster of the file has refcount 1, entries past the file are 0;
 * - every L1/L2 entry has COPIED (bit 63) and points at the next table / cluster;
 * - virtual size = source size rounded up to 512, the last partial cluster zero padded.
 */
import assert from "node:assert/strict";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { LimitError, UsageError } from "../lib/errors.ts";
import { exportQcow2 } from "../lib/export/export.ts";
import { streamLayout } from "../lib/qcow2/layout.ts";
import { countL2Tables, fillRefcounts } from "../lib/qcow2/writer.ts";
import {
  checkClean,
  imagesEqual,
  pseudoRandom,
  qemuTest,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const FEATURES = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
] as const;
const COPIED = 1n << 63n;

async function collect(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Refcount entry `i` of a block of `bits`-wide entries (formats.md). */
function refcountAt(block: Uint8Array, i: number, bits: number): bigint {
  if (bits >= 8) {
    const bytes = bits / 8;
    let v = 0n;
    for (let k = 0; k < bytes; k++) v = (v << 8n) | BigInt(block[i * bytes + k]);
    return v;
  }
  const perByte = 8 / bits;
  return BigInt((block[Math.floor(i / perByte)] >> ((i % perByte) * bits)) & ((1 << bits) - 1));
}

/**
 * Checks every layout rule on `image`, the export of `source` (its bytes), and returns
 * the guest clusters found in the L2 tables.
 */
function checkLayout(image: Uint8Array, source: Uint8Array, cs: number, bits: number): number[] {
  const v = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const u64 = (at: number) => v.getBigUint64(at);
  const n = (at: number) => Number(u64(at));
  // Header.
  assert.equal(v.getUint32(0), 0x514649fb);
  assert.equal(v.getUint32(4), 3);
  assert.equal(u64(8), 0n, "no backing file");
  assert.equal(v.getUint32(16), 0);
  assert.equal(2 ** v.getUint32(20), cs);
  const size = n(24);
  assert.equal(size, Math.ceil(source.length / 512) * 512, "virtual size rounded up to 512");
  assert.equal(v.getUint32(32), 0, "no encryption");
  const guest = Math.ceil(size / cs);
  const perTable = cs / 8;
  const l1Size = v.getUint32(36);
  assert.equal(l1Size, Math.ceil(guest / perTable));
  const l1Offset = n(40);
  assert.equal(n(48), cs, "refcount table at cluster 1");
  const rtClusters = v.getUint32(56);
  assert.equal(v.getUint32(60), 0, "no snapshots");
  assert.equal(u64(64), 0n);
  assert.deepEqual([u64(72), u64(80), u64(88)], [0n, 0n, 0n], "no feature bits");
  assert.equal(2 ** v.getUint32(96), bits);
  assert.equal(v.getUint32(100), 112);
  assert.ok(image.subarray(104, 112).every((b) => b === 0), "bytes 104–111 zero");
  assert.equal(v.getUint32(112), 0x6803f857, "feature name table");
  assert.equal(v.getUint32(116), 8 * 48);
  FEATURES.forEach(([type, bit, name], k) => {
    const at = 120 + k * 48;
    assert.equal(image[at], type);
    assert.equal(image[at + 1], bit);
    const text = new TextDecoder().decode(image.subarray(at + 2, at + 48)).replace(/\0+$/, "");
    assert.equal(text, name);
  });
  assert.ok(image.subarray(120 + 8 * 48, cs).every((b) => b === 0), "zero padding, end marker");
  assert.equal(image.length % cs, 0);
  const total = image.length / cs;
  // Refcount table: consecutive blocks right after the table; unused entries 0.
  const rbOffset = cs + rtClusters * cs;
  const perBlock = (cs * 8) / bits;
  const blocks = Math.ceil(total / perBlock);
  assert.ok(rtClusters === Math.max(1, Math.ceil(blocks / perTable)));
  for (let i = 0; i < rtClusters * perTable; i++) {
    assert.equal(n(cs + i * 8), i < blocks ? rbOffset + i * cs : 0, `refcount table ${i}`);
  }
  // Refcount blocks: 1 for each cluster of the file, 0 after.
  for (let b = 0; b < blocks; b++) {
    const block = image.subarray(rbOffset + b * cs, rbOffset + (b + 1) * cs);
    const looked = Math.min(perBlock, total - b * perBlock + 64);
    for (let i = 0; i < looked; i++) {
      const cluster = b * perBlock + i;
      assert.equal(refcountAt(block, i, bits), cluster < total ? 1n : 0n, `refcount ${cluster}`);
    }
    assert.ok(block.subarray(Math.ceil((looked * bits) / 8)).every((x) => x === 0));
  }
  // L1 right after the refcount blocks (offset 0 only for an empty disk).
  const l1At = rbOffset + blocks * cs;
  const l1Clusters = Math.ceil(l1Size / perTable);
  assert.equal(l1Offset, l1Clusters === 0 ? 0 : l1At);
  let nextL2 = l1At + l1Clusters * cs;
  const tables: [number, number][] = [];
  for (let i = 0; i < l1Clusters * perTable; i++) {
    const e = u64(l1At + i * 8);
    if (e === 0n) continue;
    assert.ok(i < l1Size, "L1 entries only within l1_size");
    assert.equal(e, BigInt(nextL2) | COPIED, `L1 entry ${i}: next table, COPIED`);
    tables.push([i, nextL2]);
    nextL2 += cs;
  }
  // L2 tables: consecutive data clusters in guest order, every table non-empty.
  let nextData = nextL2;
  const guestClusters: number[] = [];
  for (const [i, at] of tables) {
    let used = 0;
    for (let k = 0; k < perTable; k++) {
      const e = u64(at + k * 8);
      if (e === 0n) continue;
      assert.equal(e, BigInt(nextData) | COPIED, `L2 entry ${i}/${k}: next data cluster, COPIED`);
      const g = i * perTable + k;
      assert.ok(g < guest);
      guestClusters.push(g);
      nextData += cs;
      used++;
    }
    assert.ok(used > 0, "no empty L2 table");
  }
  assert.equal(nextData, image.length, "data clusters end the file, no gaps");
  // Data: the source's clusters (zero padded), exactly the non-zero ones.
  const padded = new Uint8Array(guest * cs);
  padded.set(source);
  const dataAt = nextL2;
  guestClusters.forEach((g, k) => {
    const want = padded.subarray(g * cs, (g + 1) * cs);
    const got = image.subarray(dataAt + k * cs, dataAt + (k + 1) * cs);
    assert.ok(want.every((b, j) => b === got[j]), `data cluster ${k} = guest ${g}`);
  });
  for (let g = 0; g < guest; g++) {
    const nonZero = padded.subarray(g * cs, (g + 1) * cs).some((b) => b !== 0);
    assert.equal(guestClusters.includes(g), nonZero, `cluster ${g} exported iff non-zero`);
  }
  return guestClusters;
}

/** A sparse, unaligned sample: data at the start, the middle and in the last partial cluster. */
function sample(size: number, cs: number): Uint8Array {
  const bytes = new Uint8Array(size);
  bytes.set(pseudoRandom(700, 3), 0);
  bytes.set(pseudoRandom(cs + 5, 4), Math.floor(size / 3));
  bytes.set(pseudoRandom(9, 5), size - 9);
  return bytes;
}

async function exportBytes(
  dir: string,
  bytes: Uint8Array,
  cs: number,
  bits: number,
): Promise<Uint8Array> {
  const path = `${dir}/src-${cs}-${bits}.raw`;
  await Deno.writeFile(path, bytes);
  const e = await exportQcow2(path, { clusterSize: cs, refcountBits: bits });
  const image = await collect(e.stream);
  assert.equal(image.length, e.layout.fileSize);
  return image;
}

Deno.test("layout arithmetic: counts, refcount fixed point and offsets", () => {
  // 512-byte clusters, 64-bit refcounts: 64 refcounts per block, 64 entries per table.
  const l = streamLayout({
    virtualSize: 1 << 20,
    clusterSize: 512,
    refcountBits: 64,
    l2Tables: 32,
    dataClusters: 2048,
  });
  // 1 + 1 (L1) + 32 (L2) + 2048 = 2082 clusters; 33 blocks would not count
  // themselves: ceil((2082 + 1 + 33) / 64) = 34, and 34 is stable.
  assert.equal(l.guestClusters, 2048);
  assert.equal(l.l1Size, 32);
  assert.equal(l.l1Clusters, 1);
  assert.equal(l.refcountBlocks, 34);
  assert.equal(l.refcountTableClusters, 1);
  assert.equal(l.totalClusters, 2117);
  assert.equal(l.refcountTableOffset, 512);
  assert.equal(l.refcountBlockOffset, 1024);
  assert.equal(l.l1TableOffset, 1024 + 34 * 512);
  assert.equal(l.l2TableOffset, l.l1TableOffset + 512);
  assert.equal(l.dataOffset, l.l2TableOffset + 32 * 512);
  assert.equal(l.fileSize, 2117 * 512);
  // Empty disk: header, refcount table, one refcount block; no L1 table.
  const empty = streamLayout({
    virtualSize: 0,
    clusterSize: 65536,
    refcountBits: 16,
    l2Tables: 0,
    dataClusters: 0,
  });
  assert.equal(empty.totalClusters, 3);
  assert.equal(empty.l1Size, 0);
  assert.equal(empty.l1TableOffset, 0);
  assert.equal(empty.fileSize, 3 * 65536);
  // Every cluster is counted by a refcount block, for every width.
  for (let bits = 1; bits <= 64; bits *= 2) {
    for (const data of [0, 1, 4095, 4096, 4097, 100_000]) {
      const x = streamLayout({
        virtualSize: 2 ** 30,
        clusterSize: 4096,
        refcountBits: bits,
        l2Tables: Math.ceil(data / 512),
        dataClusters: data,
      });
      assert.ok(x.refcountBlocks * ((4096 * 8) / bits) >= x.totalClusters);
      assert.ok(x.refcountTableClusters * 512 >= x.refcountBlocks);
    }
  }
});

Deno.test("layout limits: bad geometry and QEMU's L1 limit are refused", () => {
  const base = { virtualSize: 1 << 20, l2Tables: 0, dataClusters: 0 };
  assert.throws(() => streamLayout({ ...base, clusterSize: 1000, refcountBits: 16 }), UsageError);
  assert.throws(() => streamLayout({ ...base, clusterSize: 256, refcountBits: 16 }), UsageError);
  assert.throws(
    () => streamLayout({ ...base, clusterSize: 4 << 20, refcountBits: 16 }),
    UsageError,
  );
  assert.throws(() => streamLayout({ ...base, clusterSize: 65536, refcountBits: 3 }), UsageError);
  assert.throws(() => streamLayout({ ...base, clusterSize: 65536, refcountBits: 128 }), UsageError);
  // 512-byte clusters map at most 2^19 × 512² = 128 GiB.
  const ok = { ...base, clusterSize: 512, refcountBits: 16 };
  assert.equal(streamLayout({ ...ok, virtualSize: 128 * 2 ** 30 }).l1Size, 2 ** 22);
  assert.throws(
    () => streamLayout({ ...ok, virtualSize: 128 * 2 ** 30 + 512 }),
    (err) => err instanceof LimitError && /image too large.*larger cluster size/.test(err.message),
  );
});

Deno.test("refcount blocks: every width packs entries as formats.md says", () => {
  for (let bits = 1; bits <= 64; bits *= 2) {
    const block = new Uint8Array(64);
    const per = (64 * 8) / bits;
    const count = Math.max(1, per - 3);
    fillRefcounts(block, count, bits);
    for (let i = 0; i < per; i++) {
      assert.equal(refcountAt(block, i, bits), i < count ? 1n : 0n, `${bits} bits, entry ${i}`);
    }
  }
  const two = new Uint8Array(2);
  fillRefcounts(two, 5, 2);
  assert.deepEqual([...two], [0x55, 0x01]);
});

Deno.test("layout rules hold for every cluster size and refcount width", async () => {
  await withTempDir(async (dir) => {
    for (let cs = 512; cs <= 2 ** 21; cs *= 2) {
      for (let bits = 1; bits <= 64; bits *= 2) {
        // Small clusters get a disk large enough for several L2 tables and blocks.
        const size = Math.max(cs * 5 + 777, cs <= 4096 ? 300_000 + 333 : 0);
        const source = sample(size, cs);
        const image = await exportBytes(dir, source, cs, bits);
        const guest = checkLayout(image, source, cs, bits);
        assert.ok(guest.length > 0);
      }
    }
  });
});

Deno.test("layout: an empty source gives the three-cluster image", async () => {
  await withTempDir(async (dir) => {
    const image = await exportBytes(dir, new Uint8Array(0), 65536, 16);
    assert.equal(image.length, 3 * 65536);
    checkLayout(image, new Uint8Array(0), 65536, 16);
  });
});

qemuTest("layout: qemu-img check/compare accept every cluster size and width", async () => {
  await withTempDir(async (dir) => {
    for (let cs = 512; cs <= 2 ** 21; cs *= 2) {
      for (let bits = 1; bits <= 64; bits *= 2) {
        const size = cs * 3 + 1000;
        const src = `${dir}/s.raw`;
        await writeSparse(src, size, [
          [0, pseudoRandom(100, 1)],
          [cs * 2 + 17, pseudoRandom(cs, 2)],
          [size - 5, pseudoRandom(5, 9)],
        ]);
        const e = await exportQcow2(src, { clusterSize: cs, refcountBits: bits });
        const out = `${dir}/o.qcow2`;
        await Deno.writeFile(out, e.stream);
        const check = await checkClean(out);
        assert.equal(check["image-end-offset"], e.layout.fileSize);
        assert.ok(await imagesEqual(src, out, "raw", "qcow2"), `cs ${cs} bits ${bits}`);
      }
    }
  });
});

Deno.test("layout: one L2 table per L1 entry that maps a data cluster", () => {
  const set = new ClusterSet(64 * 10, 512);
  for (let t = 0; t < 10; t += 3) set.add(t * 64 + t); // tables 0, 3, 6, 9
  set.addRange(64 * 9, 64 * 9 + 63); // table 9 again, full
  assert.equal(countL2Tables(set, 64), 4);
  assert.equal(countL2Tables(new ClusterSet(1000, 512), 64), 0);
  const edge = new ClusterSet(200, 512);
  edge.addRange(63, 64); // a run across a table boundary
  assert.equal(countL2Tables(edge, 64), 2);
});
