/**
 * `vhd-tool stream --source-format vhd|hybrid` and `read_headers` over hostile VHD chains:
 * parents of another block size or a smaller size read exactly what the chain means,
 * a FIFO or character device where an image goes is refused at once (opening a FIFO
 * used to wait forever, deaf to SIGTERM), the parent next to the child wins over a
 * same-named file in a --path folder (vhd-tool's order), and read_headers honours
 * --path as stream does.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { VhdChainSource } from "../lib/headers/vhd_source.ts";
import { DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC, PLATFORM_MACX } from "../lib/vhd/constants.ts";
import { buildVhdFooter } from "../lib/vhd/footer.ts";
import { runMeasured } from "../tasks/fuzz_run.ts";
import {
  CLI,
  CLI_SH,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  sha256,
  sha256File,
  withTempDir,
} from "./helpers.ts";
import { assertOneLineError } from "./import_fixtures.ts";
import { writeVhd } from "./vhd_fixtures.ts";

const MiB = 1024 * 1024;
const KiB = 1024;

async function streamRaw(dir: string, source: string, ...more: string[]) {
  const out = join(dir, "out.raw");
  const r = await runCli([
    "vhd-tool",
    "stream",
    "--source-format",
    "vhd",
    "--source",
    source,
    "--destination-format",
    "raw",
    "--destination",
    out,
    ...more,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return await sha256File(out);
}

Deno.test("vhd-tool stream --source-format vhd: a parent with smaller blocks than its child", async () => {
  await withTempDir(async (dir) => {
    const size = 8 * MiB;
    const pblocks = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15]; // 512 KiB each
    await writeVhd(join(dir, "p.vhd"), {
      diskType: DISK_TYPE_DYNAMIC,
      size,
      blocks: pblocks,
      blockSize: 512 * KiB,
    });
    await writeVhd(join(dir, "c.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [2],
      locators: [[PLATFORM_MACX, "./p.vhd"]],
    });
    const want = new Uint8Array(size);
    for (const b of pblocks) want.set(pseudoRandom(512 * KiB, b + 100), b * 512 * KiB);
    want.set(pseudoRandom(2 * MiB, 102), 4 * MiB);
    assert.equal(await streamRaw(dir, join(dir, "c.vhd")), sha256(want));
  });
});

Deno.test("vhd-tool stream --source-format vhd: parents smaller than the child read as zeros past their end", async () => {
  await withTempDir(async (dir) => {
    const size = 8 * MiB;
    // A fixed parent of 3 MiB + 512: the footer right after its data is not disk data.
    const fixed = pseudoRandom(3 * MiB + 512, 7);
    await Deno.writeFile(
      join(dir, "fixed.vhd"),
      new Uint8Array([...fixed, ...buildVhdFooter({ diskType: 2, currentSize: fixed.length })]),
    );
    await writeVhd(join(dir, "over-fixed.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [3],
      locators: [[PLATFORM_MACX, "./fixed.vhd"]],
    });
    const want = new Uint8Array(size);
    want.set(fixed);
    want.set(pseudoRandom(2 * MiB, 103), 6 * MiB);
    assert.equal(await streamRaw(dir, join(dir, "over-fixed.vhd")), sha256(want));

    // A dynamic parent of 3 MiB whose last 2 MiB block is allocated in full.
    await writeVhd(join(dir, "small.vhd"), {
      diskType: DISK_TYPE_DYNAMIC,
      size: 3 * MiB,
      blocks: [0, 1],
    });
    await writeVhd(join(dir, "over-small.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [],
      locators: [[PLATFORM_MACX, "./small.vhd"]],
    });
    want.fill(0);
    want.set(pseudoRandom(2 * MiB, 100));
    want.set(pseudoRandom(2 * MiB, 101).subarray(0, MiB), 2 * MiB);
    assert.equal(await streamRaw(dir, join(dir, "over-small.vhd")), sha256(want));
  });
});

Deno.test("VhdChainSource: a second close (an export that failed) does nothing", async () => {
  await withTempDir(async (dir) => {
    await writeVhd(join(dir, "d.vhd"), { diskType: DISK_TYPE_DYNAMIC, size: 2 * MiB, blocks: [0] });
    const src = await VhdChainSource.open(join(dir, "d.vhd"));
    src.close();
    src.close();
  });
});

Deno.test("a FIFO or character device where a VHD goes is refused at once, in one line", async () => {
  await withTempDir(async (dir) => {
    const fifo = join(dir, "pipe.vhd");
    await run("mkfifo", [fifo]);
    await Deno.writeFile(join(dir, "dev.raw"), new Uint8Array(2 * MiB));
    const vhdTool = ["vhd-tool", "stream", "--destination", "null:", "--destination-format", "vhd"];
    const cases: [string[], RegExp][] = [
      [[...vhdTool, "--source-format", "vhd", "--source", fifo], /pipe\.vhd: it is a FIFO/],
      [
        [...vhdTool, "--source-format", "hybrid", "--source", `${dir}/dev.raw:${fifo}`],
        /pipe\.vhd: it is a FIFO/,
      ],
      [["headers", fifo], /it is a FIFO/],
      [[...vhdTool, "--source-format", "vhd", "--source", "/dev/zero"], /character device/],
    ];
    for (const [args, want] of cases) {
      const r = await runMeasured(Deno.execPath(), ["run", "-A", CLI, ...args], {
        timeLimitMs: 30_000,
      });
      assert.equal(r.killed, undefined, `${args.join(" ")}: ${r.killed}`);
      assertOneLineError({ code: r.code, stdout: new Uint8Array(), stderr: r.stderr }, want);
    }
  });
});

Deno.test("the parent next to the child wins over a same-named file in a --path folder", async () => {
  await withTempDir(async (dir) => {
    const size = 4 * MiB;
    await Deno.mkdir(join(dir, "sr"));
    await writeVhd(join(dir, "sr", "p.vhd"), { diskType: DISK_TYPE_DYNAMIC, size, blocks: [0] });
    // A decoy of the same name in the working directory ('.', the default --path).
    await writeVhd(join(dir, "p.vhd"), { diskType: DISK_TYPE_DYNAMIC, size, blocks: [1] });
    await writeVhd(join(dir, "sr", "c.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [],
      locators: [[PLATFORM_MACX, "./p.vhd"]],
    });
    const want = new Uint8Array(size);
    want.set(pseudoRandom(2 * MiB, 100));
    for (const path of ["", "--path . "]) {
      const r = await run("bash", [
        "-c",
        `cd ${dir} && ${CLI_SH} vhd-tool stream --source-format vhd --source sr/c.vhd ` +
        `${path}--destination-format raw --destination out.raw && ` +
        `${CLI_SH} vhd-tool read_headers_interval ${path}sr/c.vhd`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await sha256File(join(dir, "out.raw")), sha256(want));
      assert.equal(
        new TextDecoder().decode(r.stdout),
        `{"virtual_size":${size},"cluster_bits":21,"data_clusters":[[0,0]]}`,
      );
    }
  });
});

Deno.test("vhd-tool read_headers and read_headers_interval look parents up in --path", async () => {
  await withTempDir(async (dir) => {
    const size = 4 * MiB;
    await Deno.mkdir(join(dir, "mapper"));
    await writeVhd(join(dir, "mapper", "base.vhd"), {
      diskType: DISK_TYPE_DYNAMIC,
      size,
      blocks: [1],
    });
    await writeVhd(join(dir, "leaf.vhd"), {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [0],
      locators: [[PLATFORM_MACX, "./base.vhd"]],
    });
    for (const cmd of ["read_headers", "read_headers_interval"]) {
      const r = await runCli([
        "vhd-tool",
        cmd,
        "--path",
        join(dir, "mapper"),
        join(dir, "leaf.vhd"),
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(
        new TextDecoder().decode(r.stdout),
        `{"virtual_size":${size},"cluster_bits":21,"data_clusters":${
          cmd === "read_headers" ? "[0,1]" : "[[0,1]]"
        }}`,
      );
    }
  });
});

qemuTest(
  "vhd-tool stream --relative-to: a base that does not exist says so; one outside the chain is named",
  async () => {
    await withTempDir(async (dir) => {
      await qemu(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic", `${dir}/c.vhd`, "8M"]);
      await Deno.copyFile(`${dir}/c.vhd`, `${dir}/other.vhd`);
      const stream = (base: string) =>
        runCli([
          "vhd-tool",
          "stream",
          "--source-protocol",
          "none",
          "--source-format",
          "vhd",
          "--source",
          `${dir}/c.vhd`,
          "--relative-to",
          base,
          "--destination-format",
          "vhd",
          "--destination-protocol",
          "none",
          "--destination",
          "null:",
        ]);
      assertOneLineError(
        await stream(`${dir}/nope.vhd`),
        /cannot read the base image .*nope\.vhd: no such file or directory/,
      );
      assertOneLineError(await stream(`${dir}/other.vhd`), /other\.vhd is not in the parent chain/);
    });
  },
);
