/**
 * Disk geometry at its edges, with qemu-img and qemu-io as the oracle: sizes around
 * 512 B, 64 KiB and 2 MiB and a sparse 3 TiB disk through every export format (to a
 * pipe and to a file) and back through import (from a pipe and with -i); qcow2 images
 * qemu writes at every cluster size, refcount width and compression type, with zero
 * clusters and partial-cluster writes; VHDs qemu writes (dynamic and fixed, force_size
 * on and off) at sizes that fit neither the block nor the CHS geometry; diffs against
 * bases of other sizes. Every case checks the bytes (sha256 or qemu-img compare) and
 * headers/info against qemu-img map/info. The images are made at test time.
 */
import assert from "node:assert/strict";
import { readImageInfo } from "../lib/headers/info.ts";
import {
  assertOneLineError,
  qcow2Tables,
  qemuRaw,
  readU64At,
  writeU64At,
} from "./import_fixtures.ts";
import {
  CLI_SH,
  imagesEqual,
  ourAllocation,
  pseudoRandom,
  qemu,
  qemuAllocation,
  runCli,
  sh,
  sha256,
  sha256File,
  toolTest,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const MiB = 1 << 20;
const TiB = 2 ** 40;
const QEMU = [["qemu-img", "--version"], ["qemu-io", "--version"]];
const INSTALL = "apt-get install -y qemu-utils";
const DS = CLI_SH;

/** The qemu-img options of an extended L2 image with `cs`-byte clusters (plus `more`). */
const extL2 = (cs: number, more = "") => `cluster_size=${cs},extended_l2=on${more}`;

/** Creates an extended L2 qcow2 of `size` bytes at `img` with qemu-img (`more`: options). */
async function createExtL2(img: string, cs: number, size: number, more = ""): Promise<void> {
  await qemu(["create", "-q", "-f", "qcow2", "-o", extL2(cs, more), img, `${size}`]);
}
const ALL_FORMATS = ["qcow2", "vhd", "raw", "chunked", "tar"];
/** The sizes every wire format is tried at. */
const WIRE_SIZES = [1, 2 * MiB + 1, 3 * MiB + 4097];

/** The sizes at the edges of sectors, 64 KiB clusters and 2 MiB blocks. */
const SIZES = [
  1,
  511,
  512,
  513,
  65535,
  65536,
  65537,
  2 * MiB - 1,
  2 * MiB,
  2 * MiB + 1,
  3 * MiB + 4097,
];

/** A disk of `size` bytes: a few random bytes at each edge it has, zeros elsewhere. */
async function edgeDisk(path: string, size: number, seed = 1): Promise<Uint8Array> {
  const bytes = new Uint8Array(size);
  const edges = [0, 510, 511, 512, 65535, 65536, 2 * MiB - 1, 2 * MiB, size >> 1, size - 3];
  for (const [i, at] of edges.entries()) {
    if (at >= 0 && at < size) {
      bytes.set(pseudoRandom(Math.min(3, size - at), seed * 16 + i).map((b) => b | 1), at);
    }
  }
  await Deno.writeFile(path, bytes);
  return bytes;
}

/** `bytes` followed by zeros up to `length`. */
function padded(bytes: Uint8Array, length: number): Uint8Array {
  const out = new Uint8Array(length);
  out.set(bytes.subarray(0, length));
  return out;
}

/** The size an image of a `size`-byte disk has: whole sectors. */
const sectors = (size: number) => Math.ceil(size / 512) * 512;

/** Asserts that `path` holds exactly `want`. */
async function assertBytes(path: string, want: Uint8Array, what: string) {
  assert.equal((await Deno.stat(path)).size, want.length, `${what}: size`);
  assert.equal(await sha256File(path), sha256(want), `${what}: bytes`);
}

/** Asserts that our headers and info of `image` say what qemu-img map and info say. */
async function assertHeadersAgree(image: string, fmt: "qcow2" | "vpc", what: string) {
  assert.equal(
    await ourAllocation(image),
    await qemuAllocation(image, fmt === "vpc" ? 2 * MiB : undefined, fmt),
    what,
  );
  const q = JSON.parse(await qemu(["info", "-f", fmt, "--output=json", image]));
  const ours = await readImageInfo(image);
  assert.equal(ours.virtual_size, q["virtual-size"], `${what}: info virtual size`);
  if (fmt === "qcow2") assert.equal(ours.cluster_size, q["cluster-size"], `${what}: cluster`);
}

/** The import flags for an export format. */
function importFlags(format: string, size: number): string {
  if (format === "chunked") return `-f chunked --size ${size}`;
  return format === "qcow2" ? "" : `-f ${format}`;
}

toolTest(
  "geometry: edge sizes through every export format (pipe and file), imported back (pipe and -i)",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      for (const size of SIZES) {
        await t.step(`${size} bytes`, async () => {
          const src = `${dir}/src${size}.raw`;
          const bytes = await edgeDisk(src, size);
          // qcow2 and VHD round the size to sectors and map it in clusters or blocks at
          // every size; the wire formats (whole 1 MiB members, pieces) at a few odd ones.
          // Every process is a Deno start, so: from the pipe always; -i for qcow2 (the
          // random-access reader; VHDs with -i are in the tests below); -o for qcow2 at
          // the odd sizes, compared with the pipe's bytes.
          const odd = WIRE_SIZES.includes(size);
          const formats = odd ? ALL_FORMATS : ["qcow2", "vhd"];
          await Promise.all(formats.map(async (f) => {
            const what = `${size} bytes as ${f}`;
            const [file, piped] = [`${dir}/${size}.${f}`, `${dir}/${size}.piped.${f}`];
            const [b1, b2] = [`${dir}/${size}.${f}.1.raw`, `${dir}/${size}.${f}.2.raw`];
            const flags = importFlags(f, size);
            const qcow2 = f === "qcow2";
            await sh(
              `${DS} export ${src} -f ${f} | tee ${piped} | ${DS} import ${b1} ${flags}` +
                (qcow2 ? ` && ${DS} import ${b2} -i ${piped}` : ` && cp ${b1} ${b2}`) +
                (qcow2 && odd ? ` && ${DS} export ${src} -o ${file}` : ` && cp ${piped} ${file}`),
            );
            const want = f === "qcow2" || f === "vhd" ? padded(bytes, sectors(size)) : bytes;
            await assertBytes(b1, want, `${what}, imported from a pipe`);
            await assertBytes(b2, want, `${what}, imported with -i`);
            if (f === "vhd") {
              assert.ok(await imagesEqual(src, piped, "raw", "vpc"), what);
              await assertHeadersAgree(piped, "vpc", what);
            }
            if (f === "qcow2") {
              assert.equal(await sha256File(piped), await sha256File(file), `${what}: pipe = -o`);
              await qemu(["check", "-q", file]);
              assert.ok(await imagesEqual(src, file, "raw", "qcow2"), what);
              await assertHeadersAgree(file, "qcow2", what);
              await Deno.remove(file);
            }
            for (const p of [piped, b1, b2]) await Deno.remove(p);
            if (!qcow2) await Deno.remove(file);
          }));
        });
      }
    });
  },
);

toolTest(
  "geometry: a sparse 3 TiB disk with data at 0, 2^32, 2^41 and its last byte",
  QEMU,
  INSTALL,
  async () => {
    await withTempDir(async (dir) => {
      const size = 3 * TiB;
      const src = `${dir}/big.raw`;
      await writeSparse(src, size, [
        [5, pseudoRandom(7, 1)],
        [2 ** 32 - 3, pseudoRandom(7, 2)], // straddles 2^32 and a 64 KiB cluster
        [2 ** 41 - 2, pseudoRandom(4, 3)], // straddles 2^41
        [size - 1, new Uint8Array([0x7f])],
      ]);
      const q = `${dir}/big.qcow2`;
      // qcow2 from a pipe and with -i, chunked and tar from a pipe; raw would be 3 TiB
      // of bytes on the wire, and a VHD holds at most 2040 GiB (refused below).
      await sh(
        `${DS} export ${src} | tee ${q} | ${DS} import ${dir}/b1.raw && ` +
          `${DS} import ${dir}/b2.raw -i ${q} && ` +
          `${DS} export ${src} -f chunked | ${DS} import ${dir}/b3.raw -f chunked --size ${size} && ` +
          `${DS} export ${src} -f tar | ${DS} import ${dir}/b4.raw -f tar`,
      );
      await qemu(["check", "-q", q]);
      assert.ok(await imagesEqual(src, q, "raw", "qcow2"), "3 TiB qcow2");
      await assertHeadersAgree(q, "qcow2", "3 TiB qcow2");
      for (const b of ["b1", "b2", "b3", "b4"]) {
        const out = `${dir}/${b}.raw`;
        assert.equal((await Deno.stat(out)).size, size, b);
        assert.ok(await imagesEqual(src, out, "raw", "raw"), `3 TiB imported (${b})`);
        await Deno.remove(out);
      }
      const r = await runCli(["export", src, "-f", "vhd", "-o", `${dir}/big.vhd`]);
      assertOneLineError(r, /a VHD holds at most 2040 GiB.*3298534883328 bytes/);
      await assert.rejects(Deno.stat(`${dir}/big.vhd`));
    });
  },
);

/** A disk of 3 MiB + 4097 bytes: compressible text, random runs, holes, a short end. */
async function mixedDisk(path: string): Promise<number> {
  const size = 3 * MiB + 4097;
  const text = new TextEncoder().encode("geometry matrix ".repeat(20_000));
  await writeSparse(path, size, [
    [0, text.subarray(0, 200_000)],
    [MiB - 3, pseudoRandom(70_000, 5)],
    [2 * MiB + 512, text.subarray(0, 90_000)],
    [size - 100, pseudoRandom(100, 6)],
  ]);
  return size;
}

toolTest(
  "geometry: qcow2 from qemu-img/qemu-io at every cluster size, refcount width and compression",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      const src = `${dir}/src.raw`;
      const size = await mixedDisk(src);
      const clusterSizes = Array.from({ length: 13 }, (_, i) => 512 << i);
      const compressions = ["none", "zlib", "zstd"];
      const refcounts = [1, 16, 64];
      // Every cluster size with each compression in turn, refcount widths rotating (so
      // each width meets each compression); qemu-io then adds partial-cluster writes,
      // ZERO clusters (with and without a host cluster), a discard and a write at the end.
      const cases = clusterSizes.map((cs, i) => ({
        cs,
        comp: compressions[i % 3],
        rb: refcounts[Math.floor(i / 3) % 3],
      }));
      for (const { cs, comp, rb } of cases) {
        await t.step(`cluster ${cs}, ${comp}, refcount ${rb}`, async () => {
          const img = `${dir}/c${cs}.qcow2`;
          const o = `cluster_size=${cs},refcount_bits=${rb}` +
            (comp === "none" ? "" : `,compression_type=${comp}`);
          await qemu([
            "convert",
            ...(comp === "none" ? [] : ["-c"]),
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            o,
            src,
            img,
          ]);
          if (comp !== "none") {
            const info = await readImageInfo(img);
            assert.ok(info.qcow2!.compressed_clusters > 0, "qemu-img wrote compressed clusters");
          }
          const z = Math.min(cs * 3, 2 * MiB);
          await qemu([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1000 777",
            "-c",
            `write -z ${z + 512} ${Math.min(cs + 512, MiB)}`,
            "-c",
            `write -z -u ${Math.min(cs * 5, 3 * MiB)} ${Math.min(cs, 4096)}`,
            "-c",
            `discard ${MiB} ${Math.min(cs, MiB)}`,
            "-c",
            `write -P 0x11 ${size - 700} 300`,
            img,
          ], "qemu-io");
          const want = `${dir}/want.raw`;
          await qemu(["convert", "-f", "qcow2", "-O", "raw", img, want]);
          await sh(
            `cat ${img} | ${DS} import ${dir}/b1.raw && ` +
              `${DS} import ${dir}/b2.raw -i ${img}`,
          );
          const wantSum = await sha256File(want);
          for (const b of ["b1", "b2"]) {
            assert.equal(await sha256File(`${dir}/${b}.raw`), wantSum, `${b}: bytes`);
            await Deno.remove(`${dir}/${b}.raw`);
          }
          await assertHeadersAgree(img, "qcow2", `cluster ${cs}`);
          await Deno.remove(img);
          await Deno.remove(want);
        });
      }
    });
  },
);

toolTest(
  "geometry: extended L2 qcow2 (16 KiB, 64 KiB, 2 MiB clusters) — headers agree with qemu-img " +
    "map; import (pipe and -i; new file, over garbage, --delta onto the base, compressed, " +
    "spooled) gives qemu-img's bytes",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      for (const cs of [16384, 65536, 2 * MiB]) {
        await t.step(`cluster ${cs}`, async () => {
          const sc = cs / 32;
          const size = 3 * cs + cs / 2 + 4097; // qemu rounds it up to 512
          const vsize = Math.ceil(size / 512) * 512;
          const base = `${dir}/base.raw`;
          await Deno.writeFile(base, pseudoRandom(size, 7));
          // Subcluster-grained writes: partial subclusters (copied on write from the
          // backing file or zeros), zero with and without a host cluster (also inside
          // written data), a discarded cluster (qcow2 discards whole clusters), a write
          // across a cluster edge, the last partial cluster.
          const writes = [
            "write -P 0x5a 1000 777",
            `write -z -u ${10 * sc} ${sc}`,
            `write -P 0x33 ${cs + 4 * sc} ${4 * sc}`,
            `write -z -u ${cs + 5 * sc} ${sc}`,
            `write -z ${cs + sc} ${2 * sc}`,
            `write -P 0x44 ${2 * cs} ${cs}`,
            `discard ${2 * cs} ${cs}`,
            `write -P 0x77 ${2 * cs - 3 * sc} ${6 * sc}`,
            `write -P 0x11 ${size - 700} 300`,
          ].flatMap((w) => ["-c", w]);
          const opts = extL2(cs);
          const plain = `${dir}/x${cs}.qcow2`;
          const over = `${dir}/o${cs}.qcow2`;
          await createExtL2(plain, cs, size);
          await qemu(["create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "raw", over]);
          for (const img of [plain, over]) {
            await qemu(["-f", "qcow2", ...writes, img], "qemu-io");
            await qemu(["check", "-q", img]);
          }
          await assertHeadersAgree(plain, "qcow2", `extended L2, cluster ${cs}`);
          const comp = `${dir}/c${cs}.qcow2`;
          await qemu(["convert", "-c", "-O", "qcow2", "-o", opts, plain, comp]);
          assert.ok((await readImageInfo(comp)).qcow2!.compressed_clusters > 0, "compressed");
          const want = await sha256File(await qemuRaw(plain, "qcow2", `${dir}/want.raw`));
          const wantOver = await sha256File(await qemuRaw(over, "qcow2", `${dir}/want.raw`));
          const garbage = pseudoRandom(size + 4608, 9);
          const out = `${dir}/out.raw`;
          const cases: [string, string, Uint8Array | null, string[], string][] = [
            ["new file", plain, null, [], want],
            ["over garbage", plain, garbage, [], want],
            ["--delta onto the base", over, await Deno.readFile(base), ["--delta"], wantOver],
            ["compressed", comp, garbage, [], want],
          ];
          for (const [what, img, initial, flags, sum] of cases) {
            for (const how of ["pipe", "-i"]) {
              if (initial) await Deno.writeFile(out, initial.subarray(0, vsize));
              const r = how === "pipe"
                ? await sh(`cat ${img} | ${DS} import ${out} ${flags.join(" ")}`)
                : await sh(`${DS} import ${out} -i ${img} ${flags.join(" ")}`);
              assert.equal(r, "", `${what}, ${how}`);
              assert.equal(await sha256File(out), sum, `${what}, ${how}, cluster ${cs}`);
              await Deno.remove(out);
            }
          }
          for (const f of [plain, over, comp]) await Deno.remove(f);
        });
      }
      await t.step("data before its tables: spooled, or --no-spool naming enough", async () => {
        const img = `${dir}/r.qcow2`;
        await createExtL2(img, 16 * 1024, 4 * MiB);
        await qemu([
          "-f",
          "qcow2",
          "-c",
          "write -P 0x21 1000 300k",
          "-c",
          "write -z 8k 2k",
          "-c",
          "write -z -u 100k 1k",
          "-c",
          "discard 160k 16k",
          img,
        ], "qemu-io");
        await qemu(["resize", "-q", img, "40M"]); // the L1 table moves after all the data
        const want = await sha256File(await qemuRaw(img, "qcow2", `${dir}/want.raw`));
        const out = `${dir}/out.raw`;
        await sh(`cat ${img} | ${DS} import ${out} --max-buffer 64K 2>/dev/null`);
        assert.equal(await sha256File(out), want, "spooled");
        await Deno.remove(out);
        const r = await runCli(["import", out, "--max-buffer", "64K", "--no-spool"], {
          stdinFile: img,
        });
        assertOneLineError(r, /before the metadata that maps it .*needs --max-buffer \d+M/);
        await sh(`${DS} import ${out} -i ${img} --max-buffer 4K --no-spool`);
        assert.equal(await sha256File(out), want, "-i");
      });
    });
  },
);

toolTest(
  "geometry: extended L2 edges — allocated subclusters past the virtual size (not in the file) " +
    "are not needed; with -i, tables whose every entry names 16 runs fit their allowance",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      const out = `${dir}/out.raw`;
      /** Imports `img` through a pipe and with -i (`flags` with -i only), as qemu-img reads it. */
      const bothWays = async (img: string, flags: string, what: string) => {
        const want = await sha256File(await qemuRaw(img, "qcow2", `${dir}/want.raw`));
        for (const how of ["pipe", "-i"]) {
          const r = how === "pipe"
            ? await sh(`cat ${img} | ${DS} import ${out}`)
            : await sh(`${DS} import ${out} -i ${img} ${flags}`);
          assert.equal(r, "", `${what}, ${how}`);
          assert.equal(await sha256File(out), want, `${what}, ${how}`);
          await Deno.remove(out);
        }
      };
      await t.step(
        "last cluster: bitmap bits past the end, file ends at the disk's end",
        async () => {
          // 64 KiB clusters, 2 KiB subclusters: the disk ends after subcluster 3 of cluster 3,
          // and qemu's file ends there too (it writes whole subclusters, not clusters).
          const cs = 65536;
          const size = 3 * cs + 4 * (cs / 32);
          const img = `${dir}/end.qcow2`;
          await createExtL2(img, cs, size);
          await qemu(["-f", "qcow2", "-c", `write -P 0x3c 0 ${size}`, img], "qemu-io");
          const l2 = (await qcow2Tables(img)).l2[0];
          const entry = await readU64At(img, l2 + 3 * 16);
          assert.equal(
            (await Deno.stat(img)).size,
            Number(entry & 0x00fffffffffffe00n) + size - 3 * cs,
          );
          assert.equal(
            await readU64At(img, l2 + 3 * 16 + 8),
            0xfn,
            "qemu allocated subclusters 0-3",
          );
          // As `qemu-img resize --shrink` leaves it: every subcluster allocated, the ones
          // past the disk's end not in the file. QEMU never reads them; qemu-img check is clean.
          await writeU64At(img, l2 + 3 * 16 + 8, 0xffffffffn);
          await qemu(["check", "-q", img]);
          await bothWays(img, "", "bits past the end");
          await Deno.remove(img);
        },
      );
      await t.step("-i: every entry allocates every other subcluster (16 runs)", async () => {
        // 3072 clusters of 16 KiB: 3 L2 tables (48 KiB) naming 49152 ranges, 1.2 MiB of
        // agenda in a run of capacity 65536 (1.6 MiB), over the 32 bytes per table byte
        // allowed before; a sparse file, a few subclusters with data.
        const cs = 16384;
        const n = 3072;
        const pre = `${dir}/pre.qcow2`;
        await createExtL2(pre, cs, n * cs, ",preallocation=metadata");
        const bytes = await Deno.readFile(pre);
        await Deno.remove(pre);
        const v = new DataView(bytes.buffer);
        const l1 = Number(v.getBigUint64(40));
        const writes: [number, Uint8Array][] = [];
        let metaEnd = 0;
        for (let c = 0; c < n; c++) {
          const table = Number(v.getBigUint64(l1 + Math.floor(c / 1024) * 8) & 0x00fffffffffffe00n);
          const at = table + (c % 1024) * 16;
          v.setUint32(at + 12, 0x55555555);
          metaEnd = Math.max(metaEnd, table + cs);
          const host = Number(v.getBigUint64(at) & 0x00fffffffffffe00n);
          if (c % 97 === 0) writes.push([host + 2 * 512, pseudoRandom(512, c)]);
        }
        const img = `${dir}/runs.qcow2`;
        await writeSparse(img, bytes.length, [[0, bytes.subarray(0, metaEnd)], ...writes]);
        await qemu(["check", "-q", img]);
        await bothWays(img, "--max-buffer 64K", "16 runs per entry");
        await Deno.remove(img);
      });
    });
  },
);

toolTest(
  "geometry: VHDs from qemu-img (dynamic and fixed, force_size on and off) off the block and CHS grid",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      // 33562624 is 32 MiB rounded to CHS; + 512 fits neither the geometry nor a block.
      for (const size of [2 * MiB + 1, 3 * MiB + 4097, 33562624 + 512]) {
        await t.step(`${size} bytes`, async () => {
          const src = `${dir}/v${size}.raw`;
          await edgeDisk(src, size, 3);
          await Promise.all(
            ["dynamic", "fixed"].flatMap((sub) =>
              ["off", "on"].map(async (force) => {
                const what = `${size} bytes, ${sub}, force_size=${force}`;
                const img = `${dir}/${size}.${sub}.${force}.vhd`;
                const o = `subformat=${sub},force_size=${force}`;
                await qemu(["convert", "-f", "raw", "-O", "vpc", "-o", o, src, img]);
                const want = await Deno.readFile(await qemuRaw(img, "vpc", `${img}.want`));
                const [b1, b2] = [`${img}.1.raw`, `${img}.2.raw`];
                // A fixed VHD from a pipe needs -f vhd; from a file it is recognised.
                const flags = sub === "fixed" ? "-f vhd" : "";
                await sh(
                  `cat ${img} | ${DS} import ${b1} ${flags} && ${DS} import ${b2} -i ${img}`,
                );
                await assertBytes(b1, want, `${what}, from a pipe`);
                await assertBytes(b2, want, `${what}, with -i`);
                if (sub === "dynamic") await assertHeadersAgree(img, "vpc", what);
                else await assertCoversData(img, want, what);
                for (const p of [img, `${img}.want`, b1, b2]) await Deno.remove(p);
              })
            ),
          );
        });
      }
    });
  },
);

/**
 * For a fixed VHD, where qemu-img map calls every block data and `headers` leaves out
 * the holes of the file: the virtual size is qemu's, and every block left out reads
 * as zeros (`want`: qemu's raw reading).
 */
async function assertCoversData(image: string, want: Uint8Array, what: string) {
  const ours = JSON.parse(await ourAllocation(image));
  const q = JSON.parse(await qemu(["info", "-f", "vpc", "--output=json", image]));
  assert.equal(ours.virtual_size, q["virtual-size"], `${what}: virtual size`);
  const unit = 2 ** ours.cluster_bits;
  const listed = new Set<number>();
  for (const [a, b] of ours.data_clusters as [number, number][]) {
    for (let c = a; c <= b; c++) listed.add(c);
  }
  for (let c = 0; c * unit < want.length; c++) {
    if (!listed.has(c)) {
      assert.ok(want.subarray(c * unit, (c + 1) * unit).every((b) => b === 0), `${what}: ${c}`);
    }
  }
}

toolTest(
  "geometry: --diff against a base of another size, qcow2 and VHD, applied with --delta (pipe; qcow2 also -i)",
  QEMU,
  INSTALL,
  async (t) => {
    await withTempDir(async (dir) => {
      const pairs = [
        [513, 65535],
        [65537, 511],
        [2 * MiB - 1, 2 * MiB + 1],
        [3 * MiB + 4097, 2 * MiB + 1],
      ];
      for (const [baseSize, size] of pairs) {
        await t.step(`base ${baseSize} bytes, disk ${size} bytes`, async () => {
          const base = `${dir}/base.raw`;
          const baseBytes = await edgeDisk(base, baseSize, 4);
          // The disk: the base's bytes (cut or extended), one changed, and its own edges.
          const disk = padded(baseBytes, size);
          const own = await edgeDisk(`${dir}/own.raw`, size, 5);
          for (let i = 0; i < size; i += 97) disk[i] = own[i] || disk[i];
          disk[size >> 2] ^= 0x40;
          const src = `${dir}/disk.raw`;
          await Deno.writeFile(src, disk);
          await Promise.all(["qcow2", "vhd"].map(async (f) => {
            const what = `base ${baseSize}, disk ${size}, ${f}`;
            const diff = `${dir}/diff.${f}`;
            const [b1, b2] = [`${dir}/${f}.1.raw`, `${dir}/${f}.2.raw`];
            await Deno.copyFile(base, b1);
            await Deno.copyFile(base, b2);
            const flags = f === "vhd" ? "-f vhd --delta" : "--delta";
            await sh(
              `${DS} export ${src} -f ${f} --diff ${base} | tee ${diff} | ${DS} import ${b1} ${flags}` +
                (f === "qcow2"
                  ? ` && ${DS} import ${b2} ${flags} -i ${diff}`
                  : ` && cp ${b1} ${b2}`),
            );
            // Within the disk's sectors: the disk (its padding zeros); past them: the base.
            const end = sectors(size);
            const want = padded(disk, Math.max(end, baseSize));
            want.set(baseBytes.subarray(end), end);
            await assertBytes(b1, want, `${what}, from a pipe`);
            await assertBytes(b2, want, `${what}, with -i`);
            if (f === "qcow2") {
              // qemu agrees: the diff over the base reads as the disk.
              await qemu(["rebase", "-u", "-f", "qcow2", "-b", base, "-F", "raw", diff]);
              assert.ok(await imagesEqual(src, diff, "raw", "qcow2"), what);
            }
            for (const p of [diff, b1, b2]) await Deno.remove(p);
          }));
        });
      }
      // A chunked stream does not carry the size: a base of another size is refused.
      const r = await runCli([
        "export",
        `${dir}/disk.raw`,
        "-f",
        "chunked",
        "--diff",
        `${dir}/base.raw`,
      ]);
      assert.equal(r.code, 2, r.stderr); // a usage error: what to export instead is named
      assert.match(
        r.stderr,
        /^diskstream: the base \S+ holds 3149825 bytes and the disk 2097153: a chunked stream[^\n]*\n$/,
      );
    });
  },
);
