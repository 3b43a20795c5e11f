/**
 * When the environment fails mid-job: a destination that fills up in the last flush of
 * a wire-format import, an existing output on a full disk, stdout on /dev/full, an
 * output that is a file the export reads (a VHD parent, an allocation hint), signals
 * during `xva extract` and `import -f raw`, and a progress bar cut short on a terminal.
 * What signals_test.ts, durability_test.ts and safety_test.ts cover is not repeated.
 */
import assert from "node:assert/strict";
import {
  CLI,
  CLI_SH,
  concat,
  pseudoRandom,
  run,
  runCli,
  sha256File,
  toolTest,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { rootTest, withTmpfs } from "./device_helpers.ts";
import { CliChild, until } from "./cli_child.ts";
import { writeVhd } from "./vhd_fixtures.ts";
import { pathExists } from "../lib/io/same_file.ts";
import { DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC } from "../lib/vhd/constants.ts";
import { exportTar } from "../mod.ts";
import { tarHeader } from "../lib/xva/tar.ts";

/** One line on stderr, matching `re`. */
function assertOneLine(stderr: string, re: RegExp) {
  assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  assert.match(stderr.trimEnd(), re);
}

/** A 4 MiB disk of random data: it cannot fit a 1 MiB filesystem in any format. */
async function randomDisk(dir: string): Promise<string> {
  const src = `${dir}/disk.raw`;
  await Deno.writeFile(src, pseudoRandom(4 << 20, 31));
  return src;
}

rootTest(
  "failure paths: a full disk in a wire import's last flush removes the file it created",
  {},
  async () => {
    await withTempDir(async (dir) => {
      const src = await randomDisk(dir);
      for (const f of ["tar", "chunked"]) {
        assert.equal((await runCli(["export", src, "-f", f, "-o", `${dir}/disk.${f}`])).code, 0);
      }
      const full = `${dir}/full`;
      await Deno.mkdir(full);
      await withTmpfs(full, "1M", async () => {
        const dest = `${full}/dest.raw`;
        // Less than the 16 MiB an import queues before it writes: every write fails in
        // the destination's final flush.
        for (
          const args of [
            ["-f", "raw", "-i", src],
            ["-f", "tar", "-i", `${dir}/disk.tar`],
            ["-f", "chunked", "--size", String(4 << 20), "-i", `${dir}/disk.chunked`],
          ]
        ) {
          const r = await runCli(["import", dest, ...args]);
          assert.equal(r.code, 1, r.stderr);
          assertOneLine(
            r.stderr,
            /^diskstream: cannot write to \S*full\/dest\.raw: No space left on device \(ENOSPC\)$/,
          );
          assert.equal(await pathExists(dest), false, `${args}: ${dest} left behind`);
        }
        // An existing (sparse) file is kept and named with what was left in it.
        await writeSparse(dest, 4 << 20);
        const r = await runCli(["import", dest, "-f", "raw", "-i", src]);
        assert.equal(r.code, 1, r.stderr);
        assertOneLine(
          r.stderr,
          /\(ENOSPC\); \S*full\/dest\.raw \(an existing file\) is partly written from byte 0 on$/,
        );
        await Deno.remove(dest);
        // export -o over an existing file: truncated, so it says what it holds now.
        const out = `${full}/old.qcow2`;
        await Deno.writeTextFile(out, "old contents");
        const e = await runCli(["export", src, "-o", out]);
        assert.equal(e.code, 1, e.stderr);
        assertOneLine(
          e.stderr,
          /\(ENOSPC\); \S*full\/old\.qcow2 \(an existing file\) is partly written from byte 0 on: it holds an incomplete image$/,
        );
      });
    });
  },
);

Deno.test("failure paths: headers and info on a full stdout name ENOSPC", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/disk.raw`, 4 << 20, [[0, pseudoRandom(1 << 20, 2)]]);
    const image = `${dir}/disk.qcow2`;
    assert.equal((await runCli(["export", `${dir}/disk.raw`, "-o", image])).code, 0);
    for (const cmd of ["headers --legacy", "info --json"]) {
      const r = await run("bash", ["-c", `${CLI_SH} ${cmd} ${image} > /dev/full`]);
      assert.equal(r.code, 1, r.stderr);
      assertOneLine(
        r.stderr,
        /^diskstream: cannot write to stdout: No space left on device \(ENOSPC\)$/,
      );
    }
  });
});

Deno.test("failure paths: an output that is a file the export reads is refused before it is truncated", async () => {
  await withTempDir(async (dir) => {
    const size = 8 << 20;
    const parent = `${dir}/parent.vhd`;
    await writeVhd(parent, { diskType: DISK_TYPE_DYNAMIC, size, blocks: [0, 1, 2, 3] });
    await writeVhd(`${dir}/child.vhd`, {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [1],
      locators: [["W2ru", "./parent.vhd"]],
      parentName: "parent.vhd",
    });
    const raw = `${dir}/disk.raw`;
    await writeSparse(raw, size, [[0, pseudoRandom(1 << 20, 9)]]);
    const hint = `${dir}/hint.json`;
    await Deno.writeTextFile(
      hint,
      JSON.stringify({ virtual_size: size, cluster_bits: 21, data_clusters: [[0, 3]] }),
    );
    const kept = [parent, hint];
    const before = await Promise.all(kept.map(sha256File));
    const cases: [string[], RegExp][] = [
      // The source VHD's parent (this destroyed the parent, then failed).
      [
        ["vhd-tool", "stream", "--source", `${dir}/child.vhd`, "--source-format", "vhd"],
        /the output \S*parent\.vhd is the source's parent itself/,
      ],
      // The image a hybrid source takes its allocation from, and its parent.
      [
        ["vhd-tool", "stream", "--source", `${raw}:${dir}/child.vhd`, "--source-format", "hybrid"],
        /the output \S*parent\.vhd is the allocation hint itself/,
      ],
    ];
    for (const [args, re] of cases) {
      const r = await runCli([...args, "--destination-format", "vhd", "--destination", parent]);
      assert.equal(r.code, 2, r.stderr);
      assertOneLine(r.stderr, re);
    }
    for (const args of [["--allocation", hint], ["--diff", raw, "--base-allocation", hint]]) {
      const r = await runCli(["export", raw, ...args, "-o", hint]);
      assert.equal(r.code, 2, r.stderr);
      assertOneLine(r.stderr, /the output \S*hint\.json is the (base's )?allocation hint itself/);
    }
    assert.deepEqual(await Promise.all(kept.map(sha256File)), before);
  });
});

/** An XVA of one 8 MiB disk `Ref:5` whose every MiB holds data. */
async function xvaOfOneDisk(dir: string): Promise<Uint8Array> {
  const size = 8 << 20;
  await Deno.writeFile(`${dir}/vm.raw`, pseudoRandom(size, 12));
  const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
  const xml = new TextEncoder().encode(
    `<value><struct>${
      m(
        "objects",
        "<array><data>" +
          `<value><struct>${m("class", "VDI")}${m("id", "Ref:5")}` +
          `${
            m("snapshot", `<struct>${m("virtual_size", String(size))}</struct>`)
          }</struct></value>` +
          "</data></array>",
      )
    }</struct></value>`,
  );
  const parts = [tarHeader("ova.xml", xml.length), xml, new Uint8Array(512 - (xml.length % 512))];
  for await (const c of (await exportTar(`${dir}/vm.raw`, { prefix: "Ref:5" })).stream) {
    parts.push(c.slice());
  }
  return concat(parts);
}

Deno.test("failure paths: SIGTERM during xva extract from a silent pipe removes the disk files", async () => {
  await withTempDir(async (dir) => {
    const xva = await xvaOfOneDisk(dir);
    const out = `${dir}/out`;
    const child = new CliChild(["xva", "extract", "-", "-o", out]);
    await child.feed(xva.subarray(0, 3 << 20)); // ova.xml and some members; then silence
    await until(() => pathExists(`${out}/Ref_5.raw`), "the disk file to be created");
    const { code, stderr, ms } = await child.stop("SIGTERM");
    assert.equal(code, 128 + 15, stderr);
    assertOneLine(
      stderr,
      /^diskstream: extraction of stdin into \S*out interrupted by SIGTERM: \S*out\/Ref_5\.raw \(being written\) was removed$/,
    );
    assert.ok(ms < 5000, `stopped after ${ms} ms`);
    // A sparse file at the disk's full size would look complete: it must be gone.
    assert.equal(await pathExists(`${out}/Ref_5.raw`), false);
  });
});

Deno.test("failure paths: SIGINT during import -f raw says what was interrupted and removes DEST", async () => {
  await withTempDir(async (dir) => {
    const dest = `${dir}/new.raw`;
    const child = new CliChild(["import", dest, "-f", "raw", "--size", String(8 << 20)]);
    await child.feed(pseudoRandom(3 << 20, 4));
    await until(() => pathExists(dest), "the destination to be created");
    const { code, stderr } = await child.stop("SIGINT");
    assert.equal(code, 128 + 2, stderr);
    assertOneLine(
      stderr,
      /^diskstream: import into \S*new\.raw interrupted by SIGINT: \S*new\.raw \(created by this import\) was removed$/,
    );
    assert.equal(await pathExists(dest), false);
  });
});

toolTest(
  "failure paths: a progress bar cut short on a terminal ends its line before the error",
  [["script", "--version"]],
  "apt-get install -y bsdutils",
  async () => {
    await withTempDir(async (dir) => {
      const src = await randomDisk(dir);
      assert.equal((await runCli(["export", src, "-o", `${dir}/disk.qcow2`])).code, 0);
      // A stream cut in the middle of its data, imported under a terminal (script).
      const cmd = `head -c 2500000 ${dir}/disk.qcow2 | ${Deno.execPath()} run -A ${CLI} ` +
        `import ${dir}/copy.raw --progress`;
      const r = await run("script", ["-qec", cmd, "/dev/null"]);
      const text = new TextDecoder().decode(r.stdout);
      assert.equal(r.code, 1, text);
      assert.match(text, /import \[[#-]+\]/); // the bar was drawn
      assert.match(text, /\r?\ndiskstream: .*truncated/); // the error on a line of its own
      assert.doesNotMatch(text, /ETA [\d:]+diskstream/);
    });
  },
);
