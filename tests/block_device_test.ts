/**
 * Real block devices (loop devices over temp files; needs root): export from a device
 * (size by seeking, every byte read: no hole detection), import into a device
 * (existing content replaced, bytes past the virtual size untouched, a too-small
 * device refused before any write), `--prezeroed`, `--delta`, through a pipe (data
 * spliced into the device) and from a file, and a signal during an import.
 */
import assert from "node:assert/strict";
import {
  checkClean,
  imagesEqual,
  pseudoRandom,
  qemu,
  runCli,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { rootTest, withLoopDevice } from "./device_helpers.ts";
import { exportQcow2 } from "../mod.ts";
import { CliChild } from "./cli_child.ts";

const MiB = 1 << 20;

/** Reads `length` bytes of `path` (a file or device) at `offset`. */
async function readAt(path: string, offset: number, length: number): Promise<Uint8Array> {
  using f = await Deno.open(path);
  await f.seek(offset, Deno.SeekMode.Start);
  const buf = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const n = await f.read(buf.subarray(got));
    if (n === null) break;
    got += n;
  }
  return buf.subarray(0, got);
}

/** A file of `size` bytes filled with `byte` (a device's old contents). */
async function filled(path: string, size: number, byte: number): Promise<void> {
  await Deno.writeFile(path, new Uint8Array(size).fill(byte));
}

/** An 8 MiB disk with data at 1–2 MiB and 5 MiB, zeros elsewhere, and its qcow2. */
async function sampleDisk(dir: string): Promise<{ raw: string; qcow2: string }> {
  const raw = `${dir}/disk.raw`;
  await writeSparse(raw, 8 * MiB, [[MiB, pseudoRandom(MiB, 1)], [5 * MiB, pseudoRandom(4096, 2)]]);
  const qcow2 = `${dir}/disk.qcow2`;
  await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
  return { raw, qcow2 };
}

rootTest("block device: export reads the device (size by seeking, no hole detection)", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    // A sparse backing file whose size is not a multiple of the cluster size.
    const backing = `${dir}/backing.raw`;
    const size = 6 * MiB + 3 * 512;
    await writeSparse(backing, size, [[0, pseudoRandom(65536, 7)], [
      4 * MiB,
      pseudoRandom(512, 8),
    ]]);
    await withLoopDevice(backing, async (dev) => {
      for (const format of ["qcow2", "vhd"]) {
        const out = `${dir}/out.${format}`;
        const r = await runCli(["export", dev, "-f", format, "-o", out]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(backing, out, "raw", format === "vhd" ? "vpc" : "qcow2"));
        if (format === "qcow2") await checkClean(out);
      }
      // The library: the size comes from seeking, and every byte is read in pass 1
      // (a device has no SEEK_DATA), while the same bytes as a file read only its data.
      const fromDevice = await exportQcow2(dev);
      assert.equal(fromDevice.sourceSize, size);
      assert.ok(fromDevice.scannedBytes >= size - 65536, `${fromDevice.scannedBytes}`);
      await fromDevice.stream.cancel();
      const fromFile = await exportQcow2(backing);
      assert.ok(fromFile.scannedBytes < size / 2, `${fromFile.scannedBytes}`);
      await fromFile.stream.cancel();
      assert.deepEqual([...fromDevice.clusters], [...fromFile.clusters]);
    });
  });
});

rootTest("block device: import replaces the content, leaves bytes past the virtual size", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    const { raw, qcow2 } = await sampleDisk(dir);
    const vhd = `${dir}/disk.vhd`;
    await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, vhd]);
    const backing = `${dir}/device.raw`;
    const ways: [string, string[], string | undefined][] = [
      ["qcow2 through a pipe (spliced)", [], qcow2],
      ["qcow2 from a file", ["-i", qcow2], undefined],
      ["dynamic VHD through a pipe", [], vhd],
    ];
    for (const [how, args, stdinFile] of ways) {
      await filled(backing, 12 * MiB, 0xee); // old content everywhere
      await withLoopDevice(backing, async (dev) => {
        const r = await runCli(["import", dev, ...args], { stdinFile });
        assert.equal(r.code, 0, `${how}: ${r.stderr}`);
        // [0, 8 MiB) is the disk, zeros included; the old bytes beyond are untouched.
        assert.deepEqual(await readAt(dev, 0, 8 * MiB), await Deno.readFile(raw), how);
        const tail = await readAt(dev, 8 * MiB, 4 * MiB);
        assert.ok(tail.every((b) => b === 0xee), `${how}: bytes past the virtual size changed`);
      });
    }
  });
});

rootTest("block device: a device smaller than the image is refused before any write", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    const { qcow2 } = await sampleDisk(dir);
    const backing = `${dir}/small.raw`;
    await filled(backing, 4 * MiB, 0x55);
    const before = await sha256File(backing);
    await withLoopDevice(backing, async (dev) => {
      for (const args of [["-i", qcow2], []]) {
        const r = await runCli(["import", dev, ...args], {
          stdinFile: args.length ? undefined : qcow2,
        });
        assert.equal(r.code, 1);
        assert.match(
          r.stderr,
          /^diskstream: \/dev\/loop\d+ holds 4194304 bytes \(4\.00 MiB\), less than the image's virtual size of 8388608 bytes .*refusing to write/,
        );
      }
      // --size smaller than the device is a limit too.
      const r = await runCli(["import", dev, "-i", qcow2, "--size", "2M"]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /holds 2097152 bytes/);
    });
    assert.equal(await sha256File(backing), before);
  });
});

rootTest("block device: --prezeroed writes only the image's data", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    const { raw, qcow2 } = await sampleDisk(dir);
    const backing = `${dir}/device.raw`;
    // Zeroed: the result is the disk.
    await filled(backing, 8 * MiB, 0);
    await withLoopDevice(backing, async (dev) => {
      const r = await runCli(["import", dev, "--prezeroed"], { stdinFile: qcow2 });
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(await readAt(dev, 0, 8 * MiB), await Deno.readFile(raw));
    });
    // Not zeroed: --prezeroed trusts the caller, so where the image has no data the old
    // bytes stay (what the flag promises), while the data clusters are written.
    await filled(backing, 8 * MiB, 0xee);
    await withLoopDevice(backing, async (dev) => {
      const r = await runCli(["import", dev, "--prezeroed", "-i", qcow2]);
      assert.equal(r.code, 0, r.stderr);
      const disk = await Deno.readFile(raw);
      assert.deepEqual(await readAt(dev, MiB, MiB), disk.subarray(MiB, 2 * MiB));
      assert.ok((await readAt(dev, 3 * MiB, MiB)).every((b) => b === 0xee));
    });
  });
});

rootTest("block device: --delta applies a diff onto the base on the device", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.raw`;
    await Deno.writeFile(base, pseudoRandom(8 * MiB, 11));
    const next = pseudoRandom(8 * MiB, 11);
    next.set(pseudoRandom(MiB, 12), 2 * MiB); // changed
    next.fill(0, 6 * MiB, 7 * MiB); // became zero
    await Deno.writeFile(`${dir}/new.raw`, next);
    for (const format of ["qcow2", "vhd"]) {
      const diff = `${dir}/diff.${format}`;
      const e = await runCli([
        "export",
        `${dir}/new.raw`,
        "-f",
        format,
        "--diff",
        base,
        "-o",
        diff,
      ]);
      assert.equal(e.code, 0, e.stderr);
      const backing = `${dir}/device.raw`;
      await Deno.copyFile(base, backing);
      await withLoopDevice(backing, async (dev) => {
        const r = await runCli(["import", dev, "--delta"], { stdinFile: diff });
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(await readAt(dev, 0, 8 * MiB), next, format);
      });
    }
  });
});

rootTest(
  "block device: a signal during an import says from which byte the device is partly written",
  {
    losetup: true,
    qemu: true,
  },
  async () => {
    await withTempDir(async (dir) => {
      const raw = `${dir}/disk.raw`;
      await writeSparse(raw, 8 * MiB, [[2 * MiB, pseudoRandom(6 * MiB, 13)]]);
      const image = `${dir}/disk.qcow2`;
      assert.equal((await runCli(["export", raw, "-o", image])).code, 0);
      const bytes = await Deno.readFile(image);
      const backing = `${dir}/device.raw`;
      await filled(backing, 8 * MiB, 0x77);
      await withLoopDevice(backing, async (dev) => {
        const child = new CliChild(["import", dev, "--progress", "--machine"]);
        await child.feed(bytes.subarray(0, 5 << 20)); // more than one 4 MiB chunk, not all
        await child.waitForOutput(/0[2-9]\d/);
        const { code, stderr } = await child.stop("SIGTERM");
        assert.equal(code, 143, stderr);
        const m =
          /interrupted by SIGTERM: \/dev\/loop\d+ \(an existing device\) is partly written from byte (\d+) on$/
            .exec(stderr.trimEnd());
        assert.ok(m, stderr);
        assert.equal(Number(m[1]), 2 * MiB);
        assert.ok((await readAt(dev, 0, 2 * MiB)).every((b) => b === 0x77)); // intact below
      });
    });
  },
);

rootTest("block device: export -o onto a device writes the image, or refuses a small one first", {
  losetup: true,
  qemu: true,
}, async () => {
  await withTempDir(async (dir) => {
    const { raw } = await sampleDisk(dir);
    const big = `${dir}/big.raw`;
    await filled(big, 4 * MiB, 0x33);
    await withLoopDevice(big, async (dev) => {
      const r = await runCli(["export", raw, "-o", dev]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(await imagesEqual(raw, dev, "raw", "qcow2"));
    });
    const small = `${dir}/small.raw`;
    await filled(small, 512 * 1024, 0x44);
    const before = await sha256File(small);
    await withLoopDevice(small, async (dev) => {
      const r = await runCli(["export", raw, "-o", dev]);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /^diskstream: \/dev\/loop\d+ holds 524288 bytes \(512\.0 KiB\), less than the image's \d+ bytes .*refusing to write/,
      );
    });
    assert.equal(await sha256File(small), before); // nothing written
    assert.ok(await Deno.stat(small)); // a device is never removed
  });
});
