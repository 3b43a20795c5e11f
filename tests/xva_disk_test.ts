/**
 * The XVA disk decoder against hand-made member sequences: keep-alives, gaps, and
 * every malformed sequence it must refuse (naming the member), plus tar details
 * (GNU long names, pax paths, directory entries) that other tar writers produce.
 */
import assert from "node:assert/strict";
import { CorruptImageError } from "../lib/errors.ts";
import { ChunkStream } from "../lib/io/chunk_stream.ts";
import { loadChecksum } from "../lib/xva/checksum.ts";
import { decodeXvaDisk, diskMemberName, type XvaDiskOptions } from "../lib/xva/disk.ts";
import { TAR_END, tarHeader, tarPadding, TarReader } from "../lib/xva/tar.ts";
import { run, withTempDir } from "./helpers.ts";

/** A member: name and bytes (a checksum member follows unless `sum` is false). */
type Spec = [name: string, data: Uint8Array, sum?: "xxhash" | "sha1" | false | string];

async function tarOf(specs: Spec[]): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const add = (name: string, data: Uint8Array) => {
    parts.push(tarHeader(name, data.length), data, new Uint8Array(tarPadding(data.length)));
  };
  for (const [name, data, sum = "xxhash"] of specs) {
    add(name, data);
    if (sum === false) continue;
    if (sum === "xxhash" || sum === "sha1") {
      const text = (await loadChecksum(sum))(data);
      add(name + (sum === "xxhash" ? ".xxhash" : ".checksum"), new TextEncoder().encode(text));
    } else add(name + ".xxhash", new TextEncoder().encode(sum)); // a given (wrong) checksum
  }
  parts.push(TAR_END);
  return new Uint8Array(await new Blob(parts as BlobPart[]).arrayBuffer());
}

/** Decodes `tar` into an array disk; returns the disk and the result. */
async function decode(tar: Uint8Array, options: Partial<XvaDiskOptions> = {}) {
  const disk: number[] = [];
  const target = {
    queued: 0,
    write: (at: number, b: Uint8Array, from: number, to: number) => {
      for (let i = from; i < to; i++) disk[at + i - from] = b[i];
    },
    zero: (at: number, n: number) => {
      for (let i = 0; i < n; i++) disk[at + i] = 0;
    },
    flush: () => Promise.resolve(),
  };
  const reader = new TarReader(new ChunkStream(ReadableStream.from([tar])));
  const r = await decodeXvaDisk(reader, null, target, { size: null, ...options });
  return { disk, r };
}

const bytes = (...b: number[]) => new Uint8Array(b);
const name = (n: number) => diskMemberName("Ref:1", n);

Deno.test("XVA disk: keep-alives take a number without moving the offset; gaps are zeros", async () => {
  const tar = await tarOf([
    [name(0), bytes(1, 2)],
    [name(1), bytes()], // keep-alive
    [name(3), bytes(3, 4)], // one gap (2 bytes) after the keep-alive
    [name(4), bytes(5), "sha1"], // short last member, SHA-1
  ]);
  const { disk, r } = await decode(tar);
  assert.deepEqual(disk, [1, 2, 0, 0, 3, 4, 5]);
  assert.equal(r.size, 7);
  assert.deepEqual(r.verified, { xxhash: 3, sha1: 1 });
  assert.equal(r.members, 4);
});

Deno.test("XVA disk: malformed sequences are refused, naming the member", async () => {
  const cases: [Spec[], Partial<XvaDiskOptions>, RegExp][] = [
    [
      [[name(0), bytes(1, 2), "0000000000000000"]],
      {},
      /checksum mismatch in member Ref:1\/00000000/,
    ],
    [[[name(0), bytes(1, 2), false]], {}, /Ref:1\/00000000 is not followed by its checksum member/],
    [
      [[name(0), bytes()], [name(2), bytes(1)]],
      {},
      /first member is empty: the gap cannot be sized/,
    ],
    [
      [[name(0), bytes(1)], [name(1), bytes(1, 2)]],
      {},
      /holds 2 bytes, more than the disk's first member \(1\)/,
    ],
    [
      [[name(0), bytes(1, 2)], [name(1), bytes(1)], [name(2), bytes(1)]],
      {},
      /comes after Ref:1\/00000001, which is shorter/,
    ],
    [
      [[name(2), bytes(1, 2)], [name(1), bytes(1, 2)]],
      {},
      /Ref:1\/00000001 comes after Ref:1\/00000002: member numbers must increase/,
    ],
    [
      [[name(0), bytes(1, 2)], [name(1), bytes(1, 2)]],
      { size: 3 },
      /member Ref:1\/00000001 reaches byte 4, past the disk's size of 3/,
    ],
    [[[name(0), bytes(1, 2)]], { size: 4 }, /ended after 2 of the disk's 4 bytes/],
    [
      [[name(0), bytes(1, 2)]],
      { prefix: "Ref:2" },
      /expected a disk member named Ref:2\/00000000 or later, found "Ref:1\/00000000"/,
    ],
    [
      [["Ref:1/00000000.xxhash", bytes(1)]],
      {},
      /checksum member Ref:1\/00000000.xxhash comes without the data member/,
    ],
    [
      [[name(0), bytes(1), false], ["Ref:1/00000000.md5", bytes(1), false]],
      {},
      /Ref:1\/00000000 is not followed by its checksum member .*but by "Ref:1\/00000000\.md5"/,
    ],
  ];
  for (const [specs, options, want] of cases) {
    const err = await decode(await tarOf(specs), options).then(() => null, (e) => e);
    assert.ok(err instanceof CorruptImageError, `${want}: ${err}`);
    assert.match(err.message, want);
  }
});

Deno.test("XVA disk: --ignore-checksums skips wrong and missing checksum members", async () => {
  const tar = await tarOf([[name(0), bytes(1), "0"], [name(1), bytes(2), false]]);
  const { disk } = await decode(tar, { ignoreChecksums: true });
  assert.deepEqual(disk, [1, 2]);
});

Deno.test("XVA disk: members written by GNU tar (directory entry, long names) are read", async () => {
  await withTempDir(async (dir) => {
    const prefix = "Ref:" + "9".repeat(120); // a name longer than 100 bytes: GNU long name
    await Deno.mkdir(`${dir}/${prefix}`);
    const data = new Uint8Array(3000).fill(7);
    await Deno.writeFile(`${dir}/${prefix}/00000000`, data);
    const sum = (await loadChecksum("xxhash"))(data);
    await Deno.writeTextFile(`${dir}/${prefix}/00000000.xxhash`, sum);
    for (const format of ["gnu", "posix"]) {
      const r = await run("tar", [
        "-C",
        dir,
        `--format=${format}`,
        "--no-recursion",
        "-cf",
        `${dir}/${format}.tar`,
        prefix,
        `${prefix}/00000000`,
        `${prefix}/00000000.xxhash`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      const tar = await Deno.readFile(`${dir}/${format}.tar`);
      const { disk, r: res } = await decode(tar, { prefix });
      assert.equal(disk.length, 3000, format);
      assert.equal(res.verified.xxhash, 1);
    }
  });
});
