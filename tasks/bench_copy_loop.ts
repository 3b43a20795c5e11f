/**
 * The benchmark's practical limit for a Deno pipe writer: copy FILE to stdout in 4 MiB
 * reads and writes, nothing else. `deno run --allow-read tasks/bench_copy_loop.ts FILE`.
 *
 * @module
 */
const CHUNK = 4 * 1024 * 1024;

async function main(path: string): Promise<void> {
  using file = await Deno.open(path, { read: true });
  const buf = new Uint8Array(CHUNK);
  for (;;) {
    const n = await file.read(buf);
    if (n === null) break;
    let off = 0;
    while (off < n) off += await Deno.stdout.write(buf.subarray(off, n));
  }
}

if (import.meta.main) {
  const path = Deno.args[0];
  if (path === undefined) {
    console.error("usage: bench_copy_loop.ts FILE");
    Deno.exit(2);
  }
  await main(path);
}
