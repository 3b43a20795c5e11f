/**
 * The system's decoders through FFI (libdeflate, zlib, libzstd): the same bytes and
 * the same count of input bytes used as `node:zlib`, for every cluster size and with
 * the sector padding a stream carries after compressed data; and every input that is
 * not the plain case (corrupt, cut short, inflating past or short of the cluster, no
 * end marker) declined, so that `node:zlib` judges it. qemu-utils depends on zlib and
 * libzstd, so in CI (CI=true) those two must be found.
 */
import assert from "node:assert/strict";
import * as zlib from "node:zlib";
import { makeNativeCodecs, type NativeDecoder } from "../lib/io/native_codecs.ts";
import { makeDecompressor } from "../lib/qcow2/decompress.ts";
import { pseudoRandom } from "./helpers.ts";

const CI = Deno.env.get("CI") === "true";

/** Clusters from incompressible to all alike, of `size` bytes. */
function clusters(size: number, count: number, seed: number): Uint8Array[] {
  return Array.from({ length: count }, (_, i) => {
    const noise = pseudoRandom(size, seed + i);
    const out = new Uint8Array(size);
    const period = [1, 7, 300, 4096, size][i % 5];
    for (let at = 0; at < size; at++) out[at] = noise[at % period] & (i % 3 === 0 ? 0xff : 0x3f);
    return out;
  });
}

/** `packed` followed by `tail` bytes of the next cluster's data (as in a stream). */
function padded(packed: Uint8Array, tail: number, seed: number): Uint8Array {
  const out = new Uint8Array(packed.length + tail);
  out.set(packed);
  out.set(pseudoRandom(tail, seed), packed.length);
  return out;
}

const portable = makeDecompressor(zlib);

const deflateBackends = ["libdeflate", "zlib"].map((name) => ({
  name,
  type: 0,
  pack: (b: Uint8Array) => zlib.deflateRawSync(b),
  decoder: makeNativeCodecs({ deflate: [name], zstd: [] }).inflateRaw,
}));
const zstdBackend = {
  name: "libzstd",
  type: 1,
  pack: (b: Uint8Array) => zlib.zstdCompressSync(b),
  decoder: makeNativeCodecs({ deflate: [], zstd: ["libzstd"] }).zstd,
};

for (const { name, type, pack, decoder } of [...deflateBackends, zstdBackend]) {
  Deno.test({
    name: `native ${name}: the bytes and input used of node:zlib, every cluster size`,
    ignore: decoder === null && !(CI && name !== "libdeflate"),
    fn() {
      assert.ok(decoder, `${name} found`);
      for (const size of [512, 4096, 65536, 2 * 1024 * 1024]) {
        for (const [i, data] of clusters(size, size > 65536 ? 5 : 25, size).entries()) {
          const input = padded(pack(data), [0, 1, 200, 511][i % 4], i);
          const out = new Uint8Array(size);
          const used = decoder(input, out);
          const want = portable(input, size, type);
          assert.ok("data" in want);
          assert.deepEqual(out, data, `${size}-byte cluster ${i}`);
          assert.equal(used, want.used, `input used by ${size}-byte cluster ${i}`);
        }
      }
    },
  });

  Deno.test({
    name: `native ${name}: declines what is not the plain case`,
    ignore: decoder === null,
    fn() {
      const d = decoder as NativeDecoder;
      const data = clusters(4096, 2, 5)[1];
      const packed = pack(data);
      const out = new Uint8Array(4096);
      const declined: [string, Uint8Array, number][] = [
        ["corrupt", new Uint8Array(600).fill(0xff), 4096],
        ["cut short", packed.subarray(0, packed.length >> 1), 4096],
        ["empty", new Uint8Array(0), 4096],
        ["inflating past the cluster", pack(new Uint8Array(5000).fill(3)), 4096],
        ["short of the cluster", pack(new Uint8Array(100).fill(3)), 4096],
      ];
      for (const [what, input, size] of declined) {
        assert.equal(d(input, out.subarray(0, size)), -1, what);
      }
      // Decoding again after a declined input still works (the state is reset).
      assert.equal(d(packed, out), packed.length);
      assert.deepEqual(out, data);
    },
  });
}

Deno.test({
  name: "native deflate: data without an end marker is declined, node:zlib accepts it",
  ignore: deflateBackends.every((b) => b.decoder === null),
  fn() {
    const data = clusters(4096, 3, 9)[2];
    // Z_SYNC_FLUSH instead of Z_FINISH: the cluster's bytes, no final block.
    const input = zlib.deflateRawSync(data, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
    for (const { name, decoder } of deflateBackends) {
      if (decoder) assert.equal(decoder(input, new Uint8Array(4096)), -1, name);
    }
    const native = makeNativeCodecs();
    const out = makeDecompressor(zlib, native)(input, 4096, 0, new Uint8Array(4096));
    assert.ok("data" in out);
    assert.deepEqual(out.data, data);
  },
});

Deno.test("makeDecompressor: decodes into the given buffer, natively or through node:zlib", () => {
  const data = clusters(65536, 2, 11)[1];
  for (const type of [0, 1]) {
    const input = padded(
      type === 0 ? zlib.deflateRawSync(data) : zlib.zstdCompressSync(data),
      9,
      1,
    );
    for (const native of [makeNativeCodecs(), undefined]) {
      const into = new Uint8Array(65536);
      const out = makeDecompressor(zlib, native)(input, 65536, type, into);
      assert.ok("data" in out);
      assert.equal(out.data, into);
      assert.deepEqual(into, data);
    }
  }
});

Deno.test("native codecs: none without --allow-ffi", async () => {
  const code = `import { makeNativeCodecs } from ${
    JSON.stringify(
      new URL("../lib/io/native_codecs.ts", import.meta.url).href,
    )
  }; console.log(JSON.stringify(makeNativeCodecs().names));`;
  const narrow = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "-"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = narrow.stdin.getWriter();
  await w.write(new TextEncoder().encode(code));
  await w.close();
  const r = await narrow.output();
  assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
  assert.deepEqual(JSON.parse(new TextDecoder().decode(r.stdout)), { deflate: null, zstd: null });
});
