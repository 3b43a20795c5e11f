import { setFlagsFromString } from "node:v8";
if (Deno.args[0] === "flag") setFlagsFromString("--no-liftoff");
const { default: xxhash } = await import("xxhash-wasm");
const t0 = performance.now();
const { h64Raw } = await xxhash();
console.log("init ms", (performance.now() - t0).toFixed(1));
const buf = new Uint8Array(1 << 20);
crypto.getRandomValues(buf.subarray(0, 65536));
for (let i = 65536; i < buf.length; i += 65536) buf.copyWithin(i, 0, 65536);
const times: number[] = [];
for (let i = 0; i < 200; i++) {
  const t = performance.now();
  h64Raw(buf, 0n);
  times.push(performance.now() - t);
}
for (let i = 0; i < 200; i += 25) console.log(i, times.slice(i, i + 25).reduce((a, b) => a + b, 0).toFixed(1), "ms / 25 MiB");
