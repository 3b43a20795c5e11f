/**
 * The splice path of `import`: data clusters moved from an input pipe into the
 * destination by the kernel (FFI), against the same import read in JavaScript (FFI
 * denied) and from a regular file (no pipe to splice from).
 */
import assert from "node:assert/strict";
import { importFromPipe } from "../lib/import/import.ts";
import { openPipeInput } from "../lib/io/pipe_input.ts";
import {
  CLI,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  type RunResult,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { assertOk, assertSameBytes, MiB, qemuRaw, truncatedCopy } from "./import_fixtures.ts";

/** `cat IMAGE | deno run PERMS cli.ts import DEST ARGS` through a real pipe. */
function pipedImport(
  image: string,
  dest: string,
  perms: string[],
  args: string[] = [],
): Promise<RunResult> {
  return run("sh", [
    "-c",
    'img="$1" deno="$2"; shift 2; cat "$img" | "$deno" run "$@"',
    "sh",
    image,
    Deno.execPath(),
    ...perms,
    CLI,
    "import",
    dest,
    ...args,
  ]);
}

const NO_FFI = ["--allow-read", "--allow-write", "--allow-env"];

/**
 * A disk larger than the import's first read (4 MiB), so that data follows it in the
 * pipe: 16 MiB of data with a hole, ending in a partial 4 KiB cluster.
 */
async function bigDisk(path: string): Promise<void> {
  const size = 20 * MiB + 1536;
  await writeSparse(path, size, [
    [0, pseudoRandom(10 * MiB, 3)],
    [12 * MiB, pseudoRandom(6 * MiB, 4)],
    [size - 3000, pseudoRandom(3000, 5)],
  ]);
}

qemuTest("import: spliced from a pipe = read in JavaScript = read from a file", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await bigDisk(src);
    const img = `${dir}/img.qcow2`;
    // Small clusters: many L2 tables among the data, and a partial last cluster.
    await qemu(["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, img]);
    const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
    const outs = {
      splice: [["-A"], []],
      stream: [NO_FFI, []],
      inputFd: [["-A"], ["--input-fd", "0"]],
      file: [["-A"], ["-i", img]],
    } as const;
    for (const [name, [perms, args]] of Object.entries(outs)) {
      const out = `${dir}/${name}.raw`;
      assertOk(await pipedImport(img, out, [...perms], [...args]));
      await assertSameBytes(want, out);
    }
    assert.equal(await sha256File(`${dir}/splice.raw`), await sha256File(`${dir}/stream.raw`));
  });
});

qemuTest("import: a stream cut inside spliced data fails the same way without FFI", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await bigDisk(src);
    const img = `${dir}/img.qcow2`;
    await qemu(["convert", "-f", "raw", "-O", "qcow2", src, img]);
    const cut = `${dir}/cut.qcow2`;
    await truncatedCopy(img, cut, (await Deno.stat(img)).size - 1_000_000);
    const a = await pipedImport(cut, `${dir}/a.raw`, ["-A"]);
    const b = await pipedImport(cut, `${dir}/b.raw`, NO_FFI);
    assert.equal(a.code, 1, a.stderr);
    assert.match(a.stderr, /the stream ends at byte \d+, inside the data of guest cluster/);
    assert.equal(a.stderr, b.stderr);
    await assert.rejects(Deno.stat(`${dir}/a.raw`), Deno.errors.NotFound);
  });
});

qemuTest("importFromPipe: a named pipe's data clusters are spliced", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await bigDisk(src);
    const img = `${dir}/img.qcow2`;
    await qemu(["convert", "-f", "raw", "-O", "qcow2", src, img]);
    const fifo = `${dir}/fifo`;
    await qemu([fifo], "mkfifo");
    const writer = new Deno.Command("sh", { args: ["-c", 'cat "$1" > "$2"', "sh", img, fifo] })
      .spawn();
    const pipe = openPipeInput({ path: fifo }, fifo);
    assert.ok(pipe, "a named pipe opens as a pipe (FFI is allowed in tests)");
    try {
      const out = `${dir}/out.raw`;
      const result = await importFromPipe(pipe, out);
      assert.equal(result.format, "qcow2");
      assert.ok(result.splicedBytes >= 8 * MiB, `${result.splicedBytes} bytes spliced`);
      assert.ok(result.splicedBytes <= result.dataBytes);
      await assertSameBytes(src, out);
    } finally {
      pipe.close();
      assert.equal((await writer.status).code, 0);
    }
    // A regular file is not a pipe: the caller reads it as a stream.
    assert.equal(openPipeInput({ path: img }, img), null);
  });
});

qemuTest("import: VHD blocks spliced from a pipe; a missing footer is still seen", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    await bigDisk(src);
    const img = `${dir}/img.vhd`;
    await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", src, img]);
    const want = await qemuRaw(img, "vpc", `${dir}/want.raw`);
    for (const [name, perms] of [["splice", ["-A"]], ["stream", NO_FFI]] as const) {
      const out = `${dir}/${name}.raw`;
      assertOk(await pipedImport(img, out, [...perms]));
      await assertSameBytes(want, out);
    }
    // Without its footer the stream ends right after the last block's data.
    const cut = `${dir}/cut.vhd`;
    await truncatedCopy(img, cut, (await Deno.stat(img)).size - 512);
    const a = await pipedImport(cut, `${dir}/a.raw`, ["-A"]);
    const b = await pipedImport(cut, `${dir}/b.raw`, NO_FFI);
    assert.equal(a.code, 1, a.stderr);
    assert.match(a.stderr, /without the VHD footer/);
    assert.equal(a.stderr, b.stderr);
  });
});
