import assert from "node:assert/strict";
import { join } from "node:path";
import { formatImageInfo, type ImageInfo, readImageInfo } from "../lib/headers/info.ts";
import { pseudoRandom, qemu, qemuTest, runCli, withTempDir, writeSparse } from "./helpers.ts";

const MiB = 1024 * 1024;
const text = (b: Uint8Array) => new TextDecoder().decode(b);

async function infoJson(path: string): Promise<ImageInfo> {
  const r = await runCli(["info", path, "--json"]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(text(r.stdout));
}

qemuTest("info: qcow2 with a backing chain, ZERO and compressed clusters", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "base.raw");
    await writeSparse(raw, 4 * MiB, [
      [0, pseudoRandom(MiB, 1)],
      [3 * MiB, new Uint8Array(MiB).fill(7)],
    ]);
    const base = join(dir, "base.qcow2");
    await qemu(["convert", "-c", "-f", "raw", "-O", "qcow2", raw, base]);
    const top = join(dir, "top.qcow2");
    await qemu(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]);
    await qemu(["-c", "write -P 1 1M 128k", "-c", "write -z 0 64k", top], "qemu-io");

    const info = await infoJson(top);
    assert.equal(info.format, "qcow2");
    assert.equal(info.format_version, "3");
    assert.equal(info.virtual_size, 4 * MiB);
    assert.equal(info.cluster_size, 65536);
    assert.equal(info.allocated_clusters, 2);
    assert.equal(info.allocated_bytes, 128 * 1024);
    assert.equal(info.allocated_percent, 3.13);
    assert.equal(info.backing_file, "base.qcow2");
    assert.equal(info.backing_format, "qcow2");
    assert.equal(info.backing_path, base);
    assert.equal(info.qcow2?.zero_clusters, 1);
    assert.equal(info.qcow2?.normal_clusters, 2);
    assert.equal(info.qcow2?.compression_type, "deflate");
    assert.equal(info.qcow2?.dirty, false);
    assert.equal(info.qcow2?.extended_l2, false);
    assert.equal(info.chain.length, 1);
    const below = info.chain[0];
    assert.equal(below.path, base);
    assert.equal(below.allocated_clusters, 32); // 16 random + 16 compressed
    assert.equal(below.qcow2?.compressed_clusters, 16); // the 0x07 MiB compresses
    assert.equal(info.chain_complete, true);
    // Below: clusters 0–15 and 48–63. Top: ZERO masks cluster 0, data adds 16 and 17.
    assert.equal(info.chain_allocated_clusters, 16 - 1 + 2 + 16);
    assert.equal(info.chain_allocated_bytes, (16 - 1 + 2 + 16) * 65536);

    const r = await runCli(["info", top]);
    assert.equal(r.code, 0, r.stderr);
    const out = text(r.stdout);
    assert.match(out, /^format: qcow2, version 3$/m);
    assert.match(out, /^virtual size: 4\.00 MiB \(4194304 bytes\)$/m);
    assert.match(out, /^cluster size: 64\.0 KiB \(65536 bytes\)$/m);
    assert.match(out, /^allocated: 128\.0 KiB \(131072 bytes\), 3\.13% of the disk, in 2 of 64/m);
    assert.match(out, /^backing file: base\.qcow2 \(format qcow2\) → .*base\.qcow2$/m);
    assert.match(out, /^allocated with the backing chain: .* in 33 clusters$/m);
    assert.match(out, /^ {2}1\. .*base\.qcow2: qcow2 v3, 4\.00 MiB, 64\.0 KiB clusters/m);
    assert.match(
      out,
      /^features: compression deflate; 0 compressed clusters; 1 zero clusters; dirty no;/m,
    );
    assert.equal(formatImageInfo(await readImageInfo(top)), out);
  });
});

qemuTest(
  "info: dirty bit, lazy refcounts, extended L2, v2 and a missing backing file",
  async () => {
    await withTempDir(async (dir) => {
      const img = join(dir, "lazy.qcow2");
      await qemu(["create", "-f", "qcow2", "-o", "lazy_refcounts=on,extended_l2=on", img, "8M"]);
      await qemu(["-c", "write -P 1 0 4k", img], "qemu-io");
      const bytes = await Deno.readFile(img);
      bytes[79] |= 1; // incompatible feature bit 0: dirty
      await Deno.writeFile(img, bytes);
      const info = await infoJson(img);
      assert.equal(info.qcow2?.dirty, true);
      assert.equal(info.qcow2?.lazy_refcounts, true);
      assert.equal(info.qcow2?.extended_l2, true);
      assert.equal(info.allocated_clusters, 1);
      assert.match(
        text((await runCli(["info", img])).stdout),
        /dirty yes; .*lazy refcounts yes; extended L2 yes/,
      );

      const v2 = join(dir, "v2.qcow2");
      await qemu(["create", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"]);
      assert.equal((await infoJson(v2)).format_version, "2");

      const orphan = join(dir, "orphan.qcow2");
      await qemu(["create", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", orphan, "1M"]);
      const o = await infoJson(orphan);
      assert.equal(o.backing_file, "gone.qcow2");
      assert.equal(o.backing_path, null);
      assert.equal(o.chain_complete, false);
      assert.equal(o.chain_allocated_bytes, null);
      assert.match(
        text((await runCli(["info", orphan])).stdout),
        /backing file: gone\.qcow2 \(format qcow2\) → NOT FOUND/,
      );
    });
  },
);

qemuTest("info: VHD dynamic and fixed; bad input fails with one line", async () => {
  await withTempDir(async (dir) => {
    const raw = join(dir, "disk.raw");
    await writeSparse(raw, 8 * MiB, [[2 * MiB, pseudoRandom(MiB, 3)]]);
    const vhd = join(dir, "disk.vhd");
    await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
    const info = await infoJson(vhd);
    assert.equal(info.format, "vhd");
    assert.equal(info.format_version, "1.0");
    assert.equal(info.vhd?.disk_type, "dynamic");
    assert.equal(info.vhd?.creator_application, "qemu");
    assert.equal(info.cluster_size, 2 * MiB);
    assert.equal(info.allocated_clusters, 1);
    assert.equal(info.allocated_bytes, 2 * MiB);
    assert.equal(info.chain.length, 0);
    const out = text((await runCli(["info", vhd])).stdout);
    assert.match(out, /^format: vhd, version 1\.0, dynamic$/m);
    assert.match(out, /^block size: 2\.00 MiB \(2097152 bytes\)$/m);
    assert.match(out, /in 1 of 5 blocks$/m); // 8 MiB rounds up to a CHS size just above

    const fixed = join(dir, "fixed.vhd");
    await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", raw, fixed]);
    const f = await infoJson(fixed);
    assert.equal(f.vhd?.disk_type, "fixed");
    assert.equal(f.vhd?.max_table_entries, null);

    const r = await runCli(["info", raw]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: .*disk\.raw: not a qcow2 or VHD image/);
    assert.equal(r.stderr.trimEnd().split("\n").length, 1);
  });
});
