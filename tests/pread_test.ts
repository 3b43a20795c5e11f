/**
 * Positional reads through FFI (lib/io/pread.ts) and a file source's synchronous reads
 * that use them: the bytes at every offset, the end of the file, a path replaced
 * after the file was opened (never read), zeros past the limit, a source that shrank
 * (named).
 */
import assert from "node:assert/strict";
import { openPositionalReader } from "../lib/io/pread.ts";
import { openDiskSource } from "../lib/io/disk_source.ts";
import { pseudoRandom, withTempDir } from "./helpers.ts";

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
