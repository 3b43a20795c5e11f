/**
 * Allocation hints are checked before they are trusted: types, integer ranges, order,
 * overlap and the disk size, before any bitmap is sized from them (issue 8, item 3).
 * Each class of bad hint is refused naming the entry; valid JSON that is not an
 * allocation is called that, not "not a qcow2 or VHD image".
 */
import assert from "node:assert/strict";
import { parseAllocation } from "../lib/alloc/allocation.ts";
import { resolveAllocationSpec } from "../lib/headers/allocation_spec.ts";
import { runCli, withTempDir, writeSparse } from "./helpers.ts";

const SIZE = 1 << 20;
const obj = (bits: number, list: unknown, size: unknown = SIZE) =>
  JSON.stringify({ virtual_size: size, cluster_bits: bits, data_clusters: list });
const ext = (start: unknown, length: unknown, data: unknown) => ({ start, length, data });

Deno.test("hint: the legacy list and intervals are refused entry by entry", () => {
  const cases: [string, RegExp][] = [
    [obj(16, [3, 1]), /data_clusters\[1\] \(cluster 1\) is not after cluster 3/],
    [obj(16, [2, 2]), /data_clusters\[1\].*without overlaps or repeats/],
    [obj(16, [[0, 5], [3, 8]]), /data_clusters\[1\] \(cluster 3\) is not after cluster 5/],
    [obj(16, [[4, 5], [0, 1]]), /data_clusters\[1\].*ascending order/],
    [obj(16, [[5, 2]]), /data_clusters\[0\] \[5, 2\] ends before it starts/],
    [obj(16, [[1]]), /data_clusters\[0\] must be a \[first, last\] pair/],
    [obj(16, [[1, 2], 3]), /data_clusters\[1\] must be a \[first, last\] pair/],
    [obj(16, [1, [2, 3]]), /data_clusters\[1\] is a pair but the list holds cluster numbers/],
    [obj(16, ["3"]), /data_clusters\[0\] is not a cluster number/],
    [obj(16, [1.5]), /data_clusters\[0\] is not a cluster number/],
    [obj(16, [-1]), /data_clusters\[0\] is not a cluster number/],
    [obj(16, [true]), /data_clusters\[0\] is not a cluster number/],
    [obj(16, [2 ** 52]), /data_clusters\[0\] names cluster 4503599627370496, past the end/],
    [obj(16, [16]), /data_clusters\[0\] names cluster 16, past the end/],
    [obj(16, "0-3"), /"data_clusters" must be a list, not the string "0-3"/],
    [obj(16, null), /"data_clusters" must be a list, not null/],
    [obj(8, []), /"cluster_bits" must be an integer from 9 to 30, not number 8/],
    [obj(31, []), /"cluster_bits"/],
    [obj(16.5, []), /"cluster_bits"/],
    [obj(16, [], "1048576"), /"virtual_size" must be a non-negative integer, not the string/],
    [obj(16, [], -512), /"virtual_size"/],
    [obj(16, [], 1e300), /"virtual_size"/],
  ];
  for (const [text, re] of cases) {
    assert.throws(() => parseAllocation(text, 65536, "hint"), re, text);
  }
});

Deno.test("hint: qemu-img map entries are refused by index (types, order, gaps, overlap)", () => {
  const map = (...e: unknown[]) => JSON.stringify(e);
  const cases: [string, RegExp][] = [
    [map(ext(0, SIZE, "true")), /entry 0: "data" must be true or false, not the string "true"/],
    [map(ext(0, SIZE, 1)), /entry 0: "data" must be true or false, not number 1/],
    [map({ start: 0, length: SIZE }), /entry 0: "data" must be true or false, not undefined/],
    [map(ext(0, 512, false), ext(512, "512", true)), /entry 1: "start" must be .* "512"/],
    [map(ext(0, 512, false), ext(1024, 512, true)), /entry 1 starts at 1024 but .* end at 512/],
    [map(ext(0, 1024, false), ext(512, 512, true)), /entry 1 starts at 512 but .* end at 1024/],
    [map(ext(512, 512, true), ext(0, 512, true)), /entry 0 starts at 512 but .* end at 0/],
    [map(ext(0, -512, true)), /entry 0: "start" must be/],
    [map(ext(0, 0, true)), /entry 0: "start" must be .* positive/],
    [map(ext(0, 2 ** 52, true), ext(2 ** 52, 2 ** 52, true)), /entry 1 ends past 2\^53/],
    [map(null), /entry 0 is null, not a qemu-img map extent/],
    [map(42), /entry 0 is number 42, not a qemu-img map extent/],
    [map([0, 1]), /entry 0 is a list, not a qemu-img map extent/],
  ];
  for (const [text, re] of cases) {
    assert.throws(() => parseAllocation(text, 65536, "hint"), re, text);
  }
  // With qemu-img info: the extents must stay within the disk.
  assert.throws(
    () => parseAllocation(map(ext(0, SIZE * 2, true)), 65536, "hint", { "virtual-size": SIZE }),
    /extents end at 2097152, past the virtual size 1048576/,
  );
  // A map that is fine.
  const ok = parseAllocation(map(ext(0, 65536, false), ext(65536, SIZE - 65536, true)), 65536);
  assert.equal(ok.clusters.count, 15);
});

Deno.test("hint: valid JSON that is not an allocation says so", () => {
  for (const text of ["null", "42", '"x"', "true"]) {
    assert.throws(
      () => parseAllocation(text, 65536, "hint"),
      /is not an allocation: expected an object/,
      text,
    );
  }
});

Deno.test("hint: the disk size is compared before any bitmap is sized from the hint", () => {
  const start = performance.now();
  for (const size of [2 ** 49, 2 ** 52, 2 ** 53 - 512]) {
    assert.throws(
      () => parseAllocation(obj(9, [[0, 2 ** 30]], size), 512, "hint", undefined, SIZE),
      /describes a disk of \d+ bytes but the disk has 1048576 bytes/,
    );
  }
  assert.throws(
    () => parseAllocation(JSON.stringify([ext(0, 2 ** 52, true)]), 512, "hint", undefined, SIZE),
    /describes a disk of 4503599627370496 bytes/,
  );
  // Refused in moments, not seconds: nothing was allocated.
  assert.ok(performance.now() - start < 1000);
  // The size rounded up to 512 is the same disk.
  const a = parseAllocation(obj(16, [0], SIZE + 512), 65536, "hint", undefined, SIZE + 100);
  assert.equal(a.clusters.count, 1);
});

Deno.test("hint: files and the command line refuse each class with one line", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, SIZE, [[0, new Uint8Array(4096).fill(7)]]);
    const hint = `${dir}/hint.json`;
    const cases: [string, RegExp, string[]?][] = [
      ["null", /null is not an allocation/],
      ["42\n", /number 42 is not an allocation/],
      [JSON.stringify([ext(0, SIZE, "true")]), /entry 0: "data" must be true or false/],
      [JSON.stringify([ext(0, SIZE, 1)]), /entry 0: "data" must be true or false/],
      [obj(9, [], 2 ** 49), /describes a disk of 562949953421312 bytes but the disk has/, [
        "-c",
        "512",
      ]],
      [obj(9, [[0, 3]], 2 ** 52), /describes a disk of 4503599627370496 bytes/, ["-c", "512"]],
      [obj(16, [[0, 3], [2, 4]]), /data_clusters\[1\] \(cluster 2\) is not after cluster 3/],
    ];
    for (const [text, re, extra] of cases) {
      await Deno.writeTextFile(hint, text);
      const r = await runCli([
        "export",
        src,
        "--allocation",
        hint,
        ...(extra ?? []),
        "-o",
        `${dir}/out.qcow2`,
      ]);
      assert.equal(r.code, 1, `${text}: ${r.stderr}`);
      assert.match(r.stderr, /^diskstream: allocation [^\n]+\n$/, text);
      assert.match(r.stderr, re, text);
      assert.doesNotMatch(r.stderr, /qcow2 or VHD|internal error/, text);
    }
    // The same through a descriptor (a pipe is read once, as JSON).
    const r = await runCli(["export", src, "--allocation", "fd:0", "-o", `${dir}/o.qcow2`], {
      stdin: "null",
    });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /null is not an allocation/);
  });
});

Deno.test("hint: an image used as a hint must describe the same disk", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, SIZE, [[0, new Uint8Array(4096).fill(7)]]);
    const other = `${dir}/other.raw`;
    await writeSparse(other, 2 * SIZE, [[0, new Uint8Array(4096).fill(7)]]);
    const r = await runCli(["export", other, "-o", `${dir}/other.qcow2`]);
    assert.equal(r.code, 0, r.stderr);
    await assert.rejects(
      () => resolveAllocationSpec(`${dir}/other.qcow2`, 65536, undefined, SIZE),
      /the image describes a disk of 2097152 bytes but the disk has 1048576 bytes/,
    );
  });
});
