/**
 * `diskstream import` of VHD streams through a pipe: dynamic disks from
 * `qemu-img convert -O vpc`, fixed disks (footer at the end, size unknown on a pipe),
 * hand-built dynamic disks with blocks out of order, the BAT after the blocks and
 * partial sector bitmaps, differencing disks with --delta, and broken streams.
 */
import assert from "node:assert/strict";
import { buildVhdDynamicHeader } from "../lib/vhd/dynamic_header.ts";
import { buildVhdFooter } from "../lib/vhd/footer.ts";
import { pseudoRandom, qemu, qemuTest, runCli, withTempDir } from "./helpers.ts";
import {
  assertOk,
  assertOneLineError,
  importMatches,
  importPiped,
  qemuRaw,
  sourceDisk,
  truncatedCopy,
} from "./import_fixtures.ts";

qemuTest("import: dynamic VHD from qemu-img convert -O vpc, new file stays sparse", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src);
    const img = `${dir}/d.vhd`;
    await qemu(["convert", "-O", "vpc", src, img]);
    const out = `${dir}/out.raw`;
    await importMatches(img, await qemuRaw(img, "vpc", `${dir}/want.raw`), out);
    const st = await Deno.stat(out);
    assert.ok(st.blocks !== null && st.blocks * 512 < 2 << 20, `${st.blocks} blocks`);
    // An all-zero disk has no blocks at all.
    const zero = `${dir}/zero.raw`;
    await Deno.writeFile(zero, new Uint8Array(1 << 20));
    const zimg = `${dir}/zero.vhd`;
    await qemu(["convert", "-O", "vpc", zero, zimg]);
    await importMatches(zimg, await qemuRaw(zimg, "vpc", `${dir}/zwant.raw`), `${dir}/zout.raw`);
  });
});

qemuTest("import -f vhd: fixed VHD from a pipe (size unknown) and from a file", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await sourceDisk(src, 5);
    const img = `${dir}/f.vhd`;
    await qemu(["convert", "-O", "vpc", "-o", "subformat=fixed", src, img]);
    const want = await qemuRaw(img, "vpc", `${dir}/want.raw`);
    await importMatches(img, want, `${dir}/piped.raw`, ["-f", "vhd"]);
    const fromFile = `${dir}/file.raw`;
    await importMatches("/dev/null", want, fromFile, ["-f", "vhd", "-i", img]);
    // Auto-detection cannot see a fixed VHD (raw data first): a clear hint.
    assertOneLineError(await importPiped(img, `${dir}/auto.raw`), /fixed VHD .*-f vhd/);
    // Cut off: the footer is missing.
    const cut = `${dir}/cut.vhd`;
    await truncatedCopy(img, cut, (await Deno.stat(img)).size - 100);
    assertOneLineError(await importPiped(cut, `${dir}/cut.raw`, ["-f", "vhd"]), /VHD footer/);
    await assert.rejects(Deno.stat(`${dir}/cut.raw`), Deno.errors.NotFound);
  });
});

/** Blocks of a hand-built VHD: data and an optional sector bitmap (default all set). */
interface TestBlock {
  data: Uint8Array;
  bitmap?: Uint8Array;
}

const BLOCK = 64 * 1024;
const SIZE = 5 * BLOCK + 4096;

/** Builds a dynamic (or differencing) VHD with blocks in `order`, the BAT first or last. */
function buildVhd(
  blocks: Map<number, TestBlock>,
  order: number[],
  opts: { batLast?: boolean; diskType?: number } = {},
): Uint8Array {
  const diskType = opts.diskType ?? 3;
  const footer = buildVhdFooter({ diskType, currentSize: SIZE });
  const entries = Math.ceil(SIZE / BLOCK);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const blockBytes = 512 + BLOCK; // a 512-byte bitmap, then the data
  const blocksStart = opts.batLast ? 1536 : 1536 + batBytes;
  const tableOffset = opts.batLast ? blocksStart + order.length * blockBytes : 1536;
  const out = new Uint8Array(1536 + batBytes + order.length * blockBytes + 512);
  out.set(footer, 0);
  out.set(buildVhdDynamicHeader({ tableOffset, maxTableEntries: entries, blockSize: BLOCK }), 512);
  const bat = new DataView(out.buffer, tableOffset, batBytes);
  for (let i = 0; i < entries; i++) bat.setUint32(i * 4, 0xffffffff);
  order.forEach((b, k) => {
    const at = blocksStart + k * blockBytes;
    bat.setUint32(b * 4, at / 512);
    const block = blocks.get(b)!;
    out.set(block.bitmap ?? new Uint8Array(16).fill(0xff), at);
    out.set(block.data, at + 512);
  });
  out.set(footer, out.length - 512);
  return out;
}

/** What the disk reads: bitmap-set sectors from the blocks, the rest from `under`. */
function expected(blocks: Map<number, TestBlock>, under: Uint8Array): Uint8Array {
  const disk = under.slice(0, SIZE);
  for (const [b, { data, bitmap }] of blocks) {
    for (let s = 0; s < BLOCK / 512; s++) {
      const set = bitmap ? (bitmap[s >> 3] & (0x80 >> (s & 7))) !== 0 : true;
      const at = b * BLOCK + s * 512;
      if (at >= SIZE) break;
      if (set) disk.set(data.subarray(s * 512, s * 512 + Math.min(512, SIZE - at)), at);
      else if (under === ZEROS) disk.fill(0, at, at + 512);
    }
  }
  return disk;
}

const ZEROS = new Uint8Array(SIZE);

/** Asserts equal bytes, naming the first difference (deepEqual is slow on megabytes). */
function assertBytes(got: Uint8Array, want: Uint8Array) {
  assert.equal(got.length, want.length, "length");
  const at = got.findIndex((b, i) => b !== want[i]);
  assert.equal(at, -1, `first difference at byte ${at}: ${got[at]} != ${want[at]}`);
}

/** Blocks 0, 2 (half its sectors) and 5 (the partial last one). */
function testBlocks(): Map<number, TestBlock> {
  const half = new Uint8Array(16);
  half.fill(0xf0, 0, 8); // sectors 0-3, 8-11, ... of the first half
  return new Map<number, TestBlock>([
    [0, { data: pseudoRandom(BLOCK, 1) }],
    [2, { data: pseudoRandom(BLOCK, 2), bitmap: half }],
    [5, { data: pseudoRandom(BLOCK, 3) }],
  ]);
}

qemuTest(
  "import: dynamic VHD with blocks out of order, BAT after them, partial bitmaps",
  async () => {
    await withTempDir(async (dir) => {
      const blocks = testBlocks();
      const want = expected(blocks, ZEROS);
      for (const batLast of [false, true]) {
        const img = `${dir}/h${batLast}.vhd`;
        await Deno.writeFile(img, buildVhd(blocks, [5, 0, 2], { batLast }));
        const out = `${dir}/h${batLast}.raw`;
        assertOk(await importPiped(img, out));
        assertBytes(await Deno.readFile(out), want);
        // An existing non-zero destination: clear bitmap bits and missing blocks are zeroed.
        const existing = `${dir}/e${batLast}.raw`;
        await Deno.writeFile(existing, new Uint8Array(SIZE).fill(0x33));
        assertOk(await importPiped(img, existing));
        assertBytes(await Deno.readFile(existing), want);
        // From a file: header and BAT read first, nothing held, whatever the layout.
        const file = `${dir}/f${batLast}.raw`;
        const r = await runCli(["import", file, "-i", img, "--max-buffer", "4K", "--no-spool"]);
        assertOk(r);
        assertBytes(await Deno.readFile(file), want);
      }
      // The BAT after the blocks with too little buffer: spooled, or refused without a spool.
      const img = `${dir}/htrue.vhd`;
      const small = await importPiped(img, `${dir}/small.raw`, ["--max-buffer", "64K"]);
      assertOk(small);
      assert.match(small.stderr, /waited in a spool file/);
      assertBytes(await Deno.readFile(`${dir}/small.raw`), want);
      assertOneLineError(
        await importPiped(img, `${dir}/nospool.raw`, ["--max-buffer", "64K", "--no-spool"]),
        /needs --max-buffer \d+M/,
      );
    });
  },
);

qemuTest("import --delta: a differencing VHD leaves clear sectors to the parent", async () => {
  await withTempDir(async (dir) => {
    const blocks = testBlocks();
    const img = `${dir}/diff.vhd`;
    await Deno.writeFile(img, buildVhd(blocks, [0, 2, 5], { diskType: 4 }));
    assertOneLineError(await importPiped(img, `${dir}/x.raw`), /differencing .*--delta/);
    const parent = pseudoRandom(SIZE, 9);
    const out = `${dir}/parent.raw`;
    await Deno.writeFile(out, parent);
    assertOk(await importPiped(img, out, ["--delta"]));
    assertBytes(await Deno.readFile(out), expected(blocks, parent));
  });
});

qemuTest("import refuses broken VHD streams", async () => {
  await withTempDir(async (dir) => {
    const blocks = testBlocks();
    const good = buildVhd(blocks, [0, 2, 5]);
    const cases: [string, Uint8Array, RegExp][] = [
      ["no final footer", good.subarray(0, good.length - 512), /without the VHD footer/],
      ["cut in a block", good.subarray(0, 4000), /ends at byte 4000, inside the data of block 0/],
      ["cut in the header", good.subarray(0, 1000), /(truncated|ends at byte 1000)/],
    ];
    // A BAT entry pointing into the dynamic header.
    const intoHeader = good.slice();
    new DataView(intoHeader.buffer).setUint32(1536 + 2 * 4, 1);
    cases.push(["BAT into header", intoHeader, /inside (the dynamic header|metadata)/]);
    // Two BAT entries for the same sectors.
    const dup = good.slice();
    const v = new DataView(dup.buffer);
    v.setUint32(1536 + 2 * 4, v.getUint32(1536));
    cases.push(["duplicate block", dup, /two BAT entries claim the same sectors/]);
    // A bad checksum in the footer copy.
    const badSum = good.slice();
    badSum[64] ^= 1;
    cases.push(["checksum", badSum, /checksum mismatch/]);
    for (const [name, bytes, re] of cases) {
      const img = `${dir}/bad.vhd`;
      await Deno.writeFile(img, bytes);
      const out = `${dir}/bad.raw`;
      assertOneLineError(await importPiped(img, out), re);
      await assert.rejects(Deno.stat(out), Deno.errors.NotFound, name);
    }
  });
});
