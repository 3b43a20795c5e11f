import assert from "node:assert/strict";
import { formatAllocation, parseAllocation } from "../lib/alloc/allocation.ts";
import { ClusterSet } from "../lib/alloc/cluster_set.ts";
import { UsageError } from "../lib/errors.ts";
import { parseSize } from "../lib/size.ts";
import { runCli } from "./helpers.ts";

Deno.test("parseSize accepts suffixes and rejects junk", () => {
  assert.equal(parseSize("512"), 512);
  assert.equal(parseSize("64K"), 65536);
  assert.equal(parseSize("2MiB"), 2 ** 21);
  assert.equal(parseSize("1g"), 2 ** 30);
  assert.throws(() => parseSize("12Q"), UsageError);
  assert.throws(() => parseSize("-1"), UsageError);
});

Deno.test("ClusterSet: add, ranges, runs, iteration, count", () => {
  const s = new ClusterSet(100, 65536);
  s.addRange(3, 70);
  s.add(90);
  s.add(90);
  s.add(200); // out of range: ignored
  assert.equal(s.count, 69);
  assert.deepEqual([...s.runs()], [[3, 70], [90, 90]]);
  assert.equal([...s].length, 69);
  s.delete(10);
  assert.deepEqual([...s.runs()], [[3, 9], [11, 70], [90, 90]]);
});

Deno.test("ClusterSet.remap rounds partial clusters up, both ways", () => {
  const big = new ClusterSet(16, 2 ** 21); // 2 MiB blocks of a 32 MiB + 512 disk
  big.add(1);
  const small = big.remap(65536, 16 * 2 ** 21);
  assert.deepEqual([...small.runs()], [[32, 63]]);
  const back = small.remap(2 ** 21, 16 * 2 ** 21);
  assert.deepEqual([...back], [1]);
  const odd = new ClusterSet(3, 1000);
  odd.add(1); // bytes 1000..1999
  assert.deepEqual([...odd.remap(512, 3000)], [1, 2, 3]);
});

Deno.test("allocation JSON: the three shapes parse to the same clusters", () => {
  const legacy = '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[0,1,2,13,14,15]}';
  const interval = '{"virtual_size":33562624,"cluster_bits":21,"data_clusters":[[0,2],[13,15]]}';
  const a = parseAllocation(legacy, 2 ** 21);
  const b = parseAllocation(interval, 2 ** 21);
  assert.equal(formatAllocation(a), interval);
  assert.equal(formatAllocation(b, true), legacy);
  const map = JSON.stringify([
    { start: 0, length: 3 * 2 ** 21, depth: 0, present: true, zero: false, data: true },
    { start: 3 * 2 ** 21, length: 10 * 2 ** 21, depth: 0, present: false, zero: true, data: false },
    { start: 13 * 2 ** 21, length: 3 * 2 ** 21, depth: 0, present: true, zero: false, data: true },
    { start: 16 * 2 ** 21, length: 8192, depth: 0, present: false, zero: true, data: false },
  ]);
  assert.equal(formatAllocation(parseAllocation(map, 2 ** 21)), interval);
});

Deno.test("allocation JSON: the final partial cluster of a qemu-img map is kept", () => {
  // 100000 bytes at 64 KiB clusters: cluster 1 is partial (34464 bytes).
  const map =
    '[{"start":0,"length":65536,"data":false},{"start":65536,"length":34464,"data":true}]';
  const a = parseAllocation(map, 65536);
  assert.equal(a.virtualSize, 100000);
  assert.deepEqual([...a.clusters], [1]);
});

Deno.test("allocation JSON: bad input is refused with a message", () => {
  assert.throws(() => parseAllocation("{", 65536), /not valid JSON/);
  assert.throws(() => parseAllocation('{"virtual_size":1}', 65536), /cluster_bits/);
  assert.throws(
    () => parseAllocation('{"virtual_size":65536,"cluster_bits":16,"data_clusters":[5]}', 65536),
    /past the end/,
  );
  assert.throws(
    () =>
      parseAllocation('{"virtual_size":65536,"cluster_bits":16,"data_clusters":[[1,0]]}', 65536),
    /data_clusters\[0\]/,
  );
});

Deno.test("cli: unknown command and no command are usage errors (exit 2)", async () => {
  const r = await runCli(["frobnicate"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /diskstream:/);
  const h = await runCli(["--help"]);
  assert.equal(h.code, 0);
});
