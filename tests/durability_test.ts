/**
 * Faults and durability: a full disk under export and import (the message names the
 * destination and the error by name; an output this run created is removed), and
 * fdatasync before success (`--no-sync` opts out), checked with strace.
 */
import assert from "node:assert/strict";
import { CLI, pseudoRandom, run, runCli, withTempDir, writeSparse } from "./helpers.ts";
import { pathExists } from "../lib/io/same_file.ts";
import { rootTest, withTmpfs } from "./device_helpers.ts";
import { errnoMessage } from "../lib/io/errno.ts";

/** Runs the CLI with exactly `perms` (e.g. without --allow-ffi: the portable paths). */
function cliWith(perms: string[], args: string[], stdinFile?: string) {
  return run(Deno.execPath(), ["run", ...perms, CLI, ...args], { stdinFile });
}

const NO_FFI = ["--allow-read", "--allow-write"];

/** A 4 MiB disk of random data (it cannot fit a 1 MiB filesystem in any format). */
async function randomDisk(dir: string): Promise<string> {
  const src = `${dir}/disk.raw`;
  await Deno.writeFile(src, pseudoRandom(4 << 20, 21));
  return src;
}

rootTest(
  "full disk: export -o names the destination and ENOSPC, removes what it created",
  {},
  async () => {
    await withTempDir(async (dir) => {
      const src = await randomDisk(dir);
      const full = `${dir}/full`;
      await Deno.mkdir(full);
      await withTmpfs(full, "1M", async () => {
        for (
          const [perms, format] of [
            [["-A"], "qcow2"], // kernel copies (sendfile: another filesystem)
            [["-A"], "vhd"],
            [NO_FFI, "qcow2"], // plain writes
          ] as const
        ) {
          const out = `${full}/out.${format}`;
          const r = await cliWith([...perms], ["export", src, "-f", format, "-o", out]);
          assert.equal(r.code, 1, r.stderr);
          assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
          assert.match(r.stderr, /^diskstream: cannot write to \S*full\/out\.(qcow2|vhd)\b/);
          assert.match(r.stderr, /No space left on device/);
          assert.doesNotMatch(r.stderr, /errno 28|from \S+disk\.raw:/);
          assert.equal(await pathExists(out), false, `${out} left behind`);
        }
        // An output that existed is not removed (it is the caller's), but is named.
        const existing = `${full}/existing.qcow2`;
        await Deno.writeTextFile(existing, "x");
        const r = await runCli(["export", src, "-o", existing]);
        assert.equal(r.code, 1);
        assert.match(
          r.stderr,
          /cannot write to \S*existing\.qcow2.*No space left on device \(ENOSPC\)/,
        );
        assert.ok(await pathExists(existing));
      });
    });
  },
);

rootTest(
  "full disk: import names the destination and ENOSPC, removes the file it created",
  {},
  async () => {
    await withTempDir(async (dir) => {
      const src = await randomDisk(dir);
      const image = `${dir}/disk.qcow2`;
      assert.equal((await runCli(["export", src, "-o", image])).code, 0);
      const full = `${dir}/full`;
      await Deno.mkdir(full);
      await withTmpfs(full, "1M", async () => {
        const dest = `${full}/dest.raw`;
        // From a pipe (data spliced), from a file (written), without FFI.
        for (
          const [perms, args, stdin] of [
            [["-A"], [], image],
            [["-A"], ["-i", image], undefined],
            [NO_FFI, ["-i", image], undefined],
          ] as const
        ) {
          const r = await cliWith([...perms], ["import", dest, ...args], stdin);
          assert.equal(r.code, 1, r.stderr);
          assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
          assert.match(r.stderr, /^diskstream: cannot write to \S*full\/dest\.raw\b/);
          assert.match(r.stderr, /No space left on device/);
          assert.equal(await pathExists(dest), false, `${dest} left behind`);
        }
      });
    });
  },
);

Deno.test("errno names: the C library's text and the symbolic name", () => {
  assert.equal(errnoMessage(28), "No space left on device (ENOSPC)");
  assert.equal(errnoMessage(5), "Input/output error (EIO)");
  assert.match(errnoMessage(122), /^Disk quota exceeded \((EDQUOT|errno 122)\)$/);
});

/** The paths `fdatasync` was called on while the CLI ran `args` (strace -y). */
async function syncedPaths(perms: string[], args: string[], stdinFile?: string) {
  return await withTempDir(async (tdir) => {
    const trace = `${tdir}/trace`;
    const r = await run(
      "strace",
      [
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fdatasync,fsync",
        "-o",
        trace,
        Deno.execPath(),
        "run",
        ...perms,
        CLI,
        ...args,
      ],
      { stdinFile },
    );
    assert.equal(r.code, 0, r.stderr);
    const text = await Deno.readTextFile(trace);
    return [...text.matchAll(/f(?:data)?sync\(\d+<([^>]+)>\) = 0/g)].map((m) => m[1]);
  });
}

rootTest("durability: export -o and import sync before success; --no-sync opts out", {
  strace: true,
}, async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, 8 << 20, [[1 << 20, pseudoRandom(1 << 20, 4)]]);
    const real = await Deno.realPath(dir);
    const out = `${real}/out.qcow2`;
    for (const perms of [["-A"], [...NO_FFI, "--allow-run"]]) {
      for (const format of ["qcow2", "vhd"]) {
        const synced = await syncedPaths(perms, ["export", src, "-f", format, "-o", out]);
        assert.ok(synced.includes(out), `${perms} ${format}: ${synced}`);
        const unsynced = await syncedPaths(perms, [
          "export",
          src,
          "-f",
          format,
          "-o",
          out,
          "--no-sync",
        ]);
        assert.ok(!unsynced.includes(out), `${perms} ${format} --no-sync: ${unsynced}`);
      }
      const dest = `${real}/copy.raw`;
      await Deno.remove(dest).catch(() => {});
      assert.ok((await syncedPaths(perms, ["import", dest, "-i", out])).includes(dest));
      await Deno.remove(dest);
      assert.ok(!(await syncedPaths(perms, ["import", dest, "--no-sync"], out)).includes(dest));
      assert.deepEqual(await Deno.readFile(dest), await Deno.readFile(src)); // same bytes
    }
  });
});

Deno.test("a failed import into an existing file says from which byte it is partly written", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, 8 << 20, [[1 << 20, pseudoRandom(7 << 20, 6)]]);
    const image = `${dir}/disk.qcow2`;
    assert.equal((await runCli(["export", src, "-o", image])).code, 0);
    const truncated = (await Deno.readFile(image)).subarray(0, 5 << 20);
    const dest = `${dir}/existing.raw`;
    const before = new Uint8Array(8 << 20).fill(0x5a);
    await Deno.writeFile(dest, before);
    const r = await runCli(["import", dest], { stdin: truncated });
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /truncated.*; \S*existing\.raw \(an existing file\) is partly written from byte 1048576 on\n$/,
    );
    const after = await Deno.readFile(dest);
    assert.deepEqual(after.subarray(0, 1 << 20), before.subarray(0, 1 << 20));
  });
});
