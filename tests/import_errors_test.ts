/**
 * `diskstream import` refusing bad streams: truncated at several points, L2 entries
 * pointing into metadata, at the same host cluster, past the end, reserved bits,
 * corrupt compressed data, bad magic, encryption, external data files, extended L2
 * entries that are invalid (a subcluster both allocated and zero, allocated without a
 * host cluster, clusters under 16 KiB),
 * a backing file without --delta, a too small --max-buffer, and a destination too
 * small for the image. Each fails with status 1, one line on stderr, and leaves no
 * half-written new file behind.
 */
import assert from "node:assert/strict";
import { DiskstreamError, LimitError } from "../lib/errors.ts";
import { importImage } from "../lib/import/import.ts";
import { qemu, qemuTest, runCli, withTempDir } from "./helpers.ts";
import {
  assertOneLineError,
  importPiped,
  patchAt,
  qcow2Tables,
  readU64At,
  sourceDisk,
  truncatedCopy,
  writeU64At,
} from "./import_fixtures.ts";

const COPIED = 1n << 63n;

/** Imports `image` into a new file and checks the one-line failure and that no file is left. */
async function refused(dir: string, image: string, re: RegExp, args: string[] = []) {
  const out = `${dir}/refused.raw`;
  assertOneLineError(await importPiped(image, out, args), re);
  await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "the new file is removed");
}

/** A qcow2 made by qemu-img convert from the source disk, with 4 KiB clusters. */
async function qcow2Image(dir: string, name: string, opts: string[] = []): Promise<string> {
  const src = `${dir}/src.raw`;
  try {
    await Deno.stat(src);
  } catch {
    await sourceDisk(src);
  }
  const img = `${dir}/${name}.qcow2`;
  await qemu(["convert", "-O", "qcow2", "-o", "cluster_size=4096", ...opts, src, img]);
  return img;
}

/** The file offsets of the first L2 table's allocated entries. */
async function dataEntries(img: string): Promise<number[]> {
  const t = await qcow2Tables(img);
  const l2 = t.l2.find((o) => o !== 0)!;
  const out: number[] = [];
  for (let j = 0; j < t.clusterSize / 8; j++) {
    if ((await readU64At(img, l2 + j * 8)) !== 0n) out.push(l2 + j * 8);
  }
  return out;
}

qemuTest("import refuses truncated streams, naming the offset", async () => {
  await withTempDir(async (dir) => {
    const img = await qcow2Image(dir, "full");
    const size = (await Deno.stat(img)).size;
    const t = await qcow2Tables(img);
    const cuts: [number, RegExp][] = [
      [100, /header truncated.*at byte offset 100/],
      [2000, /ends at byte 2000, inside the qcow2 header cluster/],
      [t.l1Offset + 4, /ends at byte \d+, inside the L1 table/],
      [Math.floor(size / 2), /ends at byte \d+.*truncated/],
      [size - 1, new RegExp(`ends at byte ${size - 1}, inside the data of guest cluster`)],
    ];
    for (const [at, re] of cuts) {
      const cut = `${dir}/cut.qcow2`;
      await truncatedCopy(img, cut, at);
      await refused(dir, cut, re);
    }
    await Deno.writeFile(`${dir}/empty`, new Uint8Array(0));
    await refused(dir, `${dir}/empty`, /the input stream is empty/);
  });
});

qemuTest("import refuses L2 entries into metadata, duplicated, or past the end", async () => {
  await withTempDir(async (dir) => {
    const img = await qcow2Image(dir, "base");
    const t = await qcow2Tables(img);
    const entries = await dataEntries(img);
    assert.ok(entries.length >= 3);
    const l2 = t.l2.find((o) => o !== 0)!;
    const size = (await Deno.stat(img)).size;
    const cases: [bigint, RegExp, number?][] = [
      [BigInt(t.l1Offset) | COPIED, /inside metadata: the L1 table/],
      [BigInt(t.refcountTableOffset) | COPIED, /inside metadata: the refcount table/],
      [BigInt(l2) | COPIED, /inside metadata: an L2 table/],
      [BigInt(size + 40960) | COPIED, /past its end/],
      [0x4000n | 0x2n, /reserved bits set/],
      [BigInt(t.l1Offset + 512) | COPIED, /not cluster aligned/],
      [await readU64At(img, entries[1]), /two L2 entries claim the same host bytes/, 2],
    ];
    for (const [value, re, which] of cases) {
      const bad = `${dir}/bad.qcow2`;
      await Deno.copyFile(img, bad);
      await writeU64At(bad, entries[which ?? 0], value);
      await refused(dir, bad, re);
    }
  });
});

qemuTest("import refuses corrupt compressed data", async () => {
  await withTempDir(async (dir) => {
    const img = await qcow2Image(dir, "c", ["-c"]);
    const entries = await dataEntries(img);
    const compressed = [];
    for (const e of entries) {
      const v = await readU64At(img, e);
      if ((v & (1n << 62n)) !== 0n) compressed.push(v);
    }
    assert.ok(compressed.length > 0);
    const x = 62n - (12n - 8n);
    const host = Number(compressed[0] & ((1n << x) - 1n));
    await patchAt(img, host, new Uint8Array(64).fill(0xff));
    await refused(
      dir,
      img,
      /the compressed data of guest cluster \d+ \(guest offset \d+\) (is not valid deflate|decompresses to).* \(at byte offset \d+\)$/,
    );
  });
});

qemuTest("import refuses bad magic, encryption, external data", async () => {
  await withTempDir(async (dir) => {
    const junk = `${dir}/junk`;
    await Deno.writeFile(junk, new TextEncoder().encode("this is not a disk image at all"));
    await refused(dir, junk, /neither qcow2 .* nor a dynamic VHD/);
    await refused(dir, junk, /not a qcow2 image: bad magic/, ["-f", "qcow2"]);

    const enc = await qcow2Image(dir, "enc");
    await patchAt(enc, 32, new Uint8Array([0, 0, 0, 1]));
    await refused(dir, enc, /encrypted \(AES\)/);

    const ext = `${dir}/ext.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-o", `data_file=${dir}/ext.data`, ext, "1M"]);
    await refused(dir, ext, /external data file/);
  });
});

qemuTest("import refuses invalid extended L2 entries, naming the entry (pipe and -i)", async () => {
  await withTempDir(async (dir) => {
    const make = async (name: string) => {
      const img = `${dir}/${name}.qcow2`;
      const o = "cluster_size=16384,extended_l2=on";
      await qemu(["create", "-q", "-f", "qcow2", "-o", o, img, "1M"]);
      await qemu(["-f", "qcow2", "-c", "write -P 0x22 0 5000", img], "qemu-io");
      return { img, l2: (await qcow2Tables(img)).l2[0] };
    };
    /** Refused through a pipe and with -i, the same one line both ways. */
    const bothWays = async (img: string, re: RegExp) => {
      await refused(dir, img, re);
      assertOneLineError(await runCli(["import", `${dir}/refused.raw`, "-i", img]), re);
      await assert.rejects(Deno.stat(`${dir}/refused.raw`), Deno.errors.NotFound);
    };
    // Subcluster 0 of cluster 0 allocated (qemu wrote it) and, patched, also "reads as zero".
    const both = await make("both");
    const bitmap = await readU64At(both.img, both.l2 + 8);
    assert.equal(bitmap & 1n, 1n, "subcluster 0 allocated");
    await writeU64At(both.img, both.l2 + 8, bitmap | (1n << 32n));
    await bothWays(
      both.img,
      new RegExp(
        `extended L2 entry for guest cluster 0 \\(subcluster bitmap 0x00000001[0-9a-f]{8}\\) ` +
          `marks subcluster 0 both allocated and reading as zeros.*\\(at byte offset ${both.l2}\\)$`,
      ),
    );
    // Cluster 5 (never written, no host cluster): a subcluster marked allocated.
    const none = await make("none");
    await writeU64At(none.img, none.l2 + 5 * 16 + 8, 1n << 7n);
    await bothWays(
      none.img,
      new RegExp(
        `guest cluster 5 .* marks subcluster 7 allocated but gives no host offset.*` +
          `\\(at byte offset ${none.l2 + 5 * 16}\\)$`,
      ),
    );
    // Extended L2 with 4 KiB clusters, which QEMU does not open.
    const small = await qcow2Image(dir, "small");
    await patchAt(small, 79, new Uint8Array([0x10]));
    await refused(dir, small, /extended L2 entries with 4096-byte clusters; .*at least 16384/);
  });
});

qemuTest(
  "import -i refuses extended L2 entries past the end of the file at the first one, before " +
    "the ranges of every table take memory",
  async () => {
    await withTempDir(async (dir) => {
      // 3 L2 tables of 16 KiB clusters, every entry 16 runs of subclusters on a host
      // cluster far past the 200 KiB file: 49152 ranges, more than the file can hold.
      const img = `${dir}/far.qcow2`;
      const o = "cluster_size=16384,extended_l2=on";
      await qemu(["create", "-q", "-f", "qcow2", "-o", o, img, "48M"]);
      const w = ["0", "16M", "32M"].flatMap((at) => ["-c", `write -P 1 ${at} 512`]);
      await qemu(["-f", "qcow2", ...w, img], "qemu-io");
      const { l2 } = await qcow2Tables(img);
      const bytes = await Deno.readFile(img);
      const v = new DataView(bytes.buffer);
      for (const [t, table] of l2.slice(0, 3).entries()) {
        for (let j = 0; j < 1024; j++) {
          const host = 2 ** 40 + (t * 1024 + j) * 16384;
          v.setBigUint64(table + j * 16, COPIED | BigInt(host));
          v.setUint32(table + j * 16 + 12, 0x55555555);
        }
      }
      await Deno.writeFile(img, bytes);
      // Refused at the first entry (the ranges of a 2 MiB-cluster image like this one
      // took 320 MB before it was refused; 70 MB now, measured with /usr/bin/time -v).
      assertOneLineError(
        await runCli(["import", `${dir}/out.raw`, "-i", img, "--max-buffer", "64K"]),
        new RegExp(
          `the data of guest cluster 0 subcluster 0 \\(guest offset 0\\) lies at bytes ` +
            `${2 ** 40}–${2 ** 40 + 511}, past the end of the ${bytes.length}-byte file: the ` +
            `image is truncated`,
        ),
      );
      await assert.rejects(Deno.stat(`${dir}/out.raw`), Deno.errors.NotFound);
    });
  },
);

qemuTest(
  "import --no-spool of a small extended L2 image whose table follows its data names a " +
    "--max-buffer sized by the clusters its table maps, not by a full table",
  async () => {
    await withTempDir(async (dir) => {
      // 2 MiB clusters, 6 of them written: one L2 table (131072 extended entries) of
      // which 6 map the disk. The table is moved after the data (swapped with the last
      // data cluster: the refcounts stay right).
      const cs = 2 * 1024 * 1024;
      const img = `${dir}/late.qcow2`;
      const o = `cluster_size=${cs},extended_l2=on`;
      await qemu(["create", "-q", "-f", "qcow2", "-o", o, img, "12M"]);
      await qemu(["-f", "qcow2", "-c", `write -P 0x5c 0 12M`, img], "qemu-io");
      const { l1Offset, l2 } = await qcow2Tables(img);
      const bytes = await Deno.readFile(img);
      const v = new DataView(bytes.buffer);
      const lastEntry = l2[0] + 5 * 16;
      const last = Number(v.getBigUint64(lastEntry) & 0x00fffffffffffe00n);
      const table = bytes.slice(l2[0], l2[0] + cs);
      bytes.copyWithin(l2[0], last, last + cs);
      bytes.set(table, last);
      v.setBigUint64(l1Offset, COPIED | BigInt(last));
      v.setBigUint64(last + 5 * 16, COPIED | BigInt(l2[0])); // the entry, moved with its table
      await Deno.writeFile(img, bytes);
      await qemu(["check", "-q", img]);
      const r = await runCli(["import", `${dir}/out.raw`, "--max-buffer", "3M", "--no-spool"], {
        stdinFile: img,
      });
      assertOneLineError(r, /this image needs --max-buffer \d+M \(enough for every table/);
      // Was 205M: every entry of the table counted as 16 ranges still to come.
      const needed = Number(/needs --max-buffer (\d+)M/.exec(r.stderr)![1]);
      assert.ok(needed <= 16, `needs ${needed}M`);
    });
  },
);

qemuTest("import refuses a backing file without --delta", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.raw`;
    await sourceDisk(base);
    const diff = `${dir}/diff.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", diff]);
    await refused(dir, diff, /has a backing file .*--delta/);
  });
});

qemuTest(
  "import --no-spool: --max-buffer too small for data that precedes its tables",
  async () => {
    await withTempDir(async (dir) => {
      const img = `${dir}/r.qcow2`;
      await qemu(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"]);
      await qemu(["-f", "qcow2", "-c", "write -P 0x11 0 300k", img], "qemu-io");
      await qemu(["resize", "-q", img, "64M"]); // the L1 table moves after all the data
      await refused(dir, img, /before the metadata that maps it .*needs --max-buffer \d+M/, [
        "--max-buffer",
        "64K",
        "--no-spool",
      ]);
      const file = await Deno.open(img);
      await assert.rejects(
        importImage(file.readable, `${dir}/lib.raw`, { maxBuffer: 65536, spool: false }),
        LimitError,
      );
    });
  },
);

qemuTest("import refuses a destination smaller than the image before writing", async () => {
  await withTempDir(async (dir) => {
    const img = await qcow2Image(dir, "img");
    // An existing destination: --size says how much it holds; it is left as it was.
    const dest = `${dir}/dest.raw`;
    const before = new Uint8Array(8192).fill(0x5a);
    await Deno.writeFile(dest, before);
    assertOneLineError(
      await importPiped(img, dest, ["--size", "1M"]),
      /holds 1048576 bytes .* less than the image's virtual size .* refusing to write/,
    );
    assert.deepEqual(await Deno.readFile(dest), before);
    // The library, as for a device whose size is read: nothing created.
    const file = await Deno.open(img);
    await assert.rejects(
      importImage(file.readable, `${dir}/new.raw`, { size: 2 * 1024 * 1024 }),
      DiskstreamError,
    );
    await assert.rejects(Deno.stat(`${dir}/new.raw`), Deno.errors.NotFound);
    // Bad usage is status 2.
    const r = await runCli(["import", dest, "-f", "vmdk"], { stdinFile: img });
    assert.equal(r.code, 2, r.stderr);
    // Flags this import would not use are refused by name, never ignored; DEST untouched.
    for (
      const [args, want] of [
        [
          ["-f", "raw", "--spool-dir", dir],
          /^diskstream: --spool-dir applies to qcow2 and VHD images only, not to -f raw$/,
        ],
        [
          ["-f", "tar", "--no-spool"],
          /^diskstream: --no-spool applies to qcow2 and VHD images only, not to -f tar$/,
        ],
        [
          ["-f", "chunked", "--delta", "--max-buffer", "1M"],
          /^diskstream: --delta, --max-buffer apply to qcow2 .* -f chunked/,
        ],
        [["--connections", "2"], /^diskstream: --connections applies to an NBD destination/],
      ] as const
    ) {
      const u = await runCli(["import", dest, ...args], { stdinFile: img });
      assert.equal(u.code, 2, `${args.join(" ")}: ${u.stderr}`);
      assert.match(u.stderr.trim(), want);
      assert.deepEqual(await Deno.readFile(dest), before);
    }
  });
});
