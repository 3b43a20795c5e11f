/**
 * Edges of XAPI's wire formats found by an adversarial review: disks whose size is
 * not a multiple of 512 (or 0, or 1 byte), member names that do not fit a ustar
 * header, members of another disk or of another tar type in a one-disk stream, VDI
 * objects of ova.xml without a usable size or id, and vhd-tool flags given twice over.
 */
import assert from "node:assert/strict";
import { CorruptImageError } from "../lib/errors.ts";
import { ChunkStream } from "../lib/io/chunk_stream.ts";
import { loadChecksum } from "../lib/xva/checksum.ts";
import { decodeXvaDisk } from "../lib/xva/disk.ts";
import { parseOvaXml } from "../lib/xva/ova.ts";
import { TAR_END, tarHeader, tarPadding, TarReader } from "../lib/xva/tar.ts";
import {
  CLI_SH,
  pseudoRandom,
  runCli,
  sh,
  sha256,
  sha256File,
  toolTest,
  withTempDir,
} from "./helpers.ts";

const MiB = 1 << 20;
const DS = CLI_SH;
const PY = "/usr/bin/python3";

/** The sizes that caught the wire formats out: empty, one byte, not a multiple of 512. */
const SIZES = [0, 1, 3 * MiB + 777];

Deno.test("wire formats: disks of 0, 1 and 3 MiB + 777 bytes round-trip exactly through a pipe", async () => {
  await withTempDir(async (dir) => {
    for (const size of SIZES) {
      const disk = `${dir}/d${size}.raw`;
      await Deno.writeFile(disk, pseudoRandom(size, size + 1));
      for (const format of ["raw", "chunked", "tar"]) {
        const out = `${dir}/copy-${size}-${format}.raw`;
        // A chunked stream does not carry the size: it is the source's, exactly.
        const flags = format === "chunked" ? `--size ${size}` : "";
        await sh(`${DS} export ${disk} -f ${format} | ${DS} import ${out} -f ${format} ${flags}`);
        assert.equal((await Deno.stat(out)).size, size, `${format} of ${size} bytes`);
        assert.equal(await sha256File(out), await sha256File(disk), `${format} of ${size} bytes`);
      }
      // An existing copy of the disk (vhd-tool serve's destination) takes a chunked stream.
      const existing = `${dir}/existing-${size}.raw`;
      await Deno.writeFile(existing, new Uint8Array(size));
      await sh(`${DS} export ${disk} -f chunked | ${DS} import ${existing} -f chunked`);
      assert.equal(await sha256File(existing), await sha256File(disk));
    }
  });
});

toolTest(
  "export -f tar: the last member holds the disk's last bytes exactly, as Python's tarfile reads it",
  [[PY, "-c", "import tarfile"]],
  "apt-get install -y python3",
  async () => {
    await withTempDir(async (dir) => {
      for (const size of SIZES) {
        await Deno.writeFile(`${dir}/d.raw`, pseudoRandom(size, 7));
        await sh(`${DS} export ${dir}/d.raw -f tar -o ${dir}/d${size}.tar`);
        const listing = await sh(
          `${PY} -c 'import tarfile,sys; t=tarfile.open(sys.argv[1]); ` +
            `print(" ".join("%s:%d" % (m.name, m.size) for m in t.getmembers()))' ${dir}/d${size}.tar`,
        );
        const want = size === 0
          ? ""
          : size === 1
          ? "Ref:0/00000000:1 Ref:0/00000000.xxhash:16"
          : [0, 1, 2].map((n) => `Ref:0/0000000${n}:${MiB} Ref:0/0000000${n}.xxhash:16`)
            .join(" ") + " Ref:0/00000003:777 Ref:0/00000003.xxhash:16";
        assert.equal(listing.trim(), want, `${size} bytes`);
      }
    });
  },
);

Deno.test("tar: a member name too long for a ustar header is refused, never written garbled", async () => {
  // 60 two-byte characters: 120 bytes, which tar-mini would spill into the mode field.
  assert.throws(() => tarHeader("é".repeat(60) + "/00000000", 1), RangeError);
  assert.throws(() => tarHeader("a".repeat(160) + "/00000000", 1), RangeError);
  // A long ASCII prefix splits at its '/' into ustar's prefix field and is read back.
  const long = "a".repeat(90) + "/00000000.checksum";
  const h = tarHeader(long, 40);
  const reader = new TarReader(new ChunkStream(ReadableStream.from([h, new Uint8Array(512)])));
  assert.equal((await reader.next())?.name, long);
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(1));
    const r = await runCli(["export", `${dir}/d.raw`, "-f", "tar", "--tar-prefix", "é".repeat(60)]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /bad tar prefix .*too long for a member name/);
    assert.equal(r.stderr.trim().split("\n").length, 1);
  });
});

/** A tar of `members` (name, bytes, tar type), each regular one followed by its XXH64 member. */
async function tarOf(members: [string, Uint8Array, string?][]): Promise<Uint8Array> {
  const xxh = await loadChecksum("xxhash");
  const parts: Uint8Array[] = [];
  const add = (name: string, data: Uint8Array, type = "0") => {
    const h = tarHeader(name, data.length);
    if (type !== "0") {
      // Another type flag, and the header checksum made again.
      h[156] = type.charCodeAt(0);
      h.fill(0x20, 148, 156);
      const sum = h.reduce((a, b) => a + b, 0);
      h.set(new TextEncoder().encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
    }
    parts.push(h, data, new Uint8Array(tarPadding(data.length)));
  };
  for (const [name, data, type = "0"] of members) {
    add(name, data, type);
    if (type === "0") add(`${name}.xxhash`, new TextEncoder().encode(xxh(data)));
  }
  parts.push(TAR_END);
  return new Uint8Array(await new Blob(parts as BlobPart[]).arrayBuffer());
}

function decode(tar: Uint8Array, size: number | null = null) {
  const target = {
    queued: 0,
    write() {},
    zero() {},
    flush: () => Promise.resolve(),
  };
  const reader = new TarReader(new ChunkStream(ReadableStream.from([tar])));
  return decodeXvaDisk(reader, null, target, { size });
}

Deno.test("XVA disk: a member that is not a regular file is refused by name and type", async () => {
  const data = new Uint8Array(4).fill(1);
  for (
    const [type, what] of [["2", "a symbolic link"], ["1", "a hard link"], ["6", "a FIFO"], [
      "3",
      "a character device",
    ]]
  ) {
    const tar = await tarOf([["Ref:0/00000000", data], ["Ref:0/00000001", new Uint8Array(), type]]);
    await assert.rejects(
      decode(tar),
      (e: Error) =>
        e instanceof CorruptImageError &&
        e.message.includes(`member Ref:0/00000001 is ${what} (tar type "${type}")`),
    );
  }
});

Deno.test("XVA disk: an archive with its end blocks and no member is an empty disk", async () => {
  const r = await decode(TAR_END);
  assert.equal(r.size, 0);
  assert.equal(r.members, 0);
  // No end blocks at all: nothing says the stream is a disk.
  await assert.rejects(decode(new Uint8Array()), /holds no disk member/);
});

Deno.test("import -f tar refuses members of another disk instead of dropping them", async () => {
  await withTempDir(async (dir) => {
    const a = new Uint8Array(MiB).fill(1);
    const b = new Uint8Array(MiB).fill(2);
    await Deno.writeFile(
      `${dir}/two.tar`,
      await tarOf([["Ref:0/00000000", a], ["Ref:1/00000001", b]]),
    );
    const r = await runCli(["import", `${dir}/out.raw`, "-f", "tar", "-i", `${dir}/two.tar`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /member Ref:1\/00000001 does not belong to the disk of prefix Ref:0/);
    await assert.rejects(Deno.stat(`${dir}/out.raw`), Deno.errors.NotFound);
  });
});

/** ova.xml with one VDI object whose snapshot holds `fields` (and id `id`). */
function ovaWith(fields: string, id: string | null = "Ref:1", twice = false): string {
  const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
  const vdi = `<value><struct>${m("class", "VDI")}${id === null ? "" : m("id", id)}` +
    `${m("snapshot", `<struct>${fields}</struct>`)}</struct></value>`;
  return `<value><struct>${
    m("objects", `<array><data>${vdi}${twice ? vdi : ""}</data></array>`)
  }</struct></value>`;
}

Deno.test("ova.xml: a VDI's virtual_size must be a decimal number of bytes; ids present and unique", () => {
  const size = (v: string) => `<member><name>virtual_size</name><value>${v}</value></member>`;
  assert.equal(parseOvaXml(ovaWith(size("1048576"))).disks[0].virtualSize, MiB);
  assert.equal(parseOvaXml(ovaWith(size("<string> 1048576 </string>"))).disks[0].virtualSize, MiB);
  for (const bad of ["", "0x100000", "1e6", "12abc", "-5", "1048576.5", "99999999999999999999"]) {
    assert.throws(
      () => parseOvaXml(ovaWith(size(bad))),
      /ova.xml gives VDI Ref:1 no usable virtual_size/,
      JSON.stringify(bad),
    );
  }
  assert.throws(() => parseOvaXml(ovaWith("")), /no usable virtual_size \(null\)/);
  assert.throws(() => parseOvaXml(ovaWith(size("1"), null)), /a VDI object without an id/);
  assert.throws(
    () => parseOvaXml(ovaWith(size("1"), "Ref:1", true)),
    /two VDI objects with the id/,
  );
});

Deno.test("vhd-tool: a path and a descriptor for the same end are refused (status 2)", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(512));
    for (
      const args of [
        [
          "stream",
          "--source",
          `${dir}/d.raw`,
          "--destination",
          `${dir}/o`,
          "--destination-fd",
          "1",
        ],
        ["serve", "--source-protocol", "none", "--source", `${dir}/d.raw`, "--source-fd", "0"],
      ]
    ) {
      const r = await runCli(["vhd-tool", ...args, "--destination", `file://${dir}/o.raw`]);
      assert.equal(r.code, 2, args.join(" "));
      assert.match(r.stderr, /cannot be used with option/);
    }
    const r = await runCli(["vhd-tool", "stream", "--source", `${dir}/d.raw`, "--sni", "x"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--sni is not supported/);
  });
});

Deno.test("ova.xml: numeric character references in names are decoded", () => {
  const fields = "<member><name>virtual_size</name><value>512</value></member>" +
    "<member><name>name_label</name><value>caf&#233; &#x41; &amp; b</value></member>";
  assert.equal(parseOvaXml(ovaWith(fields)).disks[0].name, "café A & b");
});

Deno.test("vhd-tool stream --destination-protocol tar names members PREFIX%08d, as vhd-tool; serve reads them back", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, pseudoRandom(2 * MiB + 512, 3));
    await sh(
      `${DS} vhd-tool stream --source-protocol none --source-format raw --source ${dir}/d.raw ` +
        `--destination-protocol tar --tar-filename-prefix disk1 --destination ${dir}/d.tar`,
    );
    const names = (await sh(`tar -tf ${dir}/d.tar`)).trim().split("\n");
    assert.deepEqual(names.slice(0, 2), ["disk100000000", "disk100000000.checksum"]);
    assert.equal(names.at(-1), "disk100000002.checksum");
    // A prefix ending in a digit: the numbers are read after it, not inside it.
    await sh(
      `${DS} vhd-tool serve --source-protocol tar --source ${dir}/d.tar --tar-filename-prefix ` +
        `disk1 --destination file://${dir}/copy.raw --destination-format raw`,
    );
    assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/d.raw`));
  });
});

Deno.test("import without -f: a tar stream or a whole XVA is recognised and the right command named", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, pseudoRandom(4096, 5));
    await sh(`${DS} export ${dir}/d.raw -f tar -o ${dir}/d.tar`);
    const ova = new TextEncoder().encode("<value/>");
    await Deno.writeFile(
      `${dir}/vm.xva`,
      await new Blob(
        [tarHeader("ova.xml", ova.length), ova, new Uint8Array(504), TAR_END] as BlobPart[],
      ).bytes(),
    );
    for (
      const [file, want] of [
        ["d.tar", /it is a tar stream: for an XVA disk's members give -f tar/],
        ["vm.xva", /it is a whole XVA: extract its disks with 'diskstream xva extract'/],
      ] as const
    ) {
      const r = await runCli(["import", `${dir}/out.raw`], { stdinFile: `${dir}/${file}` });
      assert.equal(r.code, 1, file);
      assert.match(r.stderr, want);
    }
  });
});

/** An XVA of ova.xml (VDIs `[ref, virtual_size]`) and disk members `[ref, number, bytes]`. */
async function xvaOf(vdis: [string, number][], members: [string, number, Uint8Array][]) {
  const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
  const objs = vdis.map(([ref, size]) =>
    `<value><struct>${m("class", "VDI")}${m("id", ref)}` +
    `${m("snapshot", `<struct>${m("virtual_size", String(size))}</struct>`)}</struct></value>`
  );
  const ova = new TextEncoder().encode(
    `<value><struct>${
      m("objects", `<array><data>${objs.join("")}</data></array>`)
    }</struct></value>`,
  );
  const disk = await tarOf(
    members.map(([ref, n, data]) => [`${ref}/${String(n).padStart(8, "0")}`, data]),
  );
  return await new Blob(
    [
      tarHeader("ova.xml", ova.length),
      ova,
      new Uint8Array(tarPadding(ova.length)),
      disk,
    ] as BlobPart[],
  ).bytes();
}

Deno.test("xva extract: a disk of 0 bytes (no member) is an empty file; members past a disk's size are named so", async () => {
  await withTempDir(async (dir) => {
    const one = new Uint8Array(MiB).fill(1);
    await Deno.writeFile(
      `${dir}/zero.xva`,
      await xvaOf([["Ref:1", 0], ["Ref:2", MiB]], [["Ref:2", 0, one]]),
    );
    for (const format of ["raw", "qcow2", "vhd"]) {
      const r = await runCli([
        "xva",
        "extract",
        `${dir}/zero.xva`,
        "-o",
        `${dir}/${format}`,
        "-f",
        format,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, new RegExp(`Ref:1 → ${dir}/${format}/Ref_1\\.${format} \\(0 B`));
      if (format === "raw") assert.equal((await Deno.stat(`${dir}/raw/Ref_1.raw`)).size, 0);
    }
    // ova.xml says 1 MiB, the stream holds two members of it.
    await Deno.writeFile(
      `${dir}/long.xva`,
      await xvaOf([["Ref:1", MiB]], [["Ref:1", 0, one], ["Ref:1", 1, one]]),
    );
    let r = await runCli(["xva", "extract", `${dir}/long.xva`, "-o", `${dir}/long`]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /member Ref:1\/00000001 of disk Ref:1 lies past the disk's 1048576 bytes/,
    );
    // Another disk's member before a disk is complete: ova.xml is named, not --tar-prefix.
    await Deno.writeFile(
      `${dir}/early.xva`,
      await xvaOf([["Ref:1", 2 * MiB], ["Ref:2", MiB]], [["Ref:1", 0, one], ["Ref:2", 0, one]]),
    );
    r = await runCli(["xva", "extract", `${dir}/early.xva`, "-o", `${dir}/early`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /found "Ref:2\/00000000" before the disk's 2097152 bytes \(ova.xml's/);
    assert.doesNotMatch(r.stderr, /--tar-prefix|--size/);
  });
});

Deno.test("XVA disk: a refusal waits for the writes already running, so no member is left half written", async () => {
  const members: [string, Uint8Array][] = [];
  for (let n = 0; n < 6; n++) members.push([`Ref:0/0000000${n}`, new Uint8Array(MiB).fill(n + 1)]);
  const tar = await tarOf(members);
  // Corrupt member 5's data: its checksum no longer matches.
  const member = 512 + MiB + 1024;
  tar[5 * member + 512 + 7] ^= 0xff;
  let queued = 0;
  let running = 0;
  let finished = 0;
  const target = {
    get queued() {
      return queued;
    },
    write: (_at: number, _b: Uint8Array, from: number, to: number) => {
      queued += to - from;
    },
    zero() {},
    flush: async () => {
      queued = 0;
      running++;
      await new Promise((r) => setTimeout(r, 300)); // a slow device
      finished++;
    },
  };
  const reader = new TarReader(new ChunkStream(ReadableStream.from([tar])));
  await assert.rejects(
    decodeXvaDisk(reader, null, target, { size: null }),
    /checksum mismatch in member Ref:0\/00000005/,
  );
  assert.ok(running > 0);
  assert.equal(finished, running); // nothing still writing when the caller aborts
});

Deno.test("XVA disk: members are hashed while the next ones are read, but a corrupt member's batch is never flushed", async () => {
  const n = 11;
  const members: [string, Uint8Array][] = [];
  for (let k = 0; k < n; k++) {
    members.push([`Ref:0/${String(k).padStart(8, "0")}`, pseudoRandom(MiB, k + 1)]);
  }
  const tar = await tarOf(members);
  const member = 512 + MiB + 1024;
  for (const bad of [null, 0, 3, 6, 10]) {
    const copy = tar.slice();
    if (bad !== null) copy[bad * member + 512 + 99] ^= 1;
    // The target records which disk bytes each flush writes.
    let queued: [number, number][] = [];
    const flushed: [number, number][] = [];
    const disk = new Uint8Array(n * MiB);
    const target = {
      get queued() {
        return queued.reduce((a, [, len]) => a + len, 0);
      },
      write: (at: number, b: Uint8Array, from: number, to: number) => {
        disk.set(b.subarray(from, to), at);
        queued.push([at, to - from]);
      },
      zero() {},
      flush: async () => {
        // Takes what is queued when called (as RawDestination does), then writes slowly.
        flushed.push(...queued);
        queued = [];
        await new Promise((r) => setTimeout(r, 1));
      },
    };
    const reader = new TarReader(new ChunkStream(ReadableStream.from([copy])));
    const done = decodeXvaDisk(reader, null, target, { size: null });
    if (bad === null) {
      const r = await done;
      assert.equal(r.verified.xxhash, n);
      members.forEach(([, d], k) => assert.deepEqual(disk.subarray(k * MiB, (k + 1) * MiB), d));
      continue;
    }
    await assert.rejects(done, new RegExp(`checksum mismatch in member Ref:0/0*${bad}:`));
    // Nothing of the corrupt member (or after it) was flushed.
    for (const [at, len] of flushed) assert.ok(at + len <= bad * MiB, `${bad}: ${at}+${len}`);
  }
});

Deno.test("xva: a file that is not a tar, and -o naming a file, are refused in one line", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, pseudoRandom(4096, 9));
    for (const args of [["list", `${dir}/d.raw`], ["extract", `${dir}/d.raw`, "-o", `${dir}/o`]]) {
      const r = await runCli(["xva", ...args]);
      assert.equal(r.code, 1, args.join(" "));
      assert.match(r.stderr, /d\.raw is not an XVA: it does not start with a tar header/);
    }
    await Deno.writeFile(
      `${dir}/vm.xva`,
      await xvaOf([["Ref:1", MiB]], [["Ref:1", 0, new Uint8Array(MiB)]]),
    );
    for (const format of ["raw", "qcow2"]) {
      const r = await runCli([
        "xva",
        "extract",
        `${dir}/vm.xva`,
        "-o",
        `${dir}/d.raw`,
        "-f",
        format,
      ]);
      assert.equal(r.code, 2, r.stderr);
      assert.equal(
        r.stderr.trim(),
        `diskstream: cannot extract into ${dir}/d.raw: it exists and is not a directory`,
      );
    }
  });
});

Deno.test("import -f tar: a stream without the tar end (as vhd-tool's stream writes it) imports", async () => {
  // vhd-tool's tar stream (XAPI's export_raw_vdi?format=tar) ends after its last member,
  // with no end blocks: the end of the input between members ends the disk.
  await withTempDir(async (dir) => {
    const disk = pseudoRandom(2 * MiB, 4);
    await Deno.writeFile(`${dir}/d.raw`, disk);
    await sh(`${DS} export ${dir}/d.raw -f tar -o ${dir}/d.tar`);
    await sh(`head -c -1024 ${dir}/d.tar > ${dir}/noend.tar`);
    await sh(`${DS} import ${dir}/o.raw -f tar < ${dir}/noend.tar`);
    assert.equal(await sha256File(`${dir}/o.raw`), sha256(disk));
  });
});
