/**
 * XAPI's wire formats end to end through the command line: export -f raw|chunked|tar,
 * import -f raw|chunked|tar, members and checksums checked with independent tools
 * (Python's tarfile, xxhsum, sha1sum), chunked diffs, and corrupted streams.
 */
import assert from "node:assert/strict";
import { ClusterSet, exportTar } from "../mod.ts";
import { type DiskSource, openDiskSource } from "../lib/io/disk_source.ts";
import { loadThreadedXxh64, loadXxh64 } from "../lib/xva/checksum.ts";
import {
  CLI_SH,
  IN_CI,
  pseudoRandom,
  runCli,
  sh,
  sha256,
  sha256File,
  toolTest,
  withTempDir,
  writeSparse,
} from "./helpers.ts";

const MiB = 1 << 20;
const PY = "/usr/bin/python3";
const TOOLS = [[PY, "-c", "import tarfile"], ["xxhsum", "--version"], ["sha1sum", "--version"]];
const INSTALL = "apt-get install -y python3 xxhash coreutils";

/** A 12.5 MiB disk: data in chunks 0, 3, 4 (partly), 9 and the short last one; zeros elsewhere. */
async function makeDisk(path: string, size = 12 * MiB + MiB / 2): Promise<void> {
  await writeSparse(path, size, [
    [0, pseudoRandom(4096, 1)],
    [3 * MiB, pseudoRandom(MiB + 700, 2)],
    [9 * MiB + 12345, pseudoRandom(100, 3)],
    [size - 1000, pseudoRandom(1000, 4)],
  ]);
}

const DS = CLI_SH;

toolTest(
  "export -f tar: members, names and checksums as Python's tarfile, xxhsum and sha1sum read them",
  TOOLS,
  INSTALL,
  async () => {
    await withTempDir(async (dir) => {
      await makeDisk(`${dir}/d.raw`);
      for (
        const [kind, ext, tool] of [["xxhash", "xxhash", "xxhsum -H1"], [
          "sha1",
          "checksum",
          "sha1sum",
        ]]
      ) {
        const tar = `${dir}/${kind}.tar`;
        await sh(
          `${DS} export ${dir}/d.raw -f tar --checksum ${kind} --tar-prefix Ref:42 > ${tar}`,
        );
        const listing = await sh(
          `${PY} -c 'import tarfile,sys; t=tarfile.open(sys.argv[1]); ` +
            `print("\\n".join("%s %d %o" % (m.name, m.size, m.mode) for m in t.getmembers()))' ${tar}`,
        );
        const lines = listing.trim().split("\n");
        const expected = [0, 3, 4, 9, 12].flatMap((n) => {
          const name = `Ref:42/${String(n).padStart(8, "0")}`;
          const size = n === 12 ? MiB / 2 : MiB;
          return [`${name} ${size} 400`, `${name}.${ext} ${kind === "xxhash" ? 16 : 40} 400`];
        });
        assert.deepEqual(lines, expected);
        // Every checksum member holds what the independent tool computes for its member.
        await sh(`mkdir -p ${dir}/x-${kind} && tar -xf ${tar} -C ${dir}/x-${kind}`);
        for (const n of [0, 3, 4, 9, 12]) {
          const member = `${dir}/x-${kind}/Ref:42/${String(n).padStart(8, "0")}`;
          const want = (await sh(`${tool} '${member}'`)).split(/\s/)[0];
          const have = await Deno.readTextFile(`${member}.${ext}`);
          assert.equal(have, kind === "xxhash" ? want.toUpperCase() : want);
        }
        // The members put together at their offsets are the disk.
        const joined = `${dir}/joined-${kind}.raw`;
        await writeSparse(joined, 12 * MiB + MiB / 2);
        for (const n of [0, 3, 4, 9, 12]) {
          const member = `${dir}/x-${kind}/Ref:42/${String(n).padStart(8, "0")}`;
          await sh(`dd if='${member}' of=${joined} bs=1M seek=${n} conv=notrunc status=none`);
        }
        assert.equal(await sha256File(joined), await sha256File(`${dir}/d.raw`));
      }
    });
  },
);

Deno.test("every wire format round-trips through a pipe", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    const want = await sha256File(`${dir}/d.raw`);
    const cases = [
      ["raw", "", ""],
      ["chunked", "", "--size 12800K"],
      ["tar", "", ""],
      ["tar", "--checksum sha1 --tar-prefix vdi", "--tar-prefix vdi"],
    ];
    for (const [i, [format, exportFlags, importFlags]] of cases.entries()) {
      const out = `${dir}/copy${i}.raw`;
      await sh(
        `${DS} export ${dir}/d.raw -f ${format} ${exportFlags} | ${DS} import ${out} -f ${format} ${importFlags}`,
      );
      assert.equal(await sha256File(out), want, `${format} ${exportFlags}`);
    }
  });
});

Deno.test("a chunked diff applies onto a copy of its base", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/base.raw`);
    await sh(`cp ${dir}/base.raw ${dir}/new.raw && cp ${dir}/base.raw ${dir}/copy.raw`);
    // Change 10 bytes, zero a data cluster, add data in a hole.
    await sh(
      `printf 'changed!!!' | dd of=${dir}/new.raw bs=1 seek=5000000 conv=notrunc status=none`,
    );
    await sh(`dd if=/dev/zero of=${dir}/new.raw bs=64K seek=48 count=1 conv=notrunc status=none`);
    await sh(`printf 'new' | dd of=${dir}/new.raw bs=1 seek=7340032 conv=notrunc status=none`);
    const size = await sh(
      `${DS} export ${dir}/new.raw --diff ${dir}/base.raw -f chunked | tee ${dir}/diff | wc -c`,
    );
    assert.equal(Number(size), 3 * (65536 + 12) + 12); // three changed clusters and the end
    await sh(`${DS} import ${dir}/copy.raw -f chunked < ${dir}/diff`);
    assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/new.raw`));
  });
});

Deno.test("export -f tar with a hint reads only the hinted chunks, keeping the first and the last", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    // The hint lists chunk 3 only: chunk 9 (data) is left out, 0 and 12 are kept.
    const hint = JSON.stringify({
      virtual_size: 12 * MiB + MiB / 2,
      cluster_bits: 20,
      data_clusters: [[3, 3]],
    });
    await Deno.writeTextFile(`${dir}/hint.json`, hint);
    await sh(`${DS} export ${dir}/d.raw -f tar --allocation ${dir}/hint.json > ${dir}/d.tar`);
    const r = await runCli(["xva", "list", `${dir}/d.tar`]);
    assert.equal(r.code, 1); // not an XVA: no ova.xml
    assert.match(r.stderr, /first member should be ova.xml, found "Ref:0\/00000000"/);
    const names = await sh(`tar -tf ${dir}/d.tar | grep -v xxhash`);
    assert.deepEqual(names.trim().split("\n"), [
      "Ref:0/00000000",
      "Ref:0/00000003",
      "Ref:0/00000012",
    ]);
  });
});

Deno.test("import -f tar refuses a corrupted member, naming it; --ignore-checksums imports it", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    await sh(`${DS} export ${dir}/d.raw -f tar > ${dir}/d.tar`);
    // Member 3's data starts after member 0 (512 + 1 MiB + 1024 bytes) and its own header.
    const at = (512 + MiB + 1024) + 512 + 100;
    await sh(`printf 'X' | dd of=${dir}/d.tar bs=1 seek=${at} conv=notrunc status=none`);
    const r = await runCli(["import", `${dir}/out.raw`, "-f", "tar", "-i", `${dir}/d.tar`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: checksum mismatch in member Ref:0\/00000003: /);
    assert.equal(r.stderr.trim().split("\n").length, 1);
    await assert.rejects(Deno.stat(`${dir}/out.raw`)); // the new file was removed
    const ok = await runCli([
      "import",
      `${dir}/out.raw`,
      "-f",
      "tar",
      "--ignore-checksums",
      "-i",
      `${dir}/d.tar`,
    ]);
    assert.equal(ok.code, 0, ok.stderr);
  });
});

Deno.test("import -f tar and -f chunked refuse cut and disordered streams", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    await sh(`${DS} export ${dir}/d.raw -f tar > ${dir}/d.tar`);
    await sh(`head -c 3000000 ${dir}/d.tar > ${dir}/cut.tar`);
    let r = await runCli(["import", `${dir}/o1.raw`, "-f", "tar", "-i", `${dir}/cut.tar`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /ended inside member Ref:0\/00000004 \(\d+ of its 1048576 bytes\)/);
    r = await runCli([
      "import",
      `${dir}/o2.raw`,
      "-f",
      "tar",
      "--size",
      "20M",
      "-i",
      `${dir}/d.tar`,
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /ended after 13107200 of the disk's 20971520 bytes/);
    r = await runCli([
      "import",
      `${dir}/o3.raw`,
      "-f",
      "tar",
      "--tar-prefix",
      "Ref:1",
      "-i",
      `${dir}/d.tar`,
    ]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /expected a disk member named Ref:1\/00000000 or later, found "Ref:0\/00000000"/,
    );
    // Two copies of member 0: the numbers do not increase.
    await sh(
      `head -c ${
        512 + MiB + 1024
      } ${dir}/d.tar > ${dir}/twice.tar && cat ${dir}/d.tar >> ${dir}/twice.tar`,
    );
    r = await runCli(["import", `${dir}/o4.raw`, "-f", "tar", "-i", `${dir}/twice.tar`]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /member Ref:0\/00000000 comes after Ref:0\/00000000: member numbers must increase/,
    );
    // Chunked: cut inside a piece, and a piece past the disk.
    await sh(`${DS} export ${dir}/d.raw -f chunked > ${dir}/full.ch`);
    await sh(`head -c 70000 ${dir}/full.ch > ${dir}/cut.ch`);
    r = await runCli([
      "import",
      `${dir}/o5.raw`,
      "-f",
      "chunked",
      "--size",
      "13M",
      "-i",
      `${dir}/cut.ch`,
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /ended inside a chunk/);
    r = await runCli(["import", `${dir}/o6.raw`, "-f", "chunked", "-i", `${dir}/cut.ch`]);
    assert.equal(r.code, 2); // a usage error: the size must be given
    assert.match(
      r.stderr,
      /does not exist and a chunked stream does not say the disk's size: give --size/,
    );
    await sh(`${DS} export ${dir}/d.raw -f chunked > ${dir}/full.ch`);
    r = await runCli([
      "import",
      `${dir}/o7.raw`,
      "-f",
      "chunked",
      "--size",
      "4M",
      "-i",
      `${dir}/full.ch`,
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /past the disk's size of 4194304 bytes/);
  });
});

Deno.test("export refuses what a wire format cannot say", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    for (const f of ["raw", "tar"]) {
      const r = await runCli([
        "export",
        `${dir}/d.raw`,
        "-f",
        f,
        "--diff",
        `${dir}/d.raw`,
        "-o",
        `${dir}/x`,
      ]);
      assert.equal(r.code, 2);
      assert.match(r.stderr, new RegExp(`--diff cannot be exported as ${f}`));
    }
    let r = await runCli(["export", `${dir}/d.raw`, "-f", "chunked", "-c", "2M"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /-c applies to qcow2 only, not to -f chunked/);
    r = await runCli(["export", `${dir}/d.raw`, "-f", "raw", "--checksum", "sha1"]);
    assert.equal(r.code, 2);
    r = await runCli(["export", `${dir}/d.raw`, "-f", "tar", "--checksum", "md5"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--checksum must be xxhash or sha1/);
  });
});

Deno.test("export -f tar: writeTo and the stream give the same bytes; a hint keeps unhinted chunks unread", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/d.raw`);
    // Hinted chunks 3 and 4; 0 and 12 are kept anyway. Reads must stay inside these.
    const clusters = new ClusterSet(13, MiB);
    clusters.addRange(3, 4);
    const allocation = { virtualSize: 12 * MiB + MiB / 2, clusters };
    const allowed = new Set([0, 3, 4, 12]);
    for (const checksum of ["xxhash", "sha1"] as const) {
      for (const hinted of [false, true]) {
        const outputs: string[] = [];
        for (const way of ["writeTo", "stream"]) {
          const reads: number[] = [];
          const src = recording(await openDiskSource(`${dir}/d.raw`), reads);
          const e = await exportTar(src, {
            checksum,
            allocation: hinted ? allocation : undefined,
            reuseBuffers: way === "writeTo",
          });
          const out = `${dir}/${checksum}-${hinted}-${way}.tar`;
          if (way === "writeTo") await e.writeTo({ kind: "path", path: out });
          else await Deno.writeFile(out, e.stream);
          assert.equal((await Deno.stat(out)).size, e.layout.fileSize);
          outputs.push(await sha256File(out));
          if (hinted) {
            const chunks = new Set(reads.map((at) => Math.floor(at / MiB)));
            assert.deepEqual([...chunks].filter((c) => !allowed.has(c)), [], `${way} read`);
            assert.deepEqual([...chunks].sort((a, b) => a - b), [0, 3, 4, 12]);
          }
        }
        assert.equal(outputs[0], outputs[1], `${checksum} hinted=${hinted}`);
      }
    }
  });
});

Deno.test("XXH64: libxxhash, the native and the WebAssembly implementations agree, in one piece and in several", async () => {
  const wasm = (await loadXxh64("wasm"))!;
  assert.equal(wasm.implementation, "wasm");
  const data = pseudoRandom(3 * MiB + 12345, 9);
  for (const kind of ["libxxhash", "native"] as const) {
    const impl = await loadXxh64(kind);
    if (impl === null) {
      // CI installs libxxhash0 (.ci/run); @node-rs/xxhash has a binary for Linux x86-64.
      assert.ok(
        !(kind === "libxxhash" ? IN_CI : Deno.build.arch === "x86_64"),
        `the ${kind} XXH64 loads here`,
      );
      continue;
    }
    assert.equal(impl.implementation, kind);
    for (const len of [0, 1, 31, 32, 33, 4096, MiB, data.length - 7]) {
      const d = data.subarray(7, 7 + len);
      const want = wasm.checksum(d);
      assert.equal(impl.checksum(d), want, `${kind}: ${len} bytes`);
      const cut = Math.floor(d.length / 3);
      assert.equal(impl.checksum(d.subarray(0, cut), d.subarray(cut)), want);
      assert.equal(wasm.checksum(d.subarray(0, cut), d.subarray(cut)), want);
    }
  }
  // The default is the first that loads.
  if ((await loadXxh64("libxxhash")) !== null) {
    assert.equal((await loadXxh64())!.implementation, "libxxhash");
  }
});

Deno.test("XXH64 on another thread (libxxhash) agrees with the WebAssembly one, in one piece and in several", async () => {
  const threaded = loadThreadedXxh64();
  if (threaded === null) {
    // CI installs libxxhash0 (.ci/run); elsewhere imports hash on their own thread.
    assert.ok(!IN_CI, "libxxhash.so.0 loads through FFI (apt-get install libxxhash0)");
    return;
  }
  const reference = (await loadXxh64("wasm"))!;
  const data = pseudoRandom(3 * MiB + 12345, 11);
  for (const len of [0, 1, 31, 32, 33, 4096, MiB, data.length - 7]) {
    const d = data.subarray(7, 7 + len);
    const want = reference.checksum(d);
    assert.equal(await threaded(d), want, `${len} bytes`);
    const [a, b] = [Math.floor(d.length / 3), Math.floor((2 * d.length) / 3)];
    assert.equal(await threaded(d.subarray(0, a), d.subarray(a, b), d.subarray(b)), want);
  }
  // Many at once (each on one of Deno's blocking threads), each its own result.
  const parts = Array.from({ length: 16 }, (_, k) => data.subarray(k * 4096, k * 4096 + MiB));
  assert.deepEqual(
    await Promise.all(parts.map((p) => threaded(p))),
    parts.map((p) => reference.checksum(p)),
  );
});

/** `src`, recording the offset of every read of its data. */
function recording(src: DiskSource, reads: number[]): DiskSource {
  return {
    path: src.path,
    size: src.size,
    isFile: src.isFile,
    readAt: (buf, at, limit) => {
      reads.push(at);
      return src.readAt(buf, at, limit);
    },
    readAtSync: (buf, at, limit) => {
      reads.push(at);
      src.readAtSync!(buf, at, limit);
    },
    extents: (limit) => src.extents(limit),
    currentSize: () => src.currentSize(),
    close: () => src.close(),
  };
}

Deno.test("import -f tar: with writes running while members are read, a bad member and those after it are never written", async () => {
  await withTempDir(async (dir) => {
    const size = 24 * MiB;
    await writeSparse(`${dir}/d.raw`, size, [[0, pseudoRandom(size, 11)]]);
    await sh(`${DS} export ${dir}/d.raw -f tar > ${dir}/d.tar`);
    const member = 512 + MiB + 1024; // a member and its checksum member in the stream
    await sh(
      `printf 'X' | dd of=${dir}/d.tar bs=1 seek=${20 * member + 512 + 7} conv=notrunc status=none`,
    );
    const old = new Uint8Array(size).fill(0xee);
    await Deno.writeFile(`${dir}/dest.raw`, old);
    const r = await sh(
      `cat ${dir}/d.tar | ${DS} import ${dir}/dest.raw -f tar; echo "exit $?"`,
    ).catch((e) => String(e));
    assert.match(r, /exit 1/);
    const dest = await Deno.readFile(`${dir}/dest.raw`);
    const disk = await Deno.readFile(`${dir}/d.raw`);
    // Members before the bad one may have been written (they were verified) ...
    for (let n = 0; n < 20; n++) {
      const got = dest.subarray(n * MiB, (n + 1) * MiB);
      assert.ok(
        got.every((b) => b === 0xee) ||
          sha256(got) === sha256(disk.subarray(n * MiB, (n + 1) * MiB)),
        `member ${n}`,
      );
    }
    // (the first ones were: their writes ran while later members were read) ...
    assert.equal(sha256(dest.subarray(0, 8 * MiB)), sha256(disk.subarray(0, 8 * MiB)));
    // ... the bad one and those after it never were.
    assert.ok(dest.subarray(20 * MiB).every((b) => b === 0xee));
  });
});
