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
import { buildVhdFooter, parseVhdFooter, vhdGeometry } from "../lib/vhd/footer.ts";
import { qemu, qemuTest, withTempDir } from "./helpers.ts";

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
  assert.throws(() => checkVhdTables(p, 32 * MiB, 512, 4200), /parent locator 1 \(38 bytes at 4608\)/);

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
