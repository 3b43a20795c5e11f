/**
 * `--direct`: the transferred data leaves the page cache (measured with util-linux's
 * `fincore`), the bytes are unchanged, and the probing pass reads ahead.
 */
import assert from "node:assert/strict";
import {
  CLI,
  imagesEqual,
  IN_CI,
  pseudoRandom,
  qemuTest,
  run,
  runCli,
  sha256,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { openDiskSource } from "../lib/io/disk_source.ts";
import { openDirectFile } from "../lib/io/direct_io.ts";
import { rootTest, withLoopDevice } from "./device_helpers.ts";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** Bytes of `path` in the page cache (fincore), or null when fincore is missing. */
async function cached(path: string): Promise<number | null> {
  try {
    const r = await run("fincore", ["-nb", "-o", "RES", path]);
    if (r.code !== 0) return null;
    return Number(new TextDecoder().decode(r.stdout).trim());
  } catch {
    if (IN_CI) throw new Error("fincore (util-linux) is missing");
    return null;
  }
}

async function makeDisk(path: string): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true });
  for (let at = 0; at < SIZE; at += 8 * MiB) await f.write(pseudoRandom(8 * MiB, at / MiB + 1));
  await f.syncData(); // dirty pages cannot be dropped
  f.close();
  await run("cat", [path]); // in the page cache now
}

qemuTest("export --direct: same image, the source leaves the page cache", async (t) => {
  await withTempDir(async (dir) => {
    const disk = `${dir}/disk.raw`;
    await makeDisk(disk);
    const before = await cached(disk);
    if (before === null) return t.step({ name: "fincore missing", ignore: true, fn: () => {} });
    assert.ok(before >= SIZE / 2, `the source is cached first (${before} bytes)`);
    for (const [name, args] of [["file", ["-o", `${dir}/out.qcow2`]], ["pipe", []]] as const) {
      await run("cat", [disk]);
      const r = await runCli(["export", "--direct", disk, ...args]);
      assert.equal(r.code, 0, r.stderr);
      // Measured before anything else reads the files again.
      const left = (await cached(disk))!;
      assert.ok(left < 8 * MiB, `${name}: ${left} bytes of the source still cached`);
      if (name === "file") {
        const out = (await cached(`${dir}/out.qcow2`))!;
        assert.ok(out < 8 * MiB, `${out} bytes of the output still cached`);
      }
      if (name === "pipe") await Deno.writeFile(`${dir}/out.qcow2`, r.stdout);
      assert.ok(await imagesEqual(disk, `${dir}/out.qcow2`, "raw", "qcow2"), name);
    }
    // Without --direct the cache keeps the data (so the check above means something).
    await run("cat", [disk]);
    assert.equal((await runCli(["export", disk, "-o", `${dir}/plain.qcow2`])).code, 0);
    assert.ok((await cached(disk))! >= SIZE / 2);
  });
});

qemuTest("export --direct --diff: both disks leave the page cache", async () => {
  await withTempDir(async (dir) => {
    const [a, b] = [`${dir}/a.raw`, `${dir}/b.raw`];
    await makeDisk(a);
    await Deno.copyFile(a, b);
    const f = await Deno.open(b, { write: true });
    await f.write(new Uint8Array(1000).fill(9));
    await f.syncData();
    f.close();
    await run("cat", [a, b]);
    const r = await runCli(["export", "--direct", "--diff", a, b, "-o", `${dir}/d.qcow2`]);
    assert.equal(r.code, 0, r.stderr);
    for (const p of [a, b]) {
      const left = await cached(p);
      if (left !== null) assert.ok(left < 8 * MiB, `${p}: ${left} bytes still cached`);
    }
  });
});

qemuTest(
  "import --direct through a pipe: same bytes, the destination leaves the page cache",
  async () => {
    await withTempDir(async (dir) => {
      const disk = `${dir}/disk.raw`;
      await makeDisk(disk);
      await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", disk, `${dir}/disk.qcow2`]);
      for (const dest of [`${dir}/new.raw`, `${dir}/existing.raw`]) {
        if (dest.endsWith("existing.raw")) await Deno.writeFile(dest, new Uint8Array(SIZE));
        const r = await run("bash", [
          "-c",
          `cat "$3" | "$0" run -A "$1" import --direct "$2"`,
          Deno.execPath(),
          new URL("../cli.ts", import.meta.url).pathname,
          dest,
          `${dir}/disk.qcow2`,
        ]);
        assert.equal(r.code, 0, r.stderr);
        const left = await cached(dest); // before the checksum reads it again
        if (left !== null) assert.ok(left < 8 * MiB, `${dest}: ${left} bytes still cached`);
        assert.equal(await sha256File(dest), await sha256File(disk));
      }
    });
  },
);

Deno.test("a file source reads ahead on request (prefetch), within its size", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/d.raw`;
    await Deno.writeFile(path, pseudoRandom(3 * MiB, 5));
    const src = await openDiskSource(path, { direct: true });
    try {
      src.prefetch?.(2 * MiB, 8 * MiB); // clipped to the file, no error
      const buf = new Uint8Array(4096);
      src.readAtSync!(buf, 2 * MiB);
      assert.deepEqual(buf, pseudoRandom(3 * MiB, 5).subarray(2 * MiB, 2 * MiB + 4096));
    } finally {
      src.close();
    }
  });
});

// ---- O_DIRECT ----

const CLI_PATH = new URL("../cli.ts", import.meta.url).pathname;
/** A disk whose size is not a multiple of 4 KiB: the last bytes are an unaligned tail. */
const ODD_SIZE = 16 * MiB + 512;

/** Runs diskstream under strace; returns the result and the openat lines naming `paths`. */
async function straced(args: string[], paths: string | string[], stdinFile?: string) {
  const log = await Deno.makeTempFile();
  try {
    const r = await run(
      "strace",
      ["-f", "-e", "trace=openat", "-o", log, Deno.execPath(), "run", "-A", CLI_PATH, ...args],
      { stdinFile },
    );
    const opens = (await Deno.readTextFile(log)).split("\n")
      .filter((l) => [paths].flat().some((path) => l.includes(path)));
    return { ...r, opens };
  } finally {
    await Deno.remove(log);
  }
}

/**
 * The first offset where `a` and `b` differ (or their common length when one is
 * shorter), -1 when equal: assert.deepEqual of megabytes can take minutes.
 */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** True when one of the `opens` opened `path` (the default: any) with O_DIRECT. */
const directOpen = (opens: string[], path?: string) =>
  opens.some((l) => (!path || l.includes(`"${path}"`)) && /O_DIRECT.*= \d+$/.test(l));

rootTest(
  "--direct opens a loop device and a file with O_DIRECT (strace); bytes as qemu-img reads them",
  { losetup: true, strace: true, qemu: true },
  async () => {
    await withTempDir(async (dir) => {
      const disk = `${dir}/disk.raw`;
      await Deno.writeFile(disk, pseudoRandom(ODD_SIZE, 11));
      const image = `${dir}/disk.qcow2`;
      await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", disk, image]);
      await withLoopDevice(disk, async (dev) => {
        const image2 = `${dir}/out.qcow2`;
        const ex = await straced(["export", "--direct", dev, "-o", image2], [dev, image2]);
        assert.equal(ex.code, 0, ex.stderr);
        assert.ok(directOpen(ex.opens, dev), `no O_DIRECT open of ${dev}:\n${ex.opens.join("\n")}`);
        assert.ok(
          directOpen(ex.opens, image2),
          `no O_DIRECT open of ${image2}:\n${ex.opens.join("\n")}`,
        );
        assert.ok(await imagesEqual(disk, image2, "raw", "qcow2"));
        // Onto a device: the image written with O_DIRECT, as qemu-img reads it.
        const slot = `${dir}/slot.raw`;
        await Deno.writeFile(slot, new Uint8Array(ODD_SIZE + 4 * MiB).fill(0xdd));
        await withLoopDevice(slot, async (out) => {
          const onto = await straced(["export", "--direct", dev, "-o", out], out);
          assert.equal(onto.code, 0, onto.stderr);
          assert.ok(directOpen(onto.opens, out), `no O_DIRECT open of ${out}`);
          assert.ok(await imagesEqual(disk, out, "raw", "qcow2"));
        });
      });
      const target = `${dir}/target.raw`;
      await Deno.writeFile(target, new Uint8Array(ODD_SIZE).fill(0xee));
      await withLoopDevice(target, async (dev) => {
        const im = await straced(["import", "--direct", dev], dev, image);
        assert.equal(im.code, 0, im.stderr);
        assert.ok(directOpen(im.opens), `no O_DIRECT open of ${dev}:\n${im.opens.join("\n")}`);
      });
      assert.ok(await imagesEqual(disk, target, "raw", "raw"));
      // A new file whose size ends in an unaligned tail (written through the page cache).
      const out = `${dir}/new.raw`;
      const im = await straced(["import", "--direct", out, "-i", image], out);
      assert.equal(im.code, 0, im.stderr);
      assert.ok(directOpen(im.opens), `no O_DIRECT open of ${out}:\n${im.opens.join("\n")}`);
      assert.ok(await imagesEqual(disk, out, "raw", "raw"));
    });
  },
);

rootTest(
  "--direct on ramfs (O_DIRECT refused at open): export and import fall back, same bytes",
  { qemu: true },
  async () => {
    await withTempDir(async (top) => {
      // ramfs has no direct I/O (tmpfs takes O_DIRECT since Linux 6.6).
      const dir = `${top}/ramfs`;
      await Deno.mkdir(dir);
      assert.equal((await run("mount", ["-t", "ramfs", "ramfs", dir])).code, 0);
      try {
        const disk = `${dir}/disk.raw`;
        await Deno.writeFile(disk, pseudoRandom(ODD_SIZE, 12));
        const refused = openDirectFile(disk, false);
        refused?.close();
        assert.equal(refused, null, "ramfs takes O_DIRECT?");
        const ex = await runCli(["export", "--direct", disk, "-o", `${dir}/out.qcow2`]);
        assert.equal(ex.code, 0, ex.stderr);
        assert.ok(await imagesEqual(disk, `${dir}/out.qcow2`, "raw", "qcow2"));
        const im = await runCli(["import", "--direct", `${dir}/new.raw`], {
          stdinFile: `${dir}/out.qcow2`,
        });
        assert.equal(im.code, 0, im.stderr);
        assert.ok(await imagesEqual(disk, `${dir}/new.raw`, "raw", "raw"));
      } finally {
        await run("umount", [dir]);
      }
    });
  },
);

Deno.test("O_DIRECT file: unaligned writes and reads of any size match the same done in memory", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/f.raw`;
    const size = 20 * MiB + 1234;
    const model = pseudoRandom(size, 3);
    await Deno.writeFile(path, model);
    const file = openDirectFile(path, true);
    if (file === null) return; // no FFI, or the temp dir refuses O_DIRECT
    try {
      // Pieces: aligned, unaligned both ends, inside one block, across the 8 MiB staging size.
      const pieces: [number, number][] = [
        [0, 4096],
        [100, 50],
        [4000, 200],
        [8191, 9 * MiB + 3],
        [12 * MiB, 8 * MiB],
        [size - 700, 700],
      ];
      for (const [at, len] of pieces) {
        const bytes = pseudoRandom(len, at + 1);
        model.set(bytes, at);
        await file.write(bytes, at);
      }
      await file.sync();
      const back = new Uint8Array(size);
      assert.equal(file.readSync(back, 0), size);
      assert.equal(firstDifference(back, model), -1);
      const part = new Uint8Array(3 * MiB + 5);
      assert.equal(await file.read(part, 5 * MiB + 7), part.length);
      assert.equal(firstDifference(part, model.subarray(5 * MiB + 7, 8 * MiB + 12)), -1);
      const view = file.readView(size - 100, 4096); // past the end: short
      assert.equal(firstDifference(view, model.subarray(size - 100)), -1);
      assert.equal(file.readSync(new Uint8Array(10), size), 0);
    } finally {
      file.close();
    }
    assert.equal(firstDifference(await Deno.readFile(path), model), -1);
  });
});

Deno.test("O_DIRECT file: overlapping writes land in the order they were made", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/f.raw`;
    const size = 24 * MiB;
    const model = new Uint8Array(size);
    await Deno.writeFile(path, model);
    const file = openDirectFile(path, true);
    if (file === null) return; // no FFI, or the temp dir refuses O_DIRECT
    try {
      // Each write overlaps the one before it, aligned or not, while that one may still
      // run on another thread: the later bytes must win everywhere.
      let seed = 7;
      const rand = (n: number) => {
        seed = (seed * 1103515245 + 12345) % 2147483648;
        return seed % n;
      };
      let at = 0;
      for (let i = 0; i < 120; i++) {
        const len = 1 + rand(i % 3 === 0 ? 9 * MiB : 64 * 1024);
        at = Math.min(size - len, Math.max(0, at + rand(8192) - 4096));
        if (i % 5 === 0) at -= at % 4096;
        const bytes = pseudoRandom(len, i + 1);
        model.set(bytes, at);
        await file.write(bytes, at);
      }
      await file.sync();
    } finally {
      file.close();
    }
    assert.equal(firstDifference(await Deno.readFile(path), model), -1);
  });
});

qemuTest(
  "export --direct into a pipe (spliced from the O_DIRECT descriptor) gives the bytes of the buffered export",
  async () => {
    await withTempDir(async (dir) => {
      // An unaligned tail (read and written, not spliced), a zero MiB, a hint with gaps.
      const size = 13 * MiB + 12345;
      const disk = pseudoRandom(size, 21);
      disk.fill(0, 3 * MiB, 4 * MiB);
      await Deno.writeFile(`${dir}/d.raw`, disk);
      await Deno.writeTextFile(
        `${dir}/hint.json`,
        JSON.stringify({
          virtual_size: size,
          cluster_bits: 16,
          data_clusters: [[0, 40], [90, 208]],
        }),
      );
      for (
        const args of [
          ["-f", "raw"],
          ["-f", "chunked"],
          ["-f", "qcow2"],
          ["-f", "qcow2", "--allocation", `${dir}/hint.json`],
          ["-f", "tar", "--allocation", `${dir}/hint.json`],
        ]
      ) {
        const plain = await runCli(["export", `${dir}/d.raw`, ...args]);
        const direct = await runCli(["export", "--direct", `${dir}/d.raw`, ...args]);
        assert.equal(plain.code, 0, plain.stderr);
        assert.equal(direct.code, 0, direct.stderr);
        assert.ok(direct.stdout.length > MiB, args.join(" "));
        assert.equal(sha256(direct.stdout), sha256(plain.stdout), args.join(" "));
      }
      const raw = await runCli(["export", "--direct", `${dir}/d.raw`, "-f", "raw"]);
      assert.equal(sha256(raw.stdout), sha256(disk));
      // A VHD carries a fresh UUID and time stamp: compared by its contents.
      const vhd = await runCli(["export", "--direct", `${dir}/d.raw`, "-f", "vhd"]);
      assert.equal(vhd.code, 0, vhd.stderr);
      await Deno.writeFile(`${dir}/d.vhd`, vhd.stdout);
      assert.ok(await imagesEqual(`${dir}/d.raw`, `${dir}/d.vhd`, "raw", "vpc"));
      // A reader that leaves early: no hang, no stack trace.
      const head = await run("bash", [
        "-c",
        `"$0" run -A "$1" export --direct -f raw "$2" | head -c 1000 | wc -c`,
        Deno.execPath(),
        new URL("../cli.ts", import.meta.url).pathname,
        `${dir}/d.raw`,
      ]);
      assert.equal(new TextDecoder().decode(head.stdout).trim(), "1000");
      assert.doesNotMatch(head.stderr, /at |internal error/);
    });
  },
);

Deno.test("--direct without --allow-ffi says on stderr that the page cache is used (not ignored silently)", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/s.raw`, 1 << 20, [[4096, pseudoRandom(70000, 3)]]);
    const noFfi = ["run", "--allow-read", "--allow-write", CLI];
    const note =
      "diskstream: note: --direct needs --allow-ffi (or -A); without it the page cache " +
      "is used as usual\n";
    const exp = await run(Deno.execPath(), [
      ...noFfi,
      "export",
      `${dir}/s.raw`,
      "--direct",
      "-o",
      `${dir}/o.qcow2`,
    ]);
    assert.equal(exp.code, 0, exp.stderr);
    assert.equal(exp.stderr, note);
    const imp = await run(Deno.execPath(), [
      ...noFfi,
      "import",
      `${dir}/o.raw`,
      "--direct",
      "-i",
      `${dir}/o.qcow2`,
    ]);
    assert.equal(imp.code, 0, imp.stderr);
    assert.equal(imp.stderr, note);
    assert.equal(await sha256File(`${dir}/o.raw`), await sha256File(`${dir}/s.raw`));
    // With FFI there is nothing to say.
    const all = await runCli(["export", `${dir}/s.raw`, "--direct", "-o", `${dir}/p.qcow2`]);
    assert.equal(all.code, 0, all.stderr);
    assert.equal(all.stderr, "");
  });
});
