/**
 * `diskstream import` of qcow2 images whose tables come after their data, made by
 * qemu-img at test time: a resize across an L1 boundary, a snapshot followed by a
 * rewrite, 512 B clusters with 64-bit refcounts, and QEMU 0.10's v2 layout (backing
 * file name right after the 72-byte header). Each is imported through a pipe and from
 * a file (-i FILE, stdin redirected from the file, --input-fd) and compared with
 * `qemu-img convert -O raw`; from a file nothing is buffered, through a pipe what
 * does not fit in --max-buffer is spooled, or refused with --no-spool naming the
 * --max-buffer that is enough. Also: a fixed VHD file whose first sector looks like
 * another VHD's footer.
 */
import assert from "node:assert/strict";
import { importImage } from "../lib/import/import.ts";
import { LimitError } from "../lib/errors.ts";
import { StreamBuffer } from "../lib/io/stream_buffer.ts";
import { Spool } from "../lib/io/spool.ts";
import {
  CLI,
  imagesEqual,
  IN_CI,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  withTempDir,
} from "./helpers.ts";
import {
  assertOk,
  assertOneLineError,
  assertSameBytes,
  importPiped,
  patchAt,
  qemuRaw,
  writeU64At,
} from "./import_fixtures.ts";

const MiB = 1 << 20;

/** `qemu-io -c CMD` on a qcow2 image. */
async function io(img: string, ...cmds: string[]) {
  await qemu(["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), img], "qemu-io");
}

/** 512 B clusters, resized from 1 MiB to 64 MiB: the L1 table moves after the data. */
async function resizedImage(dir: string): Promise<string> {
  const img = `${dir}/resized.qcow2`;
  await qemu(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"]);
  await io(img, "write -P 0x11 0 300k", "write -P 0x12 700k 100k");
  await qemu(["resize", "-q", img, "64M"]);
  await io(img, "write -P 0x13 40M 64k", "write -P 0x14 100k 8k");
  return img;
}

/** Snapshotted, then rewritten: the active L2 tables are copied after the old data. */
async function snapshotImage(dir: string): Promise<string> {
  const img = `${dir}/snap.qcow2`;
  await qemu(["create", "-q", "-f", "qcow2", img, "8M"]);
  await io(img, "write -P 0x21 0 8M");
  await qemu(["snapshot", "-c", "s1", img]);
  await io(img, "write -P 0x22 0 6M", "write -z 6M 1M");
  await qemu(["snapshot", "-c", "s2", img]);
  await io(img, "write -P 0x23 1M 64k");
  return img;
}

/** 512 B clusters with 64-bit refcounts: refcount blocks interleaved with the data. */
async function refcount64Image(dir: string): Promise<string> {
  const img = `${dir}/rc64.qcow2`;
  const opts = "cluster_size=512,refcount_bits=64";
  await qemu(["create", "-q", "-f", "qcow2", "-o", opts, img, "4M"]);
  await io(img, "write -P 0x31 0 1M", "write -P 0x32 3M 512k");
  // And qemu-img convert's layout at that size: the refcount table at the end.
  const raw = `${dir}/rc64.src.raw`;
  await Deno.writeFile(raw, pseudoRandom(2 * MiB, 3));
  await qemu(["convert", "-q", "-O", "qcow2", "-o", opts, raw, `${dir}/rc64c.qcow2`]);
  return img;
}

/**
 * QEMU 0.10's v2 layout, by hand: a compat=0.10 image over a raw base, its header
 * extensions removed and the backing file name moved right after the 72-byte header.
 */
async function legacyImage(dir: string): Promise<{ img: string; base: string }> {
  const base = `${dir}/base.raw`;
  await Deno.writeFile(base, pseudoRandom(4 * MiB, 4));
  const img = `${dir}/legacy.qcow2`;
  await qemu([
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "compat=0.10,cluster_size=4096",
    "-b",
    "base.raw",
    "-F",
    "raw",
    img,
  ]);
  await io(img, "write -P 0x41 64k 512k", "write -P 0x42 3M 4k");
  const name = new TextEncoder().encode("base.raw");
  await patchAt(img, 72, new Uint8Array(256)); // extensions and old name gone
  await patchAt(img, 72, name);
  await writeU64At(img, 8, 72n);
  return { img, base };
}

/** Runs the CLI through sh with shell redirections (stdin from a file, inherited fds). */
function runShell(script: string) {
  return run("sh", ["-c", script.replaceAll("$CLI", `'${Deno.execPath()}' run -A '${CLI}'`)]);
}

/** The ways to give the image as a file. */
function fileWays(img: string, out: string, extra = ""): [string, () => ReturnType<typeof run>][] {
  return [
    ["-i FILE", () => runCli(["import", out, "-i", img, ...extra.split(" ").filter(Boolean)])],
    ["stdin from a file", () => runShell(`exec $CLI import '${out}' ${extra} < '${img}'`)],
    ["--input-fd", () => runShell(`exec $CLI import '${out}' --input-fd 3 ${extra} 3< '${img}'`)],
  ];
}

/** Imports `img` through a pipe and as a file every way, comparing with `want`. */
async function importEveryWay(img: string, want: string, dir: string, extra: string[] = []) {
  const pipeOut = `${dir}/pipe.raw`;
  assertOk(await importPiped(img, pipeOut, extra));
  await assertSameBytes(want, pipeOut);
  await Deno.remove(pipeOut);
  // From a file nothing is held: a tiny buffer without a spool is enough.
  for (const [how, go] of fileWays(img, `${dir}/file.raw`, `--max-buffer 4K --no-spool`)) {
    if (extra.length > 0) continue;
    const r = await go();
    assertOk(r);
    assert.doesNotMatch(r.stderr, /spool/, how);
    await assertSameBytes(want, `${dir}/file.raw`);
    await Deno.remove(`${dir}/file.raw`);
  }
}

qemuTest("import: tables after their data, through a pipe and from a file", async (t) => {
  await withTempDir(async (dir) => {
    for (
      const [name, make] of [
        ["resize across an L1 boundary", resizedImage],
        ["snapshot + rewrite", snapshotImage],
        ["512 B clusters, 64-bit refcounts", refcount64Image],
      ] as const
    ) {
      await t.step(name, async () => {
        const img = await make(dir);
        await importEveryWay(img, await qemuRaw(img, "qcow2", `${dir}/want.raw`), dir);
        if (make === refcount64Image) {
          const conv = `${dir}/rc64c.qcow2`;
          await importEveryWay(conv, await qemuRaw(conv, "qcow2", `${dir}/want.raw`), dir);
        }
      });
    }
  });
});

qemuTest("import: pipe past --max-buffer spools, --no-spool names what is enough", async () => {
  await withTempDir(async (dir) => {
    const img = await snapshotImage(dir);
    const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
    // The old data (8 MiB) comes before the active L2 tables: 1 MiB of memory, then the spool.
    const spooled = await importPiped(img, `${dir}/s.raw`, ["--max-buffer", "1M"]);
    assertOk(spooled);
    assert.match(spooled.stderr, /^import: [\d.]+ MiB \(\d+ bytes\) of the stream came before/);
    const bytes = Number(/\((\d+) bytes\)/.exec(spooled.stderr)![1]);
    assert.ok(bytes >= 6 * MiB && bytes <= 9 * MiB, `${bytes} bytes spooled`);
    await assertSameBytes(want, `${dir}/s.raw`);
    // --spool-dir: where it goes; a missing folder is one line.
    const sd = `${dir}/spool`;
    await Deno.mkdir(sd);
    assertOk(await importPiped(img, `${dir}/d.raw`, ["--max-buffer", "1M", "--spool-dir", sd]));
    await assertSameBytes(want, `${dir}/d.raw`);
    assert.deepEqual([...Deno.readDirSync(sd)], [], "the spool file is gone");
    assertOneLineError(
      await importPiped(img, `${dir}/m.raw`, ["--max-buffer", "1M", "--spool-dir", `${dir}/no`]),
      /cannot create a spool file in .*\/no: no such file or directory/,
    );
    // Without a spool: refused, naming a --max-buffer that is enough, which then works.
    const refused = await importPiped(img, `${dir}/n.raw`, ["--max-buffer", "1M", "--no-spool"]);
    assertOneLineError(refused, /needs --max-buffer (\d+)M to be imported from a pipe/);
    await assert.rejects(Deno.stat(`${dir}/n.raw`), Deno.errors.NotFound);
    const need = /needs --max-buffer (\d+M)/.exec(refused.stderr)![1];
    assert.ok(parseInt(need) <= 10, `needed ${need} for 8 MiB of old data`);
    assertOk(await importPiped(img, `${dir}/n.raw`, ["--max-buffer", need, "--no-spool"]));
    await assertSameBytes(want, `${dir}/n.raw`);
    // The library: spooled by default, refused with spool: false.
    const out = `${dir}/lib.raw`;
    const r = await importImage((await Deno.open(img)).readable, out, { maxBuffer: MiB });
    assert.ok(r.spooledBytes >= 6 * MiB, `${r.spooledBytes}`);
    await assertSameBytes(want, out);
    await assert.rejects(
      importImage((await Deno.open(img)).readable, `${dir}/lib2.raw`, {
        maxBuffer: MiB,
        spool: false,
      }),
      LimitError,
    );
  });
});

qemuTest(
  "import: thousands of refcount blocks before the refcount table, small --max-buffer",
  async () => {
    await withTempDir(async (dir) => {
      // qemu-img convert at 512 B clusters with 64-bit refcounts: a refcount block after
      // every 64 data clusters, named only by the refcount table two thirds in.
      const raw = `${dir}/r.raw`;
      await Deno.writeFile(raw, pseudoRandom(32 * MiB, 8));
      const img = `${dir}/rc.qcow2`;
      await qemu([
        "convert",
        "-q",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        raw,
        img,
      ]);
      const r = await importPiped(img, `${dir}/out.raw`, ["--max-buffer", "256K"]);
      assertOk(r);
      assert.match(r.stderr, /waited in a spool file/);
      await assertSameBytes(raw, `${dir}/out.raw`);
    });
  },
);

Deno.test({
  name: "import: a full spool filesystem is one clear line",
  // Mounting a small tmpfs needs root (CI runs as root).
  ignore: !IN_CI && Deno.uid() !== 0,
  fn: async () => {
    await withTempDir(async (dir) => {
      const img = await snapshotImage(dir);
      const mnt = `${dir}/small`;
      await Deno.mkdir(mnt);
      const m = await run("mount", ["-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt]);
      assert.equal(m.code, 0, m.stderr);
      try {
        const r = await importPiped(img, `${dir}/f.raw`, [
          "--max-buffer",
          "1M",
          "--spool-dir",
          mnt,
        ]);
        assertOneLineError(r, /spool file in .*small ran out of space after .*--spool-dir/);
        await assert.rejects(Deno.stat(`${dir}/f.raw`), Deno.errors.NotFound);
      } finally {
        await run("umount", [mnt]);
      }
    });
  },
});

qemuTest("import --delta, headers, info: QEMU 0.10 v2 layout (name after the header)", async () => {
  await withTempDir(async (dir) => {
    const { img, base } = await legacyImage(dir);
    const want = await qemuRaw(img, "qcow2", `${dir}/want.raw`);
    const check = async (out: string) => {
      await assertSameBytes(want, out);
      await Deno.remove(out);
    };
    await Deno.copyFile(base, `${dir}/p.raw`);
    assertOk(await importPiped(img, `${dir}/p.raw`, ["--delta"]));
    await check(`${dir}/p.raw`);
    await Deno.copyFile(base, `${dir}/f.raw`);
    assertOk(await runCli(["import", `${dir}/f.raw`, "--delta", "-i", img]));
    await check(`${dir}/f.raw`);
    const headers = await runCli(["headers", img]);
    assertOk(headers);
    assert.equal(
      new TextDecoder().decode(headers.stdout),
      '{"virtual_size":4194304,"cluster_bits":12,"data_clusters":[[0,1023]]}',
    );
    const info = await runCli(["info", img, "--json"]);
    assertOk(info);
    const json = JSON.parse(new TextDecoder().decode(info.stdout));
    assert.equal(json.format_version, "2");
    assert.equal(json.backing_file, "base.raw");
    assert.equal(json.allocated_clusters, 129);
  });
});

qemuTest("import: a fixed VHD file whose first sector is another VHD's footer", async () => {
  await withTempDir(async (dir) => {
    // The disk inside is itself a dynamic VHD file (a VM's disk image on its disk).
    const inner = `${dir}/inner.vhd`;
    await Deno.writeFile(`${dir}/inner.raw`, pseudoRandom(3 * MiB, 5));
    await qemu(["convert", "-q", "-O", "vpc", `${dir}/inner.raw`, inner]);
    const innerBytes = await Deno.readFile(inner);
    const padded = new Uint8Array(Math.ceil(innerBytes.length / MiB) * MiB);
    padded.set(innerBytes);
    await Deno.writeFile(`${dir}/disk.raw`, padded);
    const outer = `${dir}/outer.vhd`;
    await qemu([
      "convert",
      "-q",
      "-f",
      "raw", // not probed: the file is a VHD
      "-O",
      "vpc",
      "-o",
      "subformat=fixed,force_size=on",
      `${dir}/disk.raw`,
      outer,
    ]);
    // The reference is the disk itself: QEMU's vpc driver trusts the first sector, so
    // qemu-img reads this file as the dynamic VHD inside it.
    const want = `${dir}/disk.raw`;
    assert.equal(await imagesEqual(outer, want, "vpc", "raw"), false, "qemu-img misreads it");
    for (const [how, go] of fileWays(outer, `${dir}/out.raw`)) {
      const r = await go();
      assert.equal(r.code, 0, `${how}: ${r.stderr}`);
      await assertSameBytes(want, `${dir}/out.raw`);
      await Deno.remove(`${dir}/out.raw`);
    }
  });
});

Deno.test("stream buffer: spooled pieces read back; dropped metadata is not counted", () => {
  const spool = new Spool();
  try {
    const unit = 512;
    const buf = new StreamBuffer(4096, unit, spool);
    const a = pseudoRandom(3000, 1);
    const b = pseudoRandom(8192, 2);
    buf.add(1000, a, 0, a.length); // in memory
    buf.add(4000, b, 0, b.length); // past the limit: spooled
    assert.ok(spool.bytes >= 4096, `${spool.bytes} spooled`);
    assert.deepEqual(buf.take(4096, 1024), b.subarray(96, 1120));
    assert.deepEqual(buf.read(1000, 3000 + 8192), new Uint8Array([...a, ...b]).subarray(0));
    // Dropped ranges are let go and remembered.
    const before = buf.used;
    buf.drop(1024, 1024);
    assert.ok(buf.used < before);
    assert.ok(buf.dropped(1500) && !buf.dropped(3000));
    assert.equal(buf.take(1024, 512), undefined);
    // Memory wanted for metadata: what is kept in memory moves to the spool, still readable.
    const held = buf.used;
    assert.ok(buf.spill() > 0 && buf.used < held);
    assert.deepEqual(buf.take(2048, 1952), a.subarray(1048));
  } finally {
    spool.close();
  }
  // Without a spool: nothing kept past the limit, and the peak is what is needed.
  const counting = new StreamBuffer(2048, 512);
  const c = pseudoRandom(8192, 3);
  counting.add(0, c, 0, c.length);
  counting.drop(4096, 4096); // known to be metadata: no longer counted
  assert.ok(!counting.overflowed, "bytes not kept fail the import only when claimed");
  counting.take(2048, 512);
  assert.ok(counting.overflowed);
  assert.match(counting.overflowError().message, /needs --max-buffer 1M/);
});

qemuTest("import -i: a truncated file is refused before anything is written", async () => {
  await withTempDir(async (dir) => {
    const img = await snapshotImage(dir);
    const cut = `${dir}/cut.qcow2`;
    const bytes = await Deno.readFile(img);
    await Deno.writeFile(cut, bytes.subarray(0, bytes.length - 100_000));
    const dest = `${dir}/dest.raw`;
    const before = pseudoRandom(8 * MiB, 6);
    await Deno.writeFile(dest, before);
    assertOneLineError(
      await runCli(["import", dest, "-i", cut]),
      /the data of guest cluster \d+ .* past the end of the \d+-byte file: the image is truncated/,
    );
    assert.deepEqual(await Deno.readFile(dest), before, "the destination is untouched");
    assertOneLineError(await runCli(["import", `${dir}/new.raw`, "-i", cut]), /truncated/);
    await assert.rejects(Deno.stat(`${dir}/new.raw`), Deno.errors.NotFound);
  });
});
