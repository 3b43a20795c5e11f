/**
 * The worker threads that decompress qcow2 clusters: the same bytes as the main
 * thread, in batches, errors with their stream offsets, and the deferred writes that
 * wait for them in order.
 */
import assert from "node:assert/strict";
import { deflateRawSync, zstdCompressSync } from "node:zlib";
import { DecompressPool, DeferredWrites } from "../lib/qcow2/decompress_pool.ts";
import { decompressCluster } from "../lib/qcow2/decompress.ts";
import { CorruptImageError } from "../lib/errors.ts";
import type { ImageTarget } from "../lib/io/endpoint.ts";
import { pseudoRandom } from "./helpers.ts";

const CS = 65536;

/** A compressible cluster: pseudo-random words repeated. */
function cluster(seed: number): Uint8Array {
  const words = pseudoRandom(512, seed);
  const out = new Uint8Array(CS);
  for (let at = 0; at < CS; at += 512) out.set(words.subarray(0, 512 - (at % 7)), at);
  return out;
}

for (
  const [name, type, pack] of [["deflate", 0, deflateRawSync], [
    "zstd",
    1,
    zstdCompressSync,
  ]] as const
) {
  Deno.test(`decompress pool (${name}): workers give the main thread's bytes, in batches`, async () => {
    const pool = new DecompressPool(CS, type, 2);
    try {
      assert.equal(await pool.whenReady(), 2);
      const clusters = Array.from({ length: 100 }, (_, i) => cluster(i + 1));
      const jobs = clusters.map((c, i) => {
        // Sector padding after the compressed data, as in a stream.
        const packed = pack(c);
        const input = new Uint8Array(packed.length + 300);
        input.set(packed);
        return pool.decompress(input, i * 1000, i);
      });
      pool.send();
      const out = await Promise.all(jobs);
      out.forEach((data, i) => assert.deepEqual(data, clusters[i], `cluster ${i}`));
      assert.ok(pool.counts.workers > 0, "the workers took part");
      assert.equal(pool.counts.workers + pool.counts.main, 100);
    } finally {
      pool.close();
    }
  });
}

Deno.test("decompress pool: corrupt data is refused with its stream offset, like on the main thread", async () => {
  const pool = new DecompressPool(CS, 0, 1);
  try {
    assert.equal(await pool.whenReady(), 1);
    const good = pool.decompress(deflateRawSync(cluster(9)), 0, 0);
    const bad = new Uint8Array(600).fill(0xff);
    const refused = pool.decompress(bad.slice(), 123456, 7);
    const short = pool.decompress(deflateRawSync(new Uint8Array(100)), 777, 8);
    pool.send();
    assert.deepEqual(await good, cluster(9));
    let main: unknown;
    try {
      new DecompressPool(CS, 0, 0).decompressHere(bad, 123456, 7);
    } catch (err) {
      main = err;
    }
    await assert.rejects(refused, (err) => {
      assert.ok(err instanceof CorruptImageError);
      assert.equal(err.offset, 123456);
      assert.match(
        err.message,
        /^the compressed data of guest cluster 7 \(guest offset 458752\) is not valid deflate data: .+ \(at byte offset 123456\)$/,
      );
      assert.equal(err.message, (main as Error).message);
      return true;
    });
    await assert.rejects(
      short,
      /guest cluster 8 .*decompresses to 100 bytes \(from \d+\), less than the 65536-byte cluster/,
    );
  } finally {
    pool.close();
  }
});

Deno.test("decompress pool: without workers the main thread does the work", async () => {
  const pool = new DecompressPool(CS, 1, 0);
  try {
    assert.equal(await pool.whenReady(), 0);
    const c = cluster(3);
    assert.deepEqual(await pool.decompress(zstdCompressSync(c), 0, 0), c);
    assert.deepEqual(pool.counts, { workers: 0, main: 1 });
  } finally {
    pool.close();
  }
});

Deno.test("deferred writes: written in the order queued, counted as queued until flushed", async () => {
  const writes: [number, number][] = [];
  let flushed = 0;
  const target: ImageTarget = {
    write: (offset, bytes, from) => writes.push([offset, bytes[from]]),
    zero: () => {},
    flush: () => (flushed++, Promise.resolve()),
    queued: 0,
  };
  let sent = 0;
  const released: number[] = [];
  const deferred = new DeferredWrites(target, 512, {
    beforeWait: () => sent++,
    written: (b) => released.push(b[0]),
  });
  const later = Promise.withResolvers<Uint8Array>();
  deferred.defer(later.promise, (b) => target.write(0, b, 0, 1));
  deferred.defer(Promise.resolve(new Uint8Array([2])), (b) => target.write(512, b, 0, 1));
  assert.equal(deferred.queued, 1024);
  const flushing = deferred.flush();
  setTimeout(() => later.resolve(new Uint8Array([1])), 10);
  await flushing;
  assert.deepEqual(writes, [[0, 1], [512, 2]]);
  assert.deepEqual(released, [1, 2]);
  assert.equal(sent, 1);
  assert.equal(flushed, 1);
  assert.equal(deferred.queued, 0);
  deferred.defer(Promise.reject(new CorruptImageError("bad", 5)), () => {});
  await assert.rejects(deferred.flush(), CorruptImageError);
});

Deno.test("zstd data that overflows its cluster keeps the first cluster; a bomb is refused", () => {
  const data = pseudoRandom(CS + 1, 21);
  assert.deepEqual(decompressCluster(zstdCompressSync(data), CS, 1, 0).data, data.subarray(0, CS));
  const bomb = zstdCompressSync(new Uint8Array(64 * 1024 * 1024));
  assert.throws(() => decompressCluster(bomb, CS, 1, 4096), CorruptImageError);
});

Deno.test("decompress pool: released batches are reused, later batches stay right", async () => {
  const pool = new DecompressPool(CS, 0, 1);
  try {
    assert.equal(await pool.whenReady(), 1);
    for (let round = 0; round < 4; round++) {
      const clusters = Array.from({ length: 40 }, (_, i) => cluster(round * 100 + i + 1));
      const jobs = clusters.map((c, i) => pool.decompress(deflateRawSync(c), i, i));
      pool.send();
      const out = await Promise.all(jobs);
      out.forEach((data, i) => assert.deepEqual(data, clusters[i], `round ${round}, cluster ${i}`));
      for (const data of out) pool.release(data);
    }
    assert.ok(pool.counts.workers > 0);
  } finally {
    pool.close();
  }
});
