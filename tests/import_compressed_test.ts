/**
 * Compressed qcow2 images (deflate, zstd) made by `qemu-img convert -c`, imported
 * through a pipe while the decompression workers take part: the bytes equal the
 * source, with the system's decoders (FFI) and without them (`node:zlib`);
 * compressed clusters at the end of the disk (a partial last cluster whose data ends
 * the file); and a corrupt compressed cluster far into the stream, refused with one
 * line naming the guest cluster and the byte offset; clusters that compress hundreds
 * to one decoded in bounded memory.
 */
import assert from "node:assert/strict";
import { runMeasured } from "../tasks/fuzz_run.ts";
import {
  CLI,
  imagesEqual,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import {
  assertOk,
  assertOneLineError,
  assertSameBytes,
  importPiped,
  MiB,
  patchAt,
  qcow2Tables,
  qemuRaw,
  readU64At,
  writeU64At,
} from "./import_fixtures.ts";

/**
 * 20 MiB + 1536 bytes: data that compresses about 2:1, random data and holes, and a
 * partial last cluster whose compressed data ends up at the end of the image file.
 */
async function compressibleDisk(path: string): Promise<number> {
  const size = 20 * MiB + 1536;
  const text = pseudoRandom(MiB, 99).map((b) => 0x41 + (b & 0x0f));
  const writes: [number, Uint8Array][] = [];
  for (let m = 0; m < 20; m++) {
    if (m % 4 === 3 && m < 16) continue; // a hole
    writes.push([m * MiB, m % 4 === 2 && m < 16 ? pseudoRandom(MiB, m) : text]);
  }
  writes.push([20 * MiB, text.subarray(0, 1536)]);
  await writeSparse(path, size, writes);
  return size;
}

/**
 * The compressed clusters of a qcow2 file: guest cluster, host offset and length (to
 * the end of its last sector), and where its L2 entry is.
 */
async function compressedClusters(img: string) {
  const t = await qcow2Tables(img);
  const bits = BigInt(Math.log2(t.clusterSize));
  const x = 62n - (bits - 8n);
  const perTable = t.clusterSize / 8;
  const out: { guest: number; host: number; length: number; entry: number }[] = [];
  for (const [i, l2] of t.l2.entries()) {
    if (l2 === 0) continue;
    for (let j = 0; j < perTable; j++) {
      const v = await readU64At(img, l2 + j * 8);
      if ((v & (1n << 62n)) === 0n) continue;
      const host = Number(v & ((1n << x) - 1n));
      const sectors = Number((v >> x) & ((1n << (62n - x)) - 1n));
      const length = (sectors + 1) * 512 - (host % 512);
      out.push({ guest: i * perTable + j, host, length, entry: l2 + j * 8 });
    }
  }
  return out;
}

/** Name, and qemu-img's `compression_type`. */
const TYPES = [["deflate", "zlib"], ["zstd", "zstd"]] as const;

interface Case {
  dir: string;
  /** The source disk and its size. */
  src: string;
  size: number;
  /** The compression's name and the `qemu-img convert -c` image of the source. */
  name: string;
  img: string;
}

/** Runs `fn` with the source disk and its compressed image, for each compression type. */
function eachImage(fn: (c: Case) => Promise<void>): Promise<void> {
  return withTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    const size = await compressibleDisk(src);
    for (const [name, type] of TYPES) {
      const img = `${dir}/${name}.qcow2`;
      await qemu(["convert", "-c", "-O", "qcow2", "-o", `compression_type=${type}`, src, img]);
      await fn({ dir, src, size, name, img });
    }
  });
}

qemuTest("import: deflate and zstd images through a pipe, with and without FFI", async () => {
  await eachImage(async ({ dir, src, name, img }) => {
    assert.ok((await compressedClusters(img)).length > 150, "mostly compressed clusters");
    const out = `${dir}/${name}.raw`;
    assertOk(await importPiped(img, out));
    await assertSameBytes(src, out);
    await Deno.remove(out);
    // Without --allow-ffi: node:zlib on the workers and the main thread.
    const narrow = await run(
      Deno.execPath(),
      ["run", "--allow-read", "--allow-write", CLI, "import", out],
      { stdinFile: img },
    );
    assertOk(narrow);
    await assertSameBytes(src, out);
    await Deno.remove(out);
  });
});

qemuTest("import: compressed clusters at the end of the disk and of the file", async () => {
  await eachImage(async ({ dir, src, size, name, img }) => {
    const fileSize = (await Deno.stat(img)).size;
    const last = (await compressedClusters(img)).reduce((a, b) => (b.host > a.host ? b : a));
    assert.equal(last.guest, Math.floor(size / 65536), "the partial last cluster is compressed");
    assert.equal(last.host + last.length, fileSize, "its sectors end the file");
    // The same image whose last compressed range claims one sector more: it reaches
    // past the end of the stream, and qemu-img reads it all the same.
    const longer = `${dir}/${name}-longer.qcow2`;
    await Deno.copyFile(img, longer);
    const x = 62n - (16n - 8n);
    await writeU64At(longer, last.entry, (await readU64At(img, last.entry)) + (1n << x));
    assert.equal(
      (await compressedClusters(longer)).find((c) => c.guest === last.guest)!.length,
      last.length + 512,
    );
    for (const image of [img, longer]) {
      const out = `${dir}/${name}.raw`;
      await assertSameBytes(src, await qemuRaw(image, "qcow2", `${dir}/qemu.raw`));
      assertOk(await importPiped(image, out));
      await assertSameBytes(src, out);
      await Deno.remove(out);
    }
  });
});

qemuTest("import: a corrupt compressed cluster far into the stream names its cluster", async () => {
  await eachImage(async ({ dir, img }) => {
    const clusters = await compressedClusters(img);
    const victim = clusters[clusters.length - 20];
    await patchAt(img, victim.host, new Uint8Array(16).fill(0xa5));
    const out = `${dir}/refused.raw`;
    const r = await importPiped(img, out);
    assertOneLineError(
      r,
      new RegExp(
        `the compressed data of guest cluster ${victim.guest} \\(guest offset ` +
          `${victim.guest * 65536}\\) (is not valid deflate data|is not zstd data|` +
          `is not valid zstd data|decompresses to).* \\(at byte offset ${victim.host}\\)$`,
      ),
    );
    await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "the new file is removed");
  });
});

qemuTest("import: tiny compressed clusters wait for their writes in bounded memory", async () => {
  await withTempDir(async (dir) => {
    // 256 MiB of one byte value, compressed about 600:1: every 1 MiB slice of the
    // stream decompresses to hundreds of MiB unless the reader waits for the writes.
    const img = `${dir}/ones.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", img, "256M"]);
    await qemu(["-f", "qcow2", "-c", "write -c -P 1 0 256M", img], "qemu-io");
    assert.ok((await compressedClusters(img)).length === 4096, "every cluster compressed");
    const out = `${dir}/out.raw`;
    const r = await runMeasured(Deno.execPath(), ["run", "-A", CLI, "import", out], {
      stdin: await Deno.readFile(img),
      timeLimitMs: 120_000,
    });
    assertOk(r);
    assert.ok(r.peakRss < 200 * MiB, `peak RSS ${r.peakRss}`);
    assert.ok(await imagesEqual(out, img, "raw", "qcow2"));
  });
});
