/**
 * Tar (XVA disk) streams and whole XVAs as a hostile user or a broken host would send
 * them, found by an adversarial review: size fields that tar-mini reads loosely, pax
 * `size`/`path` records, metadata records that no member follows, checksum members with
 * more than the checksum, control characters in names, a second ova.xml, refs that make
 * the same file name, files left by a failed extraction, and ova.xml with many objects.
 */
import assert from "node:assert/strict";
import { ChunkStream } from "../lib/io/chunk_stream.ts";
import { loadChecksum } from "../lib/xva/checksum.ts";
import { parseOvaXml, parseXmlRpc } from "../lib/xva/ova.ts";
import { TAR_END, tarHeader, tarPadding, TarReader } from "../lib/xva/tar.ts";
import { concat, pseudoRandom, runCli, sha256, sha256File, withTempDir } from "./helpers.ts";

const MiB = 1 << 20;
const ESC = String.fromCharCode(27);
const enc = new TextEncoder();
const xxh = await loadChecksum("xxhash");

/** A header with `patch` applied (field offset → bytes), its checksum made again. */
function header(name: string, size: number, patch: Record<number, Uint8Array | string> = {}) {
  const h = tarHeader(name, size);
  for (const [at, bytes] of Object.entries(patch)) {
    h.set(typeof bytes === "string" ? enc.encode(bytes) : bytes, Number(at));
  }
  h.fill(0x20, 148, 156);
  const sum = h.reduce((a, b) => a + b, 0);
  h.set(enc.encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
  return h;
}

const pad = (n: number) => new Uint8Array(tarPadding(n));

/** A member: its header (patched), body and padding. */
function member(name: string, body: Uint8Array, patch: Record<number, Uint8Array | string> = {}) {
  return concat([header(name, body.length, patch), body, pad(body.length)]);
}

/** A data member and its .xxhash member. */
function diskMember(name: string, body: Uint8Array) {
  return concat([member(name, body), member(`${name}.xxhash`, enc.encode(xxh(body)))]);
}

/** A pax header ("x", or "g") holding `records`. */
function pax(records: [string, string][], type = "x") {
  const body = records.map(([k, v]) => {
    const rest = ` ${k}=${v}\n`;
    let n = rest.length + String(rest.length).length;
    if (String(n).length !== String(rest.length).length) n++;
    return `${n}${rest}`;
  }).join("");
  return member("././@PaxHeader", enc.encode(body), { 156: type });
}

function ovaXml(vdis: [string, number][]): Uint8Array {
  const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
  const objs = vdis.map(([ref, size]) =>
    `<value><struct>${m("class", "VDI")}${m("id", ref)}` +
    `${m("snapshot", `<struct>${m("virtual_size", String(size))}</struct>`)}</struct></value>`
  );
  return enc.encode(
    `<value><struct>${m("objects", `<array><data>${objs.join("")}</data></array>`)}</struct>` +
      `</value>`,
  );
}

function xva(vdis: [string, number][], ...body: Uint8Array[]): Uint8Array {
  return concat([member("ova.xml", ovaXml(vdis)), ...body, TAR_END]);
}

const d0 = pseudoRandom(MiB, 1);
const d1 = pseudoRandom(MiB, 2);

/** `import -f tar` of `tar` from a pipe: exit status and stderr, and the disk's sha256. */
async function importTar(dir: string, tar: Uint8Array) {
  const out = `${dir}/disk-${crypto.randomUUID()}.raw`;
  const r = await runCli(["import", out, "-f", "tar"], { stdin: tar });
  const exists = await Deno.stat(out).then(() => true, () => false);
  return { ...r, exists, sha: exists ? await sha256File(out) : null };
}

/** Asserts a refusal on one line: exit 1, `diskstream: ` + `pattern`, nothing left. */
function refused(r: { code: number; stderr: string; exists?: boolean }, pattern: RegExp) {
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, pattern);
  assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, /^diskstream: /);
  assert.ok(!r.stderr.includes(ESC), r.stderr);
  assert.doesNotMatch(r.stderr, /internal error|\n\s+at /);
  if (r.exists !== undefined) assert.equal(r.exists, false, "no output file left");
}

Deno.test("tar: a size field that is no octal number (or a negative base-256 one) is refused, as Python's tarfile does", async () => {
  await withTempDir(async (dir) => {
    const sum = member("Ref:0/00000000.xxhash", enc.encode(xxh(d0)));
    // tar-mini read "0004000000z" as 1 MiB and an all-0xff field as 0.
    for (
      const field of [
        enc.encode("0004000000z\0"),
        enc.encode("00040000009\0"),
        new Uint8Array(12).fill(0xff),
        new Uint8Array([0xff, ...new Uint8Array(10).fill(0xff), 0xfe]),
      ]
    ) {
      const tar = concat([header("Ref:0/00000000", MiB, { 124: field }), d0, sum, TAR_END]);
      refused(await importTar(dir, tar), /a tar header in .* gives an impossible size \(its size/);
    }
    // GNU base-256 for a positive size is read (Python's tarfile writes it past 8 GiB).
    const b256 = new Uint8Array(12);
    b256[0] = 0x80;
    b256.set([0x10, 0, 0], 9); // 1 MiB
    const r = await importTar(dir, concat([header("Ref:0/00000000", MiB, { 124: b256 }), d0, sum]));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.sha, sha256(d0));
  });
});

Deno.test("tar: a pax size is the member's size; a pax size that is no number, a malformed pax record, a GNU sparse pax member are refused", async () => {
  await withTempDir(async (dir) => {
    const sum = member("Ref:0/00000000.xxhash", enc.encode(xxh(d0)));
    // The ustar size field says 0 (as Python writes members past 8 GiB in pax format).
    const zero = header("Ref:0/00000000", 0);
    let r = await importTar(dir, concat([pax([["size", String(MiB)]]), zero, d0, sum, TAR_END]));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.sha, sha256(d0));
    // A pax path names the member.
    r = await importTar(
      dir,
      concat([pax([["path", "Ref:0/00000000"]]), header("x", MiB), d0, sum, TAR_END]),
    );
    assert.equal(r.code, 0, r.stderr);
    const data = concat([header("Ref:0/00000000", MiB), d0, sum, TAR_END]);
    refused(
      await importTar(dir, concat([pax([["size", "12abc"]]), data])),
      /a pax header in .* gives an impossible size \("12abc"\)/,
    );
    refused(
      await importTar(dir, concat([member("p", enc.encode("garbage\n"), { 156: "x" }), data])),
      /a pax header in .* is malformed/,
    );
    refused(
      await importTar(dir, concat([pax([["GNU.sparse.major", "1"]]), data])),
      /describes a GNU sparse file/,
    );
    refused(
      await importTar(dir, concat([pax([["size", "5"]], "g"), data])),
      /a global pax header .* sets the size of every member/,
    );
  });
});

Deno.test("tar: a GNU long name or pax record that no member follows is refused, from a pipe and from a file", async () => {
  await withTempDir(async (dir) => {
    const dangling = member("././@LongLink", enc.encode("Ref:0/00000001\0"), { 156: "L" });
    const disk = diskMember("Ref:0/00000000", d0);
    refused(await importTar(dir, concat([disk, dangling, TAR_END])), /no member follows/);
    refused(await importTar(dir, concat([disk, dangling])), /no member follows/);
    await Deno.writeFile(`${dir}/vm.xva`, xva([["Ref:0", MiB]], disk, dangling));
    refused(await runCli(["xva", "list", `${dir}/vm.xva`]), /no member follows/);
    // A GNU sparse member is named as one (tar-mini's type flag for 'S' was "35").
    refused(
      await importTar(dir, concat([member("Ref:0/00000000", d0, { 156: "S" }), TAR_END])),
      /member Ref:0\/00000000 is a GNU sparse file \(tar type "S"\)/,
    );
  });
});

Deno.test("tar: a checksum member must hold the checksum alone (blanks and a line end around it allowed)", async () => {
  await withTempDir(async (dir) => {
    const data = member("Ref:0/00000000", d0);
    const sum = (text: string) => member("Ref:0/00000000.xxhash", enc.encode(text));
    for (const ok of [xxh(d0).toLowerCase(), ` ${xxh(d0)}\r\n`]) {
      const r = await importTar(dir, concat([data, sum(ok), TAR_END]));
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.sha, sha256(d0));
    }
    refused(
      await importTar(dir, concat([data, sum(`${xxh(d0)} anything`), TAR_END])),
      /checksum mismatch in member Ref:0\/00000000: its \.xxhash member says [0-9a-f]{16} anything/,
    );
  });
});

Deno.test("tar: names are cut at their first NUL (as tar and Python read them); control characters in names are escaped in messages", async () => {
  await withTempDir(async (dir) => {
    const sum = member("Ref:0/00000000.xxhash", enc.encode(xxh(d0)));
    const nul = header("Ref:0/00000000", MiB, { 14: "\0junk/" });
    const r = await importTar(dir, concat([nul, d0, sum, TAR_END]));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.sha, sha256(d0));
    const evil = header("Ref:0/00000000", MiB, { 14: "\x1b[31m\nEVIL" });
    refused(
      await importTar(dir, concat([diskMember("Ref:0/00000000", d0), evil, d1, TAR_END])),
      /member Ref:0\/00000000\\x1b\[31m\\x0aEVIL does not belong/,
    );
  });
});

Deno.test("xva: a second ova.xml is refused by list and extract, from a file and a pipe", async () => {
  await withTempDir(async (dir) => {
    const disk = concat([diskMember("Ref:1/00000000", d0), diskMember("Ref:1/00000001", d1)]);
    const file = `${dir}/vm.xva`;
    await Deno.writeFile(file, xva([["Ref:1", 2 * MiB]], disk, member("ova.xml", ovaXml([]))));
    for (const args of [["list", file], ["list", "-"], ["extract", file, "-o", `${dir}/o`]]) {
      const r = await runCli(["xva", ...args], { stdinFile: file });
      refused(r, /the XVA holds a second ova\.xml/);
    }
    assert.deepEqual([...Deno.readDirSync(`${dir}/o`)], []);
  });
});

Deno.test("xva extract: refs that make the same file name, or an existing file or link in DIR, are refused before anything is written", async () => {
  await withTempDir(async (dir) => {
    const disk = (ref: string) =>
      concat([diskMember(`${ref}/00000000`, d0), diskMember(`${ref}/00000001`, d1)]);
    const file = `${dir}/vm.xva`;
    await Deno.writeFile(
      file,
      xva([["Ref:1", 2 * MiB], ["Ref_1", 2 * MiB]], disk("Ref:1"), disk("Ref_1")),
    );
    for (const format of ["raw", "qcow2"]) {
      const r = await runCli(["xva", "extract", file, "-o", `${dir}/${format}`, "-f", format]);
      refused(r, /disks Ref:1 and Ref_1 would both be written to .*Ref_1\.(raw|qcow2)/);
      assert.deepEqual([...Deno.readDirSync(`${dir}/${format}`)], []);
    }
    // A link where the second disk goes: the first disk is not written either.
    await Deno.writeFile(
      file,
      xva([["Ref:1", 2 * MiB], ["Ref:2", 2 * MiB]], disk("Ref:1"), disk("Ref:2")),
    );
    await Deno.mkdir(`${dir}/out`);
    await Deno.writeTextFile(`${dir}/keep`, "keep");
    await Deno.symlink(`${dir}/keep`, `${dir}/out/Ref_2.raw`);
    const r = await runCli(["xva", "extract", "-", "-o", `${dir}/out`], { stdinFile: file });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /Ref_2\.raw exists already/);
    assert.deepEqual([...Deno.readDirSync(`${dir}/out`)].map((e) => e.name), ["Ref_2.raw"]);
    assert.equal(await Deno.readTextFile(`${dir}/keep`), "keep");
  });
});

Deno.test("xva extract: a failure removes every file the extraction created, the disks done before it too", async () => {
  await withTempDir(async (dir) => {
    const bad = concat([
      member("Ref:2/00000001", d1),
      member("Ref:2/00000001.xxhash", enc.encode("0000000000000000")),
    ]);
    const file = `${dir}/vm.xva`;
    await Deno.writeFile(
      file,
      xva(
        [["Ref:1", 2 * MiB], ["Ref:2", 2 * MiB]],
        diskMember("Ref:1/00000000", d0),
        diskMember("Ref:1/00000001", d1),
        diskMember("Ref:2/00000000", d0),
        bad,
      ),
    );
    for (const [format, input] of [["raw", file], ["raw", "-"], ["qcow2", file]]) {
      const out = `${dir}/${format}${input === "-" ? "-pipe" : ""}`;
      const r = await runCli(["xva", "extract", input, "-o", out, "-f", format], {
        stdinFile: file,
      });
      refused(r, /checksum mismatch in member Ref:2\/00000001/);
      if (format === "raw") {
        assert.match(r.stderr, /files this extraction had written were removed \(.*Ref_1\.raw\)/);
      }
      // (-f qcow2 verifies every checksum before it makes DIR.)
      const left = await Array.fromAsync(Deno.readDir(out)).catch(() => []);
      assert.deepEqual(left, [], `${format} ${input}`);
    }
    // ova.xml says 1 MiB, the disk has a second member: its file is not left either.
    await Deno.writeFile(
      file,
      xva([["Ref:1", MiB]], diskMember("Ref:1/00000000", d0), diskMember("Ref:1/00000001", d1)),
    );
    const r = await runCli(["xva", "extract", file, "-o", `${dir}/long`]);
    refused(r, /member Ref:1\/00000001 of disk Ref:1 lies past the disk's 1048576 bytes/);
    assert.deepEqual([...Deno.readDirSync(`${dir}/long`)], []);
  });
});

Deno.test("xva list: control characters of ova.xml's refs are escaped in the listing and the extraction report", async () => {
  await withTempDir(async (dir) => {
    const ref = "Ref\x1b[31m:1";
    const file = `${dir}/vm.xva`;
    await Deno.writeFile(file, xva([[ref, MiB]], diskMember(`${ref}/00000000`, d0)));
    const r = await runCli(["xva", "list", file]);
    assert.equal(r.code, 0, r.stderr);
    const out = new TextDecoder().decode(r.stdout);
    assert.ok(!out.includes(ESC), out);
    assert.match(out, /disk Ref\\x1b\[31m:1 /);
    const e = await runCli(["xva", "extract", file, "-o", `${dir}/o`]);
    assert.equal(e.code, 0, e.stderr);
    assert.ok(!e.stderr.includes(ESC), e.stderr);
    assert.equal(await sha256File(`${dir}/o/Ref__31m_1.raw`), sha256(d0));
  });
});

Deno.test("ova.xml: many VDI objects are read in time linear in their number (duplicate refs found by a map)", () => {
  const n = 30_000;
  const xml = new TextDecoder().decode(
    ovaXml(Array.from({ length: n }, (_, i) => [`Ref:${i}`, 0])),
  );
  let t = performance.now();
  parseXmlRpc(xml);
  const parse = performance.now() - t;
  t = performance.now();
  const m = parseOvaXml(xml);
  const total = performance.now() - t;
  assert.equal(m.disks.length, n);
  // The objects were compared pairwise: 4.5e8 comparisons, seconds.
  assert.ok(total - parse < 1500, `${n} VDIs took ${total - parse} ms past the XML parse`);
  assert.throws(
    () => parseOvaXml(new TextDecoder().decode(ovaXml([["Ref:1", 0], ["Ref:1", 0]]))),
    /two VDI objects with the id Ref:1/,
  );
});

Deno.test("TarReader: a pax size applies to the member after it only", async () => {
  const tar = concat([
    pax([["size", "3"]]),
    header("a", 0),
    enc.encode("abc"),
    pad(3),
    member("b", enc.encode("de")),
    TAR_END,
  ]);
  const reader = new TarReader(new ChunkStream(ReadableStream.from([tar])));
  const a = await reader.next();
  assert.deepEqual([a?.name, a?.size], ["a", 3]);
  assert.deepEqual(new TextDecoder().decode(await reader.readBody(10)), "abc");
  const b = await reader.next();
  assert.deepEqual([b?.name, b?.size], ["b", 2]);
  assert.equal(await reader.next(), null);
  assert.ok(reader.ended);
});

Deno.test("xva: an ova.xml over 16 MiB is refused before it is read (its parsing takes ~30 × its size)", async () => {
  await withTempDir(async (dir) => {
    const big = new Uint8Array(17 * MiB).fill(0x20);
    const file = `${dir}/big.xva`;
    await Deno.writeFile(file, concat([member("ova.xml", big), new Uint8Array(1024)]));
    for (const args of [["list", file], ["list", "-"], ["extract", "-", "-o", `${dir}/out`]]) {
      const r = await runCli(["xva", ...args], { stdinFile: file });
      refused(r, /its ova\.xml holds 17825792 bytes, more than the 16777216 bytes \(16 MiB\)/);
    }
  });
});
