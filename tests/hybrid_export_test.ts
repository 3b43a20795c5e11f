/**
 * The "hybrid" export: `export RAW --allocation IMAGE` takes the allocation from a
 * qcow2/VHD image file's tables and the bytes from the raw disk that exposes the same
 * disk. Each raw file gets garbage planted in a cluster the image does not list, so
 * the output matching the image (not the raw file) shows the hint came from the image.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  checkClean,
  imagesEqual,
  pseudoRandom,
  qemu,
  qemuTest,
  runCli,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const MiB = 1024 * 1024;

/** `qemu-img convert -O raw IMAGE`, then garbage at `plant` (a cluster the image leaves out). */
async function rawOf(image: string, raw: string, plant?: number, format?: string) {
  await qemu(["convert", ...(format ? ["-f", format] : []), "-O", "raw", image, raw]);
  if (plant === undefined) return;
  const f = await Deno.open(raw, { write: true });
  await f.seek(plant, Deno.SeekMode.Start);
  await f.write(pseudoRandom(4096, 99));
  f.close();
}

async function exportHybrid(raw: string, image: string, out: string, ...more: string[]) {
  const r = await runCli(["export", raw, "--allocation", image, "-o", out, ...more]);
  assert.equal(r.code, 0, r.stderr);
  await checkClean(out);
}

qemuTest(
  "hybrid export from a qcow2 chain (ZERO and compressed clusters) matches the image",
  async () => {
    await withTempDir(async (dir) => {
      const src = join(dir, "src.raw");
      await writeSparse(src, 16 * MiB, [
        [0, pseudoRandom(MiB, 1)],
        [5 * MiB, new Uint8Array(MiB).fill(0x33)],
        [12 * MiB + 100, pseudoRandom(70000, 2)],
      ]);
      const base = join(dir, "base.qcow2");
      await qemu(["convert", "-c", "-f", "raw", "-O", "qcow2", src, base]);
      const top = join(dir, "top.qcow2");
      await qemu(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]);
      await qemu(["-c", "write -P 7 8M 192k", "-c", "write -z 0 64k", top], "qemu-io");
      const raw = join(dir, "top.raw");
      await rawOf(top, raw, 10 * MiB); // cluster 160: unallocated in the whole chain
      assert.equal(await imagesEqual(top, raw), false);

      for (const cs of ["64K", "2M", "4K"]) {
        const out = join(dir, `out-${cs}.qcow2`);
        await exportHybrid(raw, top, out, "-c", cs);
        assert.equal(await imagesEqual(top, out), true, `cluster size ${cs}`);
      }
    });
  },
);

qemuTest("hybrid export from dynamic and fixed VHDs matches the image", async () => {
  await withTempDir(async (dir) => {
    const src = join(dir, "src.raw");
    const writes: [number, Uint8Array][] = [];
    for (const b of [0, 1, 2, 13, 14, 15]) writes.push([b * 2 * MiB, pseudoRandom(2 * MiB, b + 1)]);
    await writeSparse(src, 32 * MiB, writes);
    for (const sub of ["dynamic", "fixed"]) {
      const vhd = join(dir, `${sub}.vhd`);
      await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", `subformat=${sub}`, src, vhd]);
      const raw = join(dir, `${sub}.raw`);
      // Garbage in block 3, unallocated in the dynamic VHD. A fixed VHD has no table:
      // its listing depends on hole detection, so its raw copy stays clean.
      // qemu-img probes a fixed VHD as raw (its footer is at the end): say vpc.
      await rawOf(vhd, raw, sub === "dynamic" ? 7 * MiB : undefined, "vpc");
      const out = join(dir, `${sub}.qcow2`);
      await exportHybrid(raw, vhd, out);
      assert.equal(await imagesEqual(vhd, out, "vpc", "qcow2"), true, sub);
    }
  });
});

qemuTest(
  "hybrid diff: --allocation and --base-allocation from qcow2 images rebuild the new disk",
  async () => {
    await withTempDir(async (dir) => {
      const src = join(dir, "src.raw");
      await writeSparse(src, 8 * MiB, [[0, pseudoRandom(3 * MiB, 1)], [
        6 * MiB,
        pseudoRandom(MiB, 2),
      ]]);
      const base = join(dir, "base.qcow2");
      await qemu(["convert", "-f", "raw", "-O", "qcow2", src, base]);
      const next = join(dir, "next.qcow2");
      await qemu(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", next]);
      await qemu([
        "-c",
        "write -P 4 1M 64k",
        "-c",
        "write -z 6M 64k",
        "-c",
        "write -P 5 4M 8k",
        next,
      ], "qemu-io");
      const baseRaw = join(dir, "base.raw");
      const nextRaw = join(dir, "next.raw");
      await qemu(["convert", "-O", "raw", base, baseRaw]);
      await qemu(["convert", "-O", "raw", next, nextRaw]);
      const delta = join(dir, "delta.qcow2");
      const r = await runCli([
        "export",
        nextRaw,
        "--diff",
        baseRaw,
        "--allocation",
        next,
        "--base-allocation",
        base,
        "-o",
        delta,
      ]);
      assert.equal(r.code, 0, r.stderr);
      await qemu(["rebase", "-u", "-b", "base.raw", "-F", "raw", delta]);
      assert.equal(await imagesEqual(delta, next), true);
    });
  },
);
