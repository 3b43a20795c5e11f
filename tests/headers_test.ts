import assert from "node:assert/strict";
import { join } from "node:path";
import { CorruptImageError } from "../lib/errors.ts";
import {
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  PLATFORM_MACX,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
} from "../lib/vhd/constants.ts";
import {
  blockBitmapSize,
  buildVhdDynamicHeader,
  checkVhdTables,
  decodeParentLocator,
  encodeParentLocator,
  parseVhdDynamicHeader,
  usedBatEntries,
} from "../lib/vhd/dynamic_header.ts";
import { buildVhdFooter, parseVhdFooter, vhdChecksum, vhdGeometry } from "../lib/vhd/footer.ts";
import { formatAllocation, parseAllocation } from "../lib/alloc/allocation.ts";
import {
  readImageAllocation,
  readImageChain,
  readImageLayer,
} from "../lib/headers/image_allocation.ts";
import { dataExtents } from "../lib/io/seek_data.ts";
import {
  ourAllocation as ours,
  pseudoRandom,
  qemu,
  qemuAllocation as qemuSays,
  qemuTest,
  runCli,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { writeVhd } from "./vhd_fixtures.ts";

const MiB = 1024 * 1024;

// ---------------------------------------------------------------- VHD footer and header units

Deno.test("VHD footer: build → parse round trip, checksum and cookie checks", () => {
  const uniqueId = new Uint8Array(16).fill(7);
  const f = buildVhdFooter({
    diskType: DISK_TYPE_DYNAMIC,
    currentSize: 33562624,
    uniqueId,
    timestamp: new Date(Date.UTC(2000, 0, 1, 0, 1, 40)),
  });
  assert.equal(f.length, 512);
  const p = parseVhdFooter(f);
  assert.equal(p.diskType, DISK_TYPE_DYNAMIC);
  assert.equal(p.currentSize, 33562624);
  assert.equal(p.originalSize, 33562624);
  assert.equal(p.dataOffset, 512);
  assert.equal(p.timestamp, 100);
  assert.equal(p.creatorApplication, "dstr");
  assert.deepEqual(p.uniqueId, uniqueId);
  assert.deepEqual(p.geometry, { cylinders: 964, heads: 4, sectorsPerTrack: 17 });

  const fixed = parseVhdFooter(buildVhdFooter({ diskType: DISK_TYPE_FIXED, currentSize: 1 * MiB }));
  assert.equal(fixed.dataOffset, null);

  const flipped = f.slice();
  flipped[48 + 7] ^= 1;
  assert.throws(
    () => parseVhdFooter(flipped, 1000),
    (e) =>
      e instanceof CorruptImageError && /checksum mismatch/.test(e.message) && e.offset === 1064,
  );
  const badCookie = f.slice();
  badCookie[0] = 0x43;
  assert.throws(() => parseVhdFooter(badCookie), /not a VHD footer: cookie is "Conectix"/);
  assert.throws(() => parseVhdFooter(f.subarray(0, 100)), /truncated/);
  const badType = buildVhdFooter({ diskType: 5, currentSize: MiB });
  assert.throws(() => parseVhdFooter(badType), /disk type 5/);
});

Deno.test("VHD geometry follows the specification's algorithm", () => {
  assert.deepEqual(vhdGeometry(33562624), { cylinders: 964, heads: 4, sectorsPerTrack: 17 });
  assert.deepEqual(vhdGeometry(2 ** 40), { cylinders: 65535, heads: 16, sectorsPerTrack: 255 });
});

Deno.test("VHD dynamic header: round trip with parent locators, checks", () => {
  const macx = encodeParentLocator(PLATFORM_MACX, "./parent.vhd");
  const w2ku = encodeParentLocator(PLATFORM_W2KU, "C:\\disks\\parent.vhd");
  const h = buildVhdDynamicHeader({
    tableOffset: 1536,
    maxTableEntries: 16,
    parentUuid: new Uint8Array(16).fill(9),
    parentUnicodeName: "parent.vhd",
    parentLocators: [
      { platformCode: PLATFORM_MACX, dataSpace: 1, dataLength: macx.length, dataOffset: 4096 },
      { platformCode: PLATFORM_W2KU, dataSpace: 1, dataLength: w2ku.length, dataOffset: 4608 },
    ],
  });
  const p = parseVhdDynamicHeader(h, 512);
  assert.equal(p.tableOffset, 1536);
  assert.equal(p.maxTableEntries, 16);
  assert.equal(p.blockSize, 2 * MiB);
  assert.equal(p.parentUnicodeName, "parent.vhd");
  assert.deepEqual(p.parentUuid, new Uint8Array(16).fill(9));
  assert.deepEqual(p.parentLocators.map((l) => [l.index, l.platformCode, l.dataOffset]), [
    [0, "MacX", 4096],
    [1, "W2ku", 4608],
  ]);
  assert.equal(decodeParentLocator(PLATFORM_MACX, macx), "./parent.vhd");
  assert.equal(decodeParentLocator(PLATFORM_W2KU, w2ku), "C:\\disks\\parent.vhd");
  assert.equal(
    decodeParentLocator(PLATFORM_W2RU, new Uint8Array([0x2e, 0, 0x5c, 0, 0x70, 0, 0, 0])),
    ".\\p",
  );
  assert.equal(decodeParentLocator("Mac ", macx), undefined);

  assert.equal(usedBatEntries(33562624, 2 * MiB), 17);
  assert.equal(blockBitmapSize(2 * MiB), 512);
  assert.equal(blockBitmapSize(4096), 512);
  checkVhdTables(p, 32 * MiB, 512, 8192);
  assert.throws(() => checkVhdTables(p, 33562624, 512), /16 entries, fewer than the 17 blocks/);
  assert.throws(() => checkVhdTables(p, 32 * MiB, 512, 1599), /BAT at 1536 lies past the end/);
  assert.throws(
    () => checkVhdTables(p, 32 * MiB, 512, 4200),
    /parent locator 1 \(38 bytes at 4608\)/,
  );

  const flipped = h.slice();
  flipped[700] ^= 0x10;
  assert.throws(
    () => parseVhdDynamicHeader(flipped, 512),
    (e) => e instanceof CorruptImageError && e.offset === 548 && /checksum/.test(e.message),
  );
  const cookie = h.slice();
  cookie[1] = 0;
  assert.throws(() => parseVhdDynamicHeader(cookie), /not a VHD dynamic header/);
  const badBlock = buildVhdDynamicHeader({
    tableOffset: 1536,
    maxTableEntries: 1,
    blockSize: 3000,
  });
  assert.throws(() => parseVhdDynamicHeader(badBlock), /block size 3000/);
  assert.equal(
    parseVhdFooter(buildVhdFooter({ diskType: DISK_TYPE_DIFFERENCING, currentSize: MiB }))
      .diskType,
    DISK_TYPE_DIFFERENCING,
  );
});

qemuTest("VHD footer and header parse what qemu-img writes", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "d.vhd");
    await qemu(["create", "-f", "vpc", path, "32M"]);
    const bytes = await Deno.readFile(path);
    const copy = parseVhdFooter(bytes.subarray(0, 512), 0);
    const footer = parseVhdFooter(bytes.subarray(bytes.length - 512), bytes.length - 512);
    assert.deepEqual(copy, footer);
    assert.equal(footer.currentSize, 33562624);
    assert.equal(footer.diskType, DISK_TYPE_DYNAMIC);
    const header = parseVhdDynamicHeader(
      bytes.subarray(footer.dataOffset!, footer.dataOffset! + 1024),
      footer.dataOffset!,
    );
    assert.equal(header.blockSize, 2 * MiB);
    assert.ok(header.maxTableEntries >= 17);
    checkVhdTables(header, footer.currentSize, footer.dataOffset!, bytes.length);
    assert.deepEqual(header.parentLocators, []);
  });
});

// ---------------------------------------------------------------- helpers for image tests

const BLOCK = 2 * MiB;

/** A raw file of `blocks` chunks of `unit` bytes: random where `data(i)`, zeros elsewhere. */
async function rawFile(
  path: string,
  blocks: number,
  unit: number,
  data: (i: number) => boolean,
  fill?: number,
) {
  const writes: [number, Uint8Array][] = [];
  for (let i = 0; i < blocks; i++) {
    if (data(i)) {
      writes.push([
        i * unit,
        fill === undefined ? pseudoRandom(unit, i + 1) : new Uint8Array(unit).fill(fill),
      ]);
    }
  }
  await writeSparse(path, blocks * unit, writes);
}

/** Runs a headers command and expects a clean failure: exit 1, one stderr line. */
async function failsCleanly(args: string[], pattern: RegExp): Promise<string> {
  const r = await runCli(args);
  assert.equal(r.code, 1, `exit status of ${args.join(" ")}: ${r.stderr}`);
  assert.equal(r.stdout.length, 0);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `one line on stderr, got: ${r.stderr}`);
  assert.match(lines[0], /^diskstream: /);
  assert.match(lines[0], pattern);
  return lines[0];
}

const text = (b: Uint8Array) => new TextDecoder().decode(b);

// ---------------------------------------------------------------- VHD

qemuTest("headers: the compat.md example is exact (vpc, intervals and legacy)", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    const vhd = join(dir, "disk.vhd");
    await rawFile(raw, 16, BLOCK, (i) => i < 3 || i > 12);
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
    const interval = '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[[0,2],[13,15]]}';
    const legacy = '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[0,1,2,13,14,15]}';
    for (
      const [args, want] of [
        [["headers", vhd], interval],
        [["headers", vhd, "--legacy"], legacy],
        [["read_headers", vhd], legacy],
        [["read_headers_interval", vhd], interval],
      ] as const
    ) {
      const r = await runCli([...args]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(text(r.stdout), want, args.join(" "));
    }
    // All random → [[0,15]]; all zero → [].
    await rawFile(raw, 16, BLOCK, () => true);
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
    assert.equal(
      await ours(vhd),
      '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[[0,15]]}',
    );
    await rawFile(raw, 16, BLOCK, () => false);
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
    assert.equal(await ours(vhd), '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[]}');
  });
});

qemuTest("headers: dynamic and fixed VHD agree with qemu-img map", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    await rawFile(raw, 24, BLOCK, (i) => [1, 2, 7, 20, 23].includes(i));
    const dyn = join(dir, "dyn.vhd");
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, dyn]);
    assert.equal(await ours(dyn), await qemuSays(dyn, BLOCK));
    assert.deepEqual(JSON.parse(await ours(dyn, true)).data_clusters, [1, 2, 7, 20, 23]);

    const fixed = join(dir, "fixed.vhd");
    await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", raw, fixed]);
    const a = await readImageAllocation(fixed);
    assert.equal(a.virtualSize, JSON.parse(await ours(dyn)).virtual_size);
    assert.equal(a.clusters.clusterSize, BLOCK);
    if (dataExtents(fixed, a.virtualSize) === null) {
      assert.equal(a.clusters.count, a.clusters.length); // no hole detection: everything
    } else {
      // qemu-img probes a fixed VHD as raw (footer included): clip its map to the disk.
      const map = JSON.parse(await qemu(["map", "--output=json", fixed])).filter(
        (e: { start: number }) => e.start < a.virtualSize,
      );
      const want = parseAllocation(JSON.stringify(map), BLOCK, "map", {
        "virtual-size": a.virtualSize + 512,
      });
      assert.deepEqual([...a.clusters.runs()], [...want.clusters.runs()]);
      for (const c of [1, 2, 7, 20, 23]) assert.ok(a.clusters.has(c));
    }
  });
});

Deno.test("headers: differencing VHD chains follow MacX, W2ru, W2ku and the unicode name", async () => {
  await withTempDir(async (dir) => {
    const size = 16 * BLOCK;
    await writeVhd(join(dir, "base.vhd"), {
      diskType: DISK_TYPE_DYNAMIC,
      size,
      blocks: [0, 1, 15],
    });
    await Deno.mkdir(join(dir, "sub"));
    // XenServer style: MacX with a relative file:// URL, relative to the child's folder.
    await writeVhd(join(dir, "sub", "mid.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [4],
      locators: [[PLATFORM_MACX, "./../base.vhd"]],
    });
    // Hyper-V style: an absolute W2ku path that does not exist here, then W2ru.
    await writeVhd(join(dir, "sub", "top.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [1, 9],
      locators: [[PLATFORM_W2KU, "D:\\elsewhere\\nothing.vhd"], [PLATFORM_W2RU, ".\\mid.vhd"]],
    });
    const want = (runs: string) =>
      `{"virtual_size":${size},"cluster_bits":21,"data_clusters":${runs}}`;
    assert.equal(await ours(join(dir, "sub", "mid.vhd")), want("[[0,1],[4,4],[15,15]]"));
    assert.equal(await ours(join(dir, "sub", "top.vhd")), want("[[0,1],[4,4],[9,9],[15,15]]"));
    // No locator: the parent unicode name (UTF-16BE), relative to the child's folder.
    await writeVhd(join(dir, "named.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [],
      parentName: "base.vhd",
    });
    assert.equal(await ours(join(dir, "named.vhd")), want("[[0,1],[15,15]]"));
    // A W2ku absolute path falls back to its file name in the child's folder.
    await writeVhd(join(dir, "winabs.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [3],
      locators: [[PLATFORM_W2KU, "C:\\VMs\\base.vhd"]],
    });
    assert.equal(await ours(join(dir, "winabs.vhd")), want("[[0,1],[3,3],[15,15]]"));
  });
});

qemuTest("headers: a hand-made differencing VHD over a qemu-img parent", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    await rawFile(raw, 16, BLOCK, (i) => i < 3 || i > 12);
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, join(dir, "parent.vhd")]);
    const child = join(dir, "child.vhd");
    await writeVhd(child, {
      diskType: DISK_TYPE_DIFFERENCING,
      size: 33562624,
      blocks: [5, 16],
      locators: [[PLATFORM_MACX, "./parent.vhd"]],
      parentName: "parent.vhd",
    });
    const r = await runCli(["headers", child]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      text(r.stdout),
      '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[[0,2],[5,5],[13,16]]}',
    );
  });
});

// ---------------------------------------------------------------- qcow2

/** A raw file with data at scattered, unaligned places (and a partial last cluster). */
async function scatteredRaw(path: string): Promise<void> {
  const size = 8 * MiB + 4608;
  await writeSparse(path, size, [
    [0, pseudoRandom(700, 1)],
    [65536 * 3 + 100, pseudoRandom(5000, 2)],
    [MiB + 512, pseudoRandom(512, 3)],
    [3 * MiB - 10, pseudoRandom(300000, 4)],
    [7 * MiB, pseudoRandom(4096, 5)],
    [size - 1000, pseudoRandom(1000, 6)],
  ]);
}

qemuTest("headers: qcow2 at 512 B, 4K, 64K and 2M clusters agrees with qemu-img map", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    await scatteredRaw(raw);
    for (const cs of ["512", "4K", "64K", "2M"]) {
      const img = join(dir, `c${cs}.qcow2`);
      await qemu(["convert", "-f", "raw", "-O", "qcow2", "-o", `cluster_size=${cs}`, raw, img]);
      const got = await ours(img);
      assert.equal(got, await qemuSays(img), `cluster size ${cs}`);
      assert.notEqual(JSON.parse(got).data_clusters.length, 0);
    }
    // The same through the command line, in both output forms.
    const img = join(dir, "c64K.qcow2");
    const r = await runCli(["read_headers", img]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(text(r.stdout), await ours(img, true));
  });
});

qemuTest(
  "headers: compressed, ZERO and v2 (compat=0.10) qcow2 agree with qemu-img map",
  async () => {
    await withTempDir(async (dir) => {
      const raw = join(dir, "disk.raw");
      await rawFile(raw, 64, 65536, (i) => i % 3 === 0, 0x41);
      const thirds = Array.from({ length: 22 }, (_, i) => i * 3);
      const comp = join(dir, "comp.qcow2");
      await qemu(["convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp]);
      const layer = await readImageLayer(comp);
      assert.ok(layer.qcow2!.counts.compressed > 0, "qemu-img wrote compressed clusters");
      assert.equal(await ours(comp), await qemuSays(comp));
      assert.deepEqual(JSON.parse(await ours(comp, true)).data_clusters, thirds);

      // ZERO entries: plain (never allocated) and with stale host data (ZERO_ALLOC).
      const zero = join(dir, "zero.qcow2");
      await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, zero]);
      await qemu(
        ["-c", "write -z 0 64k", "-c", "write -z 1M 128k", "-c", "write -z 3M 64k", zero],
        "qemu-io",
      );
      const z = await readImageLayer(zero);
      assert.equal(z.qcow2!.counts.zero, 4);
      assert.equal(await ours(zero), await qemuSays(zero));
      assert.deepEqual(
        JSON.parse(await ours(zero, true)).data_clusters,
        thirds.filter((c) => c !== 0 && c !== 48),
      );

      const v2 = join(dir, "v2.qcow2");
      await qemu(["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", raw, v2]);
      assert.equal((await readImageLayer(v2)).qcow2!.header.version, 2);
      assert.equal(await ours(v2), await qemuSays(v2));
    });
  },
);

qemuTest(
  "headers: qcow2 backing chains (qcow2, raw, vpc below; ZERO masks) agree with qemu-img map",
  async () => {
    await withTempDir(async (dir) => {
      const raw = join(dir, "base.raw");
      await scatteredRaw(raw);
      const base = join(dir, "base.qcow2");
      await qemu(["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4K", raw, base]);
      const mid = join(dir, "mid.qcow2");
      await qemu([
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=64K",
        mid,
      ]);
      await qemu(["-c", "write -P 9 5M 100k", "-c", "write -z 0 64k", mid], "qemu-io");
      const top = join(dir, "top.qcow2");
      await qemu([
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=2M",
        top,
      ]);
      await qemu(["-c", "write -P 5 6M 4k", "-c", "write -z 2M 2M", top], "qemu-io");
      for (const img of [mid, top]) assert.equal(await ours(img), await qemuSays(img), img);
      assert.equal((await readImageChain(top)).length, 3);

      const overRaw = join(dir, "over-raw.qcow2");
      await qemu(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", overRaw]);
      await qemu(["-c", "write -P 3 6M 64k", overRaw], "qemu-io");
      const r = await readImageAllocation(overRaw);
      if (dataExtents(raw, 1) !== null) assert.equal(formatAllocation(r), await qemuSays(overRaw));
      else assert.equal(r.clusters.count, r.clusters.length); // raw without hole detection

      const vhdRaw = join(dir, "v.raw");
      await rawFile(vhdRaw, 8, BLOCK, (i) => i === 2 || i === 6);
      await qemu(["convert", "-f", "raw", "-O", "vpc", vhdRaw, join(dir, "v.vhd")]);
      const overVhd = join(dir, "over-vhd.qcow2");
      await qemu(["create", "-f", "qcow2", "-b", "v.vhd", "-F", "vpc", overVhd]);
      await qemu(["-c", "write -P 3 0 64k", "-c", "write -z 13M 64k", overVhd], "qemu-io");
      assert.equal(await ours(overVhd), await qemuSays(overVhd));
    });
  },
);

qemuTest(
  "headers: extended L2 (subclusters) lists clusters with any allocated subcluster",
  async () => {
    await withTempDir(async (dir) => {
      const img = join(dir, "ext.qcow2");
      await qemu(["create", "-f", "qcow2", "-o", "extended_l2=on", img, "8M"]);
      await qemu([
        "-c",
        "write -P 3 4k 4k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -P 1 200k 2k",
        "-c",
        "write -P 2 7M 1M",
        img,
      ], "qemu-io");
      const got = await ours(img);
      assert.equal(got, await qemuSays(img));
      assert.equal(JSON.parse(got).data_clusters.length, 3);
    });
  },
);

// ---------------------------------------------------------------- bad images

qemuTest("headers: bad images fail with exit 1 and one line", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    await rawFile(raw, 16, BLOCK, (i) => i < 3 || i > 12);
    const vhd = join(dir, "disk.vhd");
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
    const q = join(dir, "disk.qcow2");
    await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, q]);
    const vhdBytes = await Deno.readFile(vhd);
    const qBytes = await Deno.readFile(q);
    const bad = join(dir, "bad");

    // Not an image at all.
    await failsCleanly(["headers", raw], /: not a qcow2 or VHD image: .*(zeros|found bytes)/);
    await Deno.writeFile(bad, new TextEncoder().encode("KDMV and more bytes of a vmdk"));
    await failsCleanly(["headers", bad], /found a VMDK image/);

    // qcow2 with a corrupt magic.
    const m = qBytes.slice();
    m[0] = 0x51 ^ 0x20;
    await Deno.writeFile(bad, m);
    await failsCleanly(["headers", bad], /not a qcow2 or VHD image/);

    // VHD: a flipped byte in the footer copy → checksum mismatch at offset 64.
    const f = vhdBytes.slice();
    f[40] ^= 0x01;
    await Deno.writeFile(bad, f);
    await failsCleanly(["read_headers", bad], /footer checksum mismatch.*at byte offset 64\)/);
    // ... and in the dynamic header (offset 512 + 36).
    const h = vhdBytes.slice();
    h[512 + 30] ^= 0x01;
    await Deno.writeFile(bad, h);
    await failsCleanly(["headers", bad], /dynamic header checksum mismatch.*at byte offset 548\)/);

    // Truncated files.
    await Deno.writeFile(bad, vhdBytes.subarray(0, vhdBytes.length - 4096));
    await failsCleanly(["headers", bad], /footer missing from the last 512 bytes .*truncated/);
    await Deno.writeFile(bad, qBytes.subarray(0, 4 * 65536 - 100));
    await failsCleanly(["headers", bad], /past the end of the \d+-byte file/);
    await Deno.writeFile(bad, qBytes.subarray(0, 40));
    await failsCleanly(["headers", bad], /truncated|not a qcow2 or VHD/);

    // L1 table offset past the end of the file.
    const l1 = qBytes.slice();
    new DataView(l1.buffer).setBigUint64(40, 1n << 40n);
    await Deno.writeFile(bad, l1);
    await failsCleanly(["headers", bad], /L1 table .* past the end .*at byte offset 40\)/);

    // A VHD BAT larger than the file could hold.
    const big = vhdBytes.slice();
    const hv = new DataView(big.buffer, 512, 1024);
    hv.setUint32(28, 0x10000000);
    hv.setUint32(36, 0);
    hv.setUint32(36, vhdChecksum(big.subarray(512, 1536), 36));
    await Deno.writeFile(bad, big);
    await failsCleanly(["headers", bad], /BAT of 268435456 entries .* larger than the/);
  });
});

qemuTest("headers: backing loops and missing parents fail cleanly", async () => {
  await withTempDir(async (dir) => {
    const a = join(dir, "a.qcow2");
    const b = join(dir, "b.qcow2");
    await qemu(["create", "-f", "qcow2", a, "1M"]);
    await qemu(["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b]);
    await qemu(["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a]);
    await failsCleanly(
      ["headers", b],
      /loop in the backing chain: .*b\.qcow2 → .*a\.qcow2 → .*b\.qcow2/,
    );

    const orphan = join(dir, "orphan.qcow2");
    await qemu([
      "create",
      "-u",
      "-f",
      "qcow2",
      "-b",
      "gone.qcow2",
      "-F",
      "qcow2",
      "-o",
      "size=1M",
      orphan,
    ]);
    await failsCleanly(["headers", orphan], /backing file "gone\.qcow2" of .* not found/);

    // VHD: a child naming itself, and a child whose parent is gone.
    await writeVhd(join(dir, "self.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size: BLOCK,
      blocks: [],
      locators: [[PLATFORM_MACX, "./self.vhd"]],
    });
    await failsCleanly(["headers", join(dir, "self.vhd")], /loop in the backing chain/);
    await writeVhd(join(dir, "lost.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size: BLOCK,
      blocks: [0],
      locators: [[PLATFORM_MACX, "./missing-parent.vhd"]],
    });
    await failsCleanly(
      ["read_headers_interval", join(dir, "lost.vhd")],
      /parent "\.\/missing-parent\.vhd" of .*lost\.vhd not found \(tried .*missing-parent\.vhd\)/,
    );
    await failsCleanly(["headers", join(dir, "nope.qcow2")], /no such file/);
  });
});

Deno.test("headers, read_headers and info refuse NBD URIs and URLs in one line saying what to use", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["headers", "nbd://127.0.0.1/disk"],
      /headers reads qcow2 or VHD image files, not NBD exports.*nbdinfo --map nbd:\/\/127\.0\.0\.1\/disk/,
    ],
    [["read_headers", "nbd+unix:///d?socket=/tmp/x.sock"], /read_headers reads .* not NBD exports/],
    [
      ["vhd-tool", "read_headers_interval", "nbd://h/e"],
      /read_headers_interval|headers reads .* not NBD exports/,
    ],
    [
      ["info", "https://root:secret@127.0.0.1:1/d.qcow2"],
      /info reads qcow2 or VHD image files, not URLs: download https:\/\/root:\*\*\*@/,
    ],
  ];
  for (const [args, want] of cases) {
    const r = await runCli(args);
    assert.equal(r.code, 2, args.join(" "));
    assert.match(r.stderr, want);
    assert.doesNotMatch(r.stderr, /secret|no such file/);
    assert.equal(r.stderr.trim().split("\n").length, 1);
  }
});
