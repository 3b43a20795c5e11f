/**
 * Positional reads through FFI (lib/io/pread.ts) and a file source's synchronous reads
 * that use them: the bytes at every offset, the end of the file, a path replaced
 * after the file was opened (never read), zeros past the limit, a source that shrank
 * (named); batched reads through io_uring (lib/io/uring.ts) against single ones.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { openPositionalReader } from "../lib/io/pread.ts";
import { BATCH_READS, openReadRing } from "../lib/io/uring.ts";
import { openDiskSource } from "../lib/io/disk_source.ts";
import { pseudoRandom, withTempDir, writeSparse } from "./helpers.ts";

Deno.test("pread: the bytes at any offset, short at the end of the file", async () => {
  await withTempDir(async (dir) => {
    const data = pseudoRandom(300_001, 5);
    await Deno.writeFile(`${dir}/d.raw`, data);
    using file = await Deno.open(`${dir}/d.raw`);
    const reader = openPositionalReader(`${dir}/d.raw`, file);
    assert.ok(reader, "FFI is granted in the tests");
    for (
      const [at, len] of [[0, 4096], [1, 7], [65_536, 100_000], [299_000, 1001], [299_999, 10]]
    ) {
      const buf = new Uint8Array(len);
      const n = reader.read(buf, at);
      assert.equal(n, Math.min(len, data.length - at));
      assert.deepEqual(buf.subarray(0, n), data.subarray(at, at + n));
    }
    assert.equal(reader.read(new Uint8Array(8), data.length), 0);
    reader.close();
    assert.throws(() => reader.read(new Uint8Array(1), 0), /after close/);
  });
});

Deno.test("pread: a path replaced after the file was opened is not read", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(4096).fill(1));
    using file = await Deno.open(`${dir}/d.raw`);
    await Deno.rename(`${dir}/d.raw`, `${dir}/old.raw`);
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(4096).fill(2));
    assert.equal(openPositionalReader(`${dir}/d.raw`, file), null);
  });
});

Deno.test("file source: synchronous reads give the file's bytes, zeros past the limit, and name a shrink", async () => {
  await withTempDir(async (dir) => {
    const data = pseudoRandom(1 << 20, 9);
    await Deno.writeFile(`${dir}/d.raw`, data);
    const src = await openDiskSource(`${dir}/d.raw`);
    try {
      const buf = new Uint8Array(8192);
      src.readAtSync!(buf, 12_345);
      assert.deepEqual(buf, data.subarray(12_345, 12_345 + 8192));
      src.readAtSync!(buf, data.length - 100); // past the size: zeros
      assert.deepEqual(buf.subarray(0, 100), data.subarray(data.length - 100));
      assert.ok(buf.subarray(100).every((b) => b === 0));
      await Deno.truncate(`${dir}/d.raw`, 4096);
      assert.throws(
        () => src.readAtSync!(buf, 0, 1 << 20),
        /d\.raw ended at byte 4096 while 1048576 bytes were expected: the source shrank/,
      );
    } finally {
      src.close();
    }
  });
});

/**
 * True where this process may use io_uring, asked independently of lib/io/uring.ts: a
 * Python child calls io_uring_setup(2) (the sysctl, a seccomp filter or the kernel may
 * refuse it).
 */
async function uringAllowed(): Promise<boolean> {
  const script = "import ctypes,sys\n" +
    "libc = ctypes.CDLL(None, use_errno=True)\n" +
    "params = (ctypes.c_uint32 * 30)()\n" +
    "sys.exit(0 if libc.syscall(425, 8, params) >= 0 else 1)\n";
  const { code } = await new Deno.Command("python3", { args: ["-c", script] }).output();
  return code === 0;
}

Deno.test("pread: batched reads give the bytes of single reads, short at the end, an errno for a bad descriptor", async () => {
  await withTempDir(async (dir) => {
    const data = pseudoRandom(300_001, 6);
    await Deno.writeFile(`${dir}/d.raw`, data);
    using file = await Deno.open(`${dir}/d.raw`);
    const reader = openPositionalReader(`${dir}/d.raw`, file)!;
    const positions = new Float64Array([0, 1, 65_536, 299_000, 299_999, 300_001, 5, 0]);
    const length = 4096;
    const into = new Uint8Array(positions.length * length).fill(0xee);
    const results = new Int32Array(positions.length);
    const batched = reader.readMany(into, length, positions, positions.length, results);
    assert.equal(batched, await uringAllowed(), "io_uring is used wherever the kernel allows it");
    if (batched) {
      positions.forEach((at, i) => {
        const n = Math.max(0, Math.min(length, data.length - at));
        assert.equal(results[i], n, `read ${i} at ${at}`);
        assert.deepEqual(into.subarray(i * length, i * length + n), data.subarray(at, at + n));
      });
    }
    reader.close();
    assert.throws(() => reader.readMany(into, length, positions, 1, results), /after close/);
    const ring = openReadRing(4);
    if (ring) {
      ring.read(-1, into, 16, [0, 16], 2, results);
      assert.deepEqual([...results.subarray(0, 2)], [-9, -9]); // EBADF each, nothing thrown
      assert.throws(() => ring.read(-1, into, 16, [0, 1, 2, 3, 4], 5, results), RangeError);
      ring.close();
      assert.throws(() => ring.read(-1, into, 16, [0], 1, results), /after close/);
    }
  });
});

Deno.test("file source: many reads at once give the bytes of one at a time, zeros past the limit, and name a shrink", async () => {
  await withTempDir(async (dir) => {
    const data = pseudoRandom(3 << 20, 10);
    await Deno.writeFile(`${dir}/d.raw`, data);
    const src = await openDiskSource(`${dir}/d.raw`);
    try {
      const count = BATCH_READS * 2 + 3; // more than a batch
      const positions = new Float64Array(count).map((_, i) => i * 12_289);
      const length = 4096;
      const into = new Uint8Array(count * length).fill(0xee);
      src.readManySync!(into, length, positions, count, 2 << 20);
      const one = new Uint8Array(length);
      positions.forEach((at, i) => {
        src.readAtSync!(one, at, 2 << 20);
        assert.deepEqual(into.subarray(i * length, (i + 1) * length), one, `read ${i} at ${at}`);
      });
      assert.ok(into.subarray((count - 1) * length).every((b) => b === 0), "past the limit: zeros");
      await Deno.truncate(`${dir}/d.raw`, 8192);
      assert.throws(
        () => src.readManySync!(into, length, positions, count, 3 << 20),
        /d\.raw ended at byte 12289 while 3145728 bytes were expected: the source shrank/,
      );
    } finally {
      src.close();
    }
  });
});

Deno.test("pread: batched reads past 2^32 and 2^40 (a sparse file), into slots at an odd address, batch after batch around the ring", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/big.raw`;
    const island = 65_536;
    const size = 2 ** 40 + 2 ** 33 + 1000;
    // Data islands across 2^32 and 2^40 and at the end (offsets whose high 32 bits count).
    const starts = [
      0,
      2 ** 32 - island / 2,
      2 ** 40 - island / 2,
      2 ** 40 + 2 ** 32,
      size - island,
    ];
    const islands = starts.map((at, k): [number, Uint8Array] => [at, pseudoRandom(island, 20 + k)]);
    await writeSparse(path, size, islands);
    const expected = (at: number, length: number) => {
      const out = new Uint8Array(Math.max(0, Math.min(length, size - at)));
      for (const [start, bytes] of islands) {
        const lo = Math.max(at, start);
        const hi = Math.min(at + out.length, start + island);
        if (lo < hi) out.set(bytes.subarray(lo - start, hi - start), lo - at);
      }
      return out;
    };
    using file = await Deno.open(path);
    const reader = openPositionalReader(path, file)!;
    const results = new Int32Array(BATCH_READS);
    const raw = new Uint8Array(BATCH_READS * 4096 + 8);
    const bytes = Buffer.from(raw.buffer);
    const untouched = Buffer.alloc(raw.length, 0xee);
    if (!reader.readMany(raw, 1, [0], 1, results)) {
      assert.equal(await uringAllowed(), false, "io_uring is used wherever the kernel allows it");
      return reader.close();
    }
    let x = 12_345;
    const random = (n: number) => (x = (x * 1_103_515_245 + 12_345) % 2 ** 31) % n;
    // 1000 batches of 1 to 256 reads: the 256-entry ring goes round hundreds of times.
    for (let batch = 0; batch < 1000; batch++) {
      const length = [512, 4096, 1000, 1][batch % 4];
      const count = 1 + random(BATCH_READS);
      const positions = new Float64Array(count).map(() => {
        const [start] = islands[random(islands.length)];
        return Math.max(0, Math.min(size + 10, start - 5000 + random(island + 10_000)));
      });
      raw.fill(0xee);
      const into = raw.subarray(3, 3 + count * length); // an odd address
      assert.ok(reader.readMany(into, length, positions, count, results));
      for (let i = 0; i < count; i++) {
        const want = expected(positions[i], length);
        const what = `batch ${batch} read ${i} at ${positions[i]}`;
        assert.equal(results[i], want.length, what);
        const slot = bytes.subarray(3 + i * length, 3 + (i + 1) * length);
        assert.ok(slot.subarray(0, want.length).equals(want), what);
        assert.ok(
          slot.subarray(want.length).equals(untouched.subarray(0, length - want.length)),
          `${what}: past its end`,
        );
      }
      assert.ok(bytes.subarray(0, 3).equals(untouched.subarray(0, 3)), "before the slots");
      const after = bytes.subarray(3 + count * length);
      assert.ok(after.equals(untouched.subarray(0, after.length)), "after the slots");
    }
    reader.close();
  });
});
