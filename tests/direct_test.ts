/**
 * `--direct`: the transferred data leaves the page cache (measured with util-linux's
 * `fincore`), the bytes are unchanged, and the probing pass reads ahead.
 */
import assert from "node:assert/strict";
import {
  imagesEqual,
  IN_CI,
  pseudoRandom,
  qemuTest,
  run,
  runCli,
  sha256File,
  withTempDir,
} from "./helpers.ts";
import { openDiskSource } from "../lib/io/disk_source.ts";

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
