/**
 * Safety nets found by review: never write an image over its own source, base or
 * input (hard links included), read allocation hints from pipes once, bound what a
 * VHD header can make us hold in memory, and say clearly what a usage mistake is.
 */
import assert from "node:assert/strict";
import { deflateRawSync } from "node:zlib";
import { CorruptImageError } from "../lib/errors.ts";
import { decompressCluster } from "../lib/qcow2/decompress.ts";
import {
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const MiB = 1024 * 1024;

/** Asserts a one-line refusal with `code` whose text matches `pattern`. */
function assertRefused(r: { code: number; stderr: string }, code: number, pattern: RegExp) {
  assert.equal(r.code, code, r.stderr);
  assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, pattern);
}

Deno.test("export refuses an output that is the source or the base, even through a hard link", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    const base = `${dir}/base.raw`;
    await writeSparse(src, 3 * MiB + 512, [[0, pseudoRandom(3 * MiB, 7)]]);
    await writeSparse(base, 3 * MiB + 512, [[MiB, pseudoRandom(MiB, 8)]]);
    await Deno.link(src, `${dir}/src-link.raw`);
    const before = [await sha256File(src), await sha256File(base)];
    for (const format of ["qcow2", "vhd"]) {
      assertRefused(
        await runCli(["export", src, "-f", format, "-o", `${dir}/src-link.raw`]),
        2,
        /is the source itself/,
      );
    }
    assertRefused(
      await runCli(["export", src, "--diff", base, "-o", base]),
      2,
      /is the base itself/,
    );
    assert.deepEqual([await sha256File(src), await sha256File(base)], before);
  });
});

qemuTest(
  "import refuses a destination that is its own input (-i, stdin redirect, hard link)",
  async () => {
    await withTempDir(async (dir) => {
      const raw = `${dir}/disk.raw`;
      await writeSparse(raw, 4 * MiB, [[MiB, pseudoRandom(2 * MiB, 3)]]);
      const img = `${dir}/disk.qcow2`;
      await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, img]);
      await Deno.link(img, `${dir}/link.qcow2`);
      const before = await sha256File(img);
      assertRefused(await runCli(["import", img, "-i", img]), 2, /is the input image itself/);
      assertRefused(await runCli(["import", `${dir}/link.qcow2`, "-i", img]), 2, /is the input/);
      // stdin redirected from the file itself (what `import x < x` does in a shell).
      const sh = await run("sh", [
        "-c",
        `"$0" run -A "$1" import "$2" < "$2"`,
        Deno.execPath(),
        new URL("../cli.ts", import.meta.url).pathname,
        img,
      ]);
      assertRefused({ code: sh.code, stderr: sh.stderr }, 2, /is the input image itself/);
      assert.equal(await sha256File(img), before);
    });
  },
);

qemuTest("allocation hints are read once from pipes, FIFOs and descriptors", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await writeSparse(src, 8 * MiB, [[2 * MiB, pseudoRandom(MiB, 5)]]);
    const map = await qemu(["map", "--output=json", "-f", "raw", src]);
    const fifo = `${dir}/hint.fifo`;
    await run("mkfifo", [fifo]);
    const cli = new URL("../cli.ts", import.meta.url).pathname;
    // A writer on the FIFO, the export reading it as --allocation.
    const feeding = (async () => {
      const f = await Deno.open(fifo, { write: true });
      await f.write(new TextEncoder().encode(map));
      f.close();
    })();
    const out = `${dir}/out.qcow2`;
    const r = await runCli(["export", src, "--allocation", fifo, "-o", out]);
    await feeding;
    assert.equal(r.code, 0, r.stderr);
    const cmp = await run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", src, out]);
    assert.equal(cmp.code, 0, cmp.stderr);
    // Process substitution: a /dev/fd path that can be read only once.
    await Deno.writeTextFile(`${dir}/map.json`, map);
    const sub2 = await run("bash", [
      "-c",
      `"$0" run -A "$1" export "$2" --allocation <(cat "$3") -o "$4"`,
      Deno.execPath(),
      cli,
      src,
      `${dir}/map.json`,
      `${dir}/out2.qcow2`,
    ]);
    assert.equal(sub2.code, 0, sub2.stderr);
    assert.equal(await sha256File(`${dir}/out2.qcow2`), await sha256File(out));
    // An empty descriptor says what it expected.
    const empty = await run("bash", [
      "-c",
      `"$0" run -A "$1" export "$2" --allocation fd:7 -o "$3" 7</dev/null`,
      Deno.execPath(),
      cli,
      src,
      `${dir}/out3.qcow2`,
    ]);
    assertRefused(empty, 1, /nothing to read: expected allocation JSON/);
  });
});

qemuTest(
  "a VHD whose footer puts the dynamic header far ahead is refused within --max-buffer",
  async () => {
    await withTempDir(async (dir) => {
      const raw = `${dir}/disk.raw`;
      await writeSparse(raw, 4 * MiB, [[0, pseudoRandom(MiB, 9)]]);
      const vhd = `${dir}/disk.vhd`;
      await qemu(["convert", "-f", "raw", "-O", "vpc", raw, vhd]);
      const bytes = await Deno.readFile(vhd);
      for (const dataOffset of [2n ** 40n, 120n * BigInt(MiB)]) {
        const v = new DataView(bytes.buffer);
        v.setBigUint64(16, dataOffset);
        v.setUint32(64, 0);
        let sum = 0;
        for (let i = 0; i < 512; i++) sum += bytes[i];
        v.setUint32(64, ~sum >>> 0);
        const bad = `${dir}/bad.vhd`;
        await Deno.writeFile(bad, bytes);
        // Through a pipe: refused before reading that far ahead.
        assertRefused(
          await runCli(["import", `${dir}/out.raw`, "--max-buffer", "1M"], { stdinFile: bad }),
          1,
          /dynamic header is at byte \d+.*--max-buffer/,
        );
        // From a file it is read in place: past the end of the file.
        assertRefused(
          await runCli(["import", `${dir}/out.raw`, "-i", bad, "--max-buffer", "1M"]),
          1,
          /VHD dynamic header \(1024 bytes at \d+\) lies past the end of the \d+-byte file/,
        );
      }
    });
  },
);

Deno.test("usage mistakes are named: unknown command, --zero-check without a hint", async () => {
  assertRefused(await runCli(["frobnicate"]), 2, /unknown command 'frobnicate'/);
  assertRefused(await runCli([]), 2, /no command given/);
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/s.raw`, MiB);
    assertRefused(
      await runCli(["export", `${dir}/s.raw`, "--zero-check", "-o", `${dir}/o.qcow2`]),
      2,
      /--zero-check goes with --allocation/,
    );
  });
});

qemuTest("a fixed VHD from a pipe into a too-small destination says what was written", async () => {
  await withTempDir(async (dir) => {
    const raw = `${dir}/disk.raw`;
    await Deno.writeFile(raw, pseudoRandom(4 * MiB, 11));
    const vhd = `${dir}/disk.vhd`;
    await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", raw, vhd]);
    const out = `${dir}/out.raw`;
    assertRefused(
      await runCli(["import", out, "-f", "vhd", "--size", "1M"], { stdinFile: vhd }),
      1,
      /holds 1048576 bytes .* no size until its footer/,
    );
    assertRefused(
      await runCli(["import", out, "-f", "vhd", "--size", "1M", "-i", vhd]),
      1,
      /less than the image's virtual size of 4212736 bytes/,
    );
  });
});

Deno.test("import reads an inherited file from the descriptor's position", async () => {
  await withTempDir(async (dir) => {
    const raw = `${dir}/disk.raw`;
    await Deno.writeFile(raw, pseudoRandom(2 * MiB, 13));
    const img = `${dir}/disk.qcow2`;
    const e = await runCli(["export", raw, "-o", img]);
    assert.equal(e.code, 0, e.stderr);
    const prefixed = `${dir}/prefixed.qcow2`;
    await Deno.writeFile(
      prefixed,
      new Uint8Array([...new TextEncoder().encode("HELLO"), ...await Deno.readFile(img)]),
    );
    const cli = new URL("../cli.ts", import.meta.url).pathname;
    // The caller has read 5 bytes of descriptor 3 (and of stdin) before handing it over.
    for (const how of ["--input-fd 3 3<&0", ""]) {
      const out = `${dir}/out${how ? "-fd" : "-stdin"}.raw`;
      const r = await run("bash", [
        "-c",
        `exec < "$3"; read -r -N 5 _; "$0" run -A "$1" import "$2" ${how}`,
        Deno.execPath(),
        cli,
        out,
        prefixed,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await sha256File(out), await sha256File(raw));
    }
  });
});

Deno.test("deflate data that overflows its cluster keeps the first cluster; a bomb is refused", () => {
  const cs = 65536;
  const data = pseudoRandom(cs + 1, 17);
  const out = decompressCluster(deflateRawSync(data), cs, 0, 4096);
  assert.deepEqual(out.data, data.subarray(0, cs)); // what QEMU reads
  const bomb = deflateRawSync(new Uint8Array(64 * MiB));
  assert.throws(() => decompressCluster(bomb, cs, 0, 4096), CorruptImageError);
});
