/**
 * XVA files built at test time by tests/make_xva.py, which follows XAPI's stream_vdi
 * rules independently of diskstream (both checksum kinds, gaps, keep-alive members,
 * several disks in string order of their refs), listed and extracted; and XAPI's two
 * vhd-tool calls from compat.md run verbatim.
 */
import assert from "node:assert/strict";
import {
  CLI_SH,
  imagesEqual,
  pseudoRandom,
  qemu,
  qemuTest,
  run,
  runCli,
  sh,
  sha256File,
  toolTest,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { writeVhd } from "./vhd_fixtures.ts";
import { extractXvaFileAs } from "../lib/export/xva.ts";
import { DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC, PLATFORM_MACX } from "../lib/vhd/constants.ts";

const MiB = 1 << 20;
const PY = "/usr/bin/python3";
const MAKE_XVA = new URL("./make_xva.py", import.meta.url).pathname;
const NEEDS = [[PY, "-c", "import xxhash, tarfile"]];
const INSTALL = "apt-get install -y python3 python3-xxhash";
const DS = CLI_SH;

interface DiskSpec {
  ref: string;
  path: string;
  size: number;
  checksum: "xxhash" | "sha1";
  keepalive?: number[];
  name?: string;
}

/**
 * Three disks: Ref:10 (xxhash, keep-alives at 2 and 5, a short last member), Ref:9
 * (SHA-1, gaps), and Ref:4 (xxhash, one member); plus Ref:77, a VDI of ova.xml
 * without members. String order puts Ref:10 before Ref:4 and Ref:9.
 */
async function makeXva(dir: string): Promise<DiskSpec[]> {
  const disks: DiskSpec[] = [
    {
      ref: "Ref:10",
      path: `${dir}/a.raw`,
      size: 9 * MiB + 4096,
      checksum: "xxhash",
      keepalive: [2, 5],
      name: "root",
    },
    { ref: "Ref:9", path: `${dir}/b.raw`, size: 16 * MiB, checksum: "sha1", name: "data" },
    { ref: "Ref:4", path: `${dir}/c.raw`, size: 300 * 1024, checksum: "xxhash", name: "tiny" },
  ];
  await writeSparse(disks[0].path, disks[0].size, [
    [0, pseudoRandom(MiB, 1)],
    [3 * MiB + 5, pseudoRandom(2 * MiB, 2)], // chunks 3, 4, 5
    [8 * MiB, pseudoRandom(MiB + 4096, 3)], // chunks 8 and the short last one
  ]);
  await writeSparse(disks[1].path, disks[1].size, [
    [7 * MiB, pseudoRandom(100, 4)],
    [12 * MiB + 999, pseudoRandom(MiB, 5)],
  ]);
  await writeSparse(disks[2].path, disks[2].size, [[1000, pseudoRandom(5000, 6)]]);
  const spec = { vm: "web-01", disks, extra_vdis: [{ ref: "Ref:77", size: MiB, name: "cd" }] };
  await Deno.writeTextFile(`${dir}/spec.json`, JSON.stringify(spec));
  await sh(`${PY} ${MAKE_XVA} ${dir}/spec.json ${dir}/vm.xva`);
  return disks;
}

toolTest(
  "xva list: the VM, its disks and the members present, from a file and from a pipe",
  NEEDS,
  INSTALL,
  async () => {
    await withTempDir(async (dir) => {
      await makeXva(dir);
      const fromFile = await runCli(["xva", "list", `${dir}/vm.xva`, "--json"]);
      assert.equal(fromFile.code, 0, fromFile.stderr);
      const fromPipe = await runCli(["xva", "list", "-", "--json"], { stdinFile: `${dir}/vm.xva` });
      assert.equal(fromPipe.code, 0, fromPipe.stderr);
      assert.deepEqual(
        JSON.parse(new TextDecoder().decode(fromPipe.stdout)),
        JSON.parse(new TextDecoder().decode(fromFile.stdout)),
      );
      const l = JSON.parse(new TextDecoder().decode(fromFile.stdout));
      assert.equal(l.vms[0].name, "web-01");
      assert.equal(l.version.product_brand, "XCP-ng");
      const byRef = Object.fromEntries(l.disks.map((d: { ref: string }) => [d.ref, d]));
      assert.deepEqual(Object.keys(byRef), ["Ref:10", "Ref:4", "Ref:77", "Ref:9"]);
      // Ref:10: member 0, keep-alive 2 (then chunk 3 is member 4), keep-alive 5, chunks 4 and 5
      // as members 6 and 7, chunks 8 and 9 as members 10 and 11.
      assert.deepEqual(byRef["Ref:10"].present, [[0, 0], [2, 2], [4, 7], [10, 11]]);
      assert.equal(byRef["Ref:10"].virtualSize, 9 * MiB + 4096);
      assert.deepEqual(byRef["Ref:10"].checksums, ["xxhash"]);
      assert.deepEqual(byRef["Ref:9"].present, [[0, 0], [7, 7], [12, 13], [15, 15]]);
      assert.deepEqual(byRef["Ref:9"].checksums, ["sha1"]);
      assert.deepEqual(byRef["Ref:4"].present, [[0, 0]]);
      assert.equal(byRef["Ref:77"].members, 0);
      const human = await runCli(["xva", "list", `${dir}/vm.xva`]);
      assert.match(
        new TextDecoder().decode(human.stdout),
        /disk Ref:9 +uuid-1 +"data" +16777216 bytes/,
      );
    });
  },
);

toolTest(
  "xva extract: every disk of an XVA built by stream_vdi's rules, from a file and a pipe",
  NEEDS,
  INSTALL,
  async () => {
    await withTempDir(async (dir) => {
      const disks = await makeXva(dir);
      const r = await runCli(["xva", "extract", `${dir}/vm.xva`, "-o", `${dir}/out`]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /Ref:9 → .*Ref_9\.raw .*checksums verified: 5 sha1/);
      assert.match(r.stderr, /Ref:77: no member in this XVA/);
      for (const d of disks) {
        const out = `${dir}/out/${d.ref.replace(":", "_")}.raw`;
        assert.equal(await sha256File(out), await sha256File(d.path), d.ref);
      }
      // From a pipe, one disk only.
      await sh(`cat ${dir}/vm.xva | ${DS} xva extract - -o ${dir}/one --disk Ref:10`);
      assert.deepEqual([...Deno.readDirSync(`${dir}/one`)].map((e) => e.name), ["Ref_10.raw"]);
      assert.equal(await sha256File(`${dir}/one/Ref_10.raw`), await sha256File(disks[0].path));
      // An existing output is never overwritten; an unknown disk is named.
      let e = await runCli([
        "xva",
        "extract",
        `${dir}/vm.xva`,
        "-o",
        `${dir}/one`,
        "--disk",
        "Ref:10",
      ]);
      assert.equal(e.code, 2);
      assert.match(e.stderr, /Ref_10\.raw exists already/);
      e = await runCli(["xva", "extract", `${dir}/vm.xva`, "-o", `${dir}/two`, "--disk", "Ref:5"]);
      assert.equal(e.code, 2);
      assert.match(
        e.stderr,
        /--disk Ref:5: ova.xml names no such disk \(its disks: Ref:10, Ref:4, Ref:77, Ref:9\)/,
      );
    });
  },
);

toolTest(
  "xva extract -f qcow2|vhd from a file: each disk streamed from its members in place",
  NEEDS,
  INSTALL,
  async () => {
    await withTempDir(async (dir) => {
      const disks = await makeXva(dir);
      for (const [format, qemuFormat] of [["qcow2", "qcow2"], ["vhd", "vpc"]]) {
        const r = await runCli([
          "xva",
          "extract",
          `${dir}/vm.xva`,
          "-o",
          `${dir}/${format}`,
          "-f",
          format,
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.match(r.stderr, /checksums verified: 5 sha1/);
        for (const d of disks) {
          const out = `${dir}/${format}/${d.ref.replace(":", "_")}.${format}`;
          assert.ok(await imagesEqual(d.path, out, "raw", qemuFormat), `${format} ${d.ref}`);
        }
      }
      // Progress: the file's bytes (verified), then each disk's (exported), never past
      // the total nor backwards, ending at the total.
      const seen: number[] = [];
      let total = 0;
      await extractXvaFileAs(`${dir}/vm.xva`, `${dir}/progress`, "qcow2", {
        progress: { setTotal: (t) => total = t, update: (d) => seen.push(d), finish() {} },
      });
      const fileSize = (await Deno.stat(`${dir}/vm.xva`)).size;
      assert.equal(total, fileSize + disks.reduce((t, d) => t + d.size, 0));
      assert.ok(seen.some((d) => d > 0 && d <= fileSize), "the verifying pass is reported");
      assert.ok(seen.every((d, i) => d <= total && (i === 0 || d >= seen[i - 1])), `${seen}`);
      assert.equal(seen.at(-1), total);
      const piped = await runCli(["xva", "extract", "-", "-o", `${dir}/p`, "-f", "qcow2"], {
        stdinFile: `${dir}/vm.xva`,
      });
      assert.equal(piped.code, 1);
      assert.match(piped.stderr, /needs the XVA as a file/);
    });
  },
);

toolTest("xva extract refuses a corrupted member, naming it", NEEDS, INSTALL, async () => {
  await withTempDir(async (dir) => {
    await makeXva(dir);
    // Corrupt a byte inside the data of Ref:9's member 00000007 (found with Python's tarfile).
    const at = Number(
      await sh(
        `${PY} -c 'import tarfile,sys; t=tarfile.open(sys.argv[1]); ` +
          `print(t.getmember("Ref:9/00000007").offset_data + 10)' ${dir}/vm.xva`,
      ),
    );
    await sh(`printf 'Z' | dd of=${dir}/vm.xva bs=1 seek=${at} conv=notrunc status=none`);
    const r = await runCli(["xva", "extract", `${dir}/vm.xva`, "-o", `${dir}/out`]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^diskstream: checksum mismatch in member Ref:9\/00000007: its \.checksum member says [0-9a-f]{40}, the data hashes to [0-9a-f]{40}/,
    );
    await assert.rejects(Deno.stat(`${dir}/out/Ref_9.raw`)); // removed
  });
});

qemuTest(
  "XAPI's vhd-tool calls run verbatim (compat.md): stream of a hybrid source, serve of every protocol",
  async () => {
    await withTempDir(async (dir) => {
      const size = 20 * MiB;
      await writeSparse(`${dir}/dev.raw`, size, [[0, pseudoRandom(MiB, 7)], [
        13 * MiB,
        pseudoRandom(3 * MiB, 8),
      ]]);
      await qemu([
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        `${dir}/dev.raw`,
        `${dir}/leaf.vhd`,
      ]);
      const call = (s: string) => sh(`cd ${dir} && ${s.replace(/^vhd-tool /, `${DS} vhd-tool `)}`);
      // export: vhd-tool stream … --destination-fd FD (progress on stdout)
      for (const fmt of ["raw", "vhd"]) {
        const progress = await call(
          `vhd-tool stream --source-protocol none --source-format hybrid --source dev.raw:leaf.vhd ` +
            `--destination-protocol none --destination-format ${fmt} --destination-fd 3 ` +
            `--tar-filename-prefix '' --progress --machine --direct --path /dev/mapper:. 3>out.${fmt}`,
        );
        assert.match(progress, /^000(\d{3})*100$/);
        assert.ok(
          await imagesEqual(
            `${dir}/dev.raw`,
            `${dir}/out.${fmt}`,
            "raw",
            fmt === "vhd" ? "vpc" : "raw",
          ),
        );
      }
      await call(
        "vhd-tool stream --source-protocol none --source-format raw --source dev.raw " +
          "--destination-protocol none --destination-format raw --destination-fd 3 " +
          "--tar-filename-prefix '' --progress --machine --direct --path /dev/mapper:. 3>plain.raw",
      );
      assert.equal(await sha256File(`${dir}/plain.raw`), await sha256File(`${dir}/dev.raw`));
      // import: vhd-tool serve … --source-fd FD, for each protocol.
      await sh(
        `cd ${dir} && ${DS} export dev.raw -f chunked > dev.chunked && ${DS} export dev.raw -f tar --checksum sha1 --tar-prefix '' > dev.tar`,
      );
      const serves: [string, string, string][] = [
        ["raw", "none", "dev.raw"],
        ["vhd", "none", "out.vhd"],
        ["raw", "chunked", "dev.chunked"],
        ["raw", "tar", "dev.tar"],
      ];
      for (const [format, protocol, input] of serves) {
        const dest = `${dir}/served-${protocol}-${format}.raw`;
        await writeSparse(dest, size); // XAPI's VDI exists with its size
        const progress = await call(
          `vhd-tool serve --source-format ${format} --source-protocol ${protocol} --source-fd 4 ` +
            `--tar-filename-prefix '' --destination file://${dest} --destination-format raw ` +
            `--progress --machine --direct --destination-size ${size} --prezeroed 4<${input}`,
        );
        assert.match(progress, /100$/, `${format}/${protocol}`);
        assert.equal(
          await sha256File(dest),
          await sha256File(`${dir}/dev.raw`),
          `${format}/${protocol}`,
        );
      }
      // vhd-tool's chunked stream sets every byte unless --prezeroed: it overwrites a dirty disk.
      const chunked = (prezeroed: string) =>
        call(
          `vhd-tool stream --source-protocol none --source-format raw --source dev.raw ` +
            `--destination-protocol chunked --destination-format raw --destination-fd 3 ${prezeroed} 3>c.chunked`,
        );
      await chunked("--prezeroed");
      const sparse = (await Deno.stat(`${dir}/c.chunked`)).size;
      await chunked("");
      assert.equal((await Deno.stat(`${dir}/c.chunked`)).size, size + 5 * 12); // 2 data, 2 zero pieces, end
      assert.ok(sparse < 5 * MiB);
      await Deno.writeFile(`${dir}/dirty.raw`, new Uint8Array(size).fill(0xee));
      await call(
        `vhd-tool serve --source-format raw --source-protocol chunked --source-fd 4 ` +
          `--destination file://${dir}/dirty.raw --destination-format raw 4<c.chunked`,
      );
      assert.equal(await sha256File(`${dir}/dirty.raw`), await sha256File(`${dir}/dev.raw`));
      // Flags vhd-tool has and diskstream cannot honour are refused by name.
      for (
        const [flags, want] of [
          ["--source dev.raw --good-ciphersuites x", /--good-ciphersuites is not supported/],
          ["--source dev.raw --verify-dest", /--verify-dest is not supported/],
          [
            "--source dev.raw --destination tcp://127.0.0.1:9/",
            /tcp: destinations are not supported/,
          ],
          [
            "--source dev.raw --destination-protocol nbd",
            /--destination-protocol nbd is not supported yet/,
          ],
        ] as const
      ) {
        const r = await run("bash", ["-c", `cd ${dir} && ${DS} vhd-tool stream ${flags}`]);
        assert.equal(r.code, 2, flags); // bad usage, as an unknown flag
        assert.match(r.stderr, want);
      }
    });
  },
);

qemuTest("vhd-tool stream --relative-to and --source-format vhd over a VHD chain", async () => {
  await withTempDir(async (dir) => {
    const size = 16 * MiB;
    const block = (b: number) => pseudoRandom(2 * MiB, b + 100); // writeVhd's block data
    // The parent lives elsewhere (as LVs in /dev/mapper on a host): found through --path.
    await Deno.mkdir(`${dir}/mapper`);
    await writeVhd(`${dir}/mapper/base.vhd`, {
      diskType: DISK_TYPE_DYNAMIC,
      size,
      blocks: [0, 1, 6],
    });
    await writeVhd(`${dir}/leaf.vhd`, {
      diskType: DISK_TYPE_DIFFERENCING,
      size,
      blocks: [1, 5],
      locators: [[PLATFORM_MACX, "./base.vhd"]],
    });
    // The device shows the leaf's view; the base copy is the base's.
    await writeSparse(`${dir}/dev.raw`, size, [0, 1, 5, 6].map((b) => [b * 2 * MiB, block(b)]));
    await writeSparse(`${dir}/copy.raw`, size, [0, 1, 6].map((b) => [b * 2 * MiB, block(b + 50)]));
    await sh(
      `cd ${dir} && ${DS} vhd-tool stream --source-protocol none --source-format hybrid ` +
        `--source dev.raw:leaf.vhd --destination-protocol chunked --destination-format raw ` +
        `--destination-fd 3 --tar-filename-prefix '' --progress --machine --direct ` +
        `--path ${dir}/mapper:. --relative-to mapper/base.vhd 3>diff.chunked >/dev/null`,
    );
    // Blocks 1 and 5 (the leaf's), each a run of its own: two pieces and the end.
    assert.equal((await Deno.stat(`${dir}/diff.chunked`)).size, 2 * (12 + 2 * MiB) + 12);
    await sh(`cd ${dir} && ${DS} import copy.raw -f chunked < diff.chunked`);
    const copy = await Deno.readFile(`${dir}/copy.raw`);
    assert.deepEqual(copy.subarray(2 * MiB, 4 * MiB), block(1));
    assert.deepEqual(copy.subarray(10 * MiB, 12 * MiB), block(5));
    assert.deepEqual(copy.subarray(0, 2 * MiB), block(50)); // unchanged since the base: untouched
    // --source-format vhd: the chain itself is the disk; sector bitmaps are honoured
    // (sector 0 of leaf block 5 cleared: it reads from the base, which has no block 5).
    const leaf = await Deno.open(`${dir}/leaf.vhd`, { read: true, write: true });
    const entry = new Uint8Array(4);
    await leaf.seek(1536 + 5 * 4, Deno.SeekMode.Start);
    await leaf.read(entry);
    await leaf.seek(new DataView(entry.buffer).getUint32(0) * 512, Deno.SeekMode.Start);
    await leaf.write(new Uint8Array([0x7f]));
    leaf.close();
    const view = await Deno.readFile(`${dir}/dev.raw`);
    view.fill(0, 10 * MiB, 10 * MiB + 512);
    await Deno.writeFile(`${dir}/view.raw`, view);
    for (const fmt of ["raw", "vhd"]) {
      await sh(
        `cd ${dir} && ${DS} vhd-tool stream --source-protocol none --source-format vhd ` +
          `--source leaf.vhd --destination-protocol none --destination-format ${fmt} ` +
          `--destination-fd 3 --path mapper 3>chain.${fmt}`,
      );
    }
    assert.equal(await sha256File(`${dir}/chain.raw`), await sha256File(`${dir}/view.raw`));
    const vhdOut = await sh(`cd ${dir} && qemu-img compare -f raw -F vpc view.raw chain.vhd`);
    assert.match(vhdOut, /identical/);
    const r = await run("bash", [
      "-c",
      `cd ${dir} && ${DS} vhd-tool stream --source-format hybrid --source dev.raw:leaf.vhd ` +
      `--path mapper --relative-to dev.raw --destination-format vhd --destination null:`,
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /dev\.raw is not in the parent chain of leaf\.vhd/);
    // Without --path the parent is not found, and that is said.
    const lost = await run("bash", [
      "-c",
      `cd ${dir} && ${DS} vhd-tool stream --source-format hybrid --source dev.raw:leaf.vhd ` +
      `--relative-to mapper/base.vhd --destination-format vhd --destination null:`,
    ]);
    assert.equal(lost.code, 1);
    assert.match(lost.stderr, /base\.vhd/);
  });
});

Deno.test("vhd-tool refuses descriptors this process did not inherit (fd://N, --source-fd N)", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/d.raw`, MiB);
    for (
      const args of [
        ["stream", "--source", `${dir}/d.raw`, "--destination", "fd://77"],
        ["stream", "--source", `${dir}/d.raw`, "--destination-fd", "77"],
        [
          "serve",
          "--source-protocol",
          "tar",
          "--source-fd",
          "78",
          "--destination",
          `file://${dir}/o`,
        ],
        [
          "serve",
          "--source-protocol",
          "tar",
          "--source",
          "fd://78",
          "--destination",
          `file://${dir}/o`,
        ],
      ]
    ) {
      const r = await runCli(["vhd-tool", ...args]);
      assert.equal(r.code, 2, args.join(" "));
      assert.match(r.stderr, /descriptor 7[78] is not open/);
    }
  });
});

Deno.test("xva extract of a missing file names it, whatever the output format", async () => {
  await withTempDir(async (dir) => {
    for (const format of ["raw", "qcow2", "vhd"]) {
      const r = await runCli([
        "xva",
        "extract",
        `${dir}/none.xva`,
        "-o",
        `${dir}/out`,
        "-f",
        format,
      ]);
      assert.equal(r.code, 1, format);
      assert.equal(
        r.stderr,
        `diskstream: cannot open ${dir}/none.xva: no such file or directory\n`,
      );
      await assert.rejects(Deno.stat(`${dir}/out`)); // nothing made
    }
  });
});

Deno.test("vhd-tool read_headers takes vhd-tool's common options and refuses stream/serve's by name", async () => {
  await withTempDir(async (dir) => {
    await writeVhd(`${dir}/d.vhd`, { diskType: DISK_TYPE_DYNAMIC, size: 8 * MiB, blocks: [1] });
    const want = '{"virtual_size":8388608,"cluster_bits":21,"data_clusters":[1]}';
    for (const extra of [[], ["-v", "--direct", "--unbuffered", "--path", `.:${dir}`, "--debug"]]) {
      const r = await runCli(["vhd-tool", "read_headers", `${dir}/d.vhd`, ...extra]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(new TextDecoder().decode(r.stdout), want);
    }
    // vhd-tool itself does not know these on read_headers: never accepted and ignored.
    for (const flag of ["--prezeroed", "--progress", "--machine", "--tar-filename-prefix=x"]) {
      const r = await runCli(["vhd-tool", "read_headers_interval", `${dir}/d.vhd`, flag]);
      assert.equal(r.code, 2, flag);
      assert.match(r.stderr, new RegExp(`unknown option '${flag.replace(/=.*/, "")}`));
      assert.equal(r.stdout.length, 0);
    }
  });
});
