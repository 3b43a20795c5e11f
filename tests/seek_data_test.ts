import assert from "node:assert/strict";
import { dataExtents } from "../lib/io/seek_data.ts";
import { pseudoRandom, run, withTempDir, writeSparse } from "./helpers.ts";

const MiB = 1024 * 1024;

function extentsOf(path: string, size: number): [number, number][] {
  const e = dataExtents(path, size);
  assert.ok(e !== null, "SEEK_DATA should be available with --allow-ffi on Linux");
  return [...e];
}

/** Asserts the extents are ordered, disjoint, within size, cover `written`, and not much else. */
function checkExtents(
  extents: [number, number][],
  size: number,
  written: [number, number][],
): void {
  let prev = 0;
  for (const [s, e] of extents) {
    assert.ok(s >= prev && e > s && e <= size, `bad extent [${s}, ${e}) in ${extents}`);
    prev = e;
  }
  for (const [ws, we] of written) {
    assert.ok(
      extents.some(([s, e]) => s <= ws && e >= we),
      `written [${ws}, ${we}) not covered by ${JSON.stringify(extents)}`,
    );
  }
  // No whole untouched megabyte may be reported as data.
  for (let m = 0; m + MiB <= size; m += MiB) {
    const touched = written.some(([ws, we]) => ws < m + MiB && we > m);
    if (touched) continue;
    const covered = extents.some(([s, e]) => s <= m && e >= m + MiB);
    assert.ok(!covered, `untouched MiB at ${m} reported as data: ${JSON.stringify(extents)}`);
  }
}

Deno.test("dataExtents finds data at various offsets of a sparse file", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/sparse`;
    const size = 64 * MiB + 1000; // the last 4K block is partial
    const writes: [number, Uint8Array][] = [
      [0, pseudoRandom(4096, 1)],
      [5 * MiB + 123, pseudoRandom(10_000, 2)],
      [20 * MiB, pseudoRandom(3 * MiB, 3)],
      [40 * MiB - 10, pseudoRandom(20, 4)], // straddles a megabyte boundary
      [size - 500, pseudoRandom(500, 5)], // in the last partial block
    ];
    await writeSparse(path, size, writes);
    const written = writes.map(([o, b]) => [o, o + b.length] as [number, number]);
    const extents = extentsOf(path, size);
    checkExtents(extents, size, written);
    assert.equal(extents.at(-1)![1], size, "the last extent ends at the file's size");
  });
});

Deno.test("dataExtents of an all-hole file is empty, of an empty file too", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/holes`, 1024 * MiB);
    assert.deepEqual(extentsOf(`${dir}/holes`, 1024 * MiB), []);
    await writeSparse(`${dir}/empty`, 0);
    assert.deepEqual(extentsOf(`${dir}/empty`, 0), []);
  });
});

Deno.test("dataExtents of a dense file is one extent", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/dense`;
    await Deno.writeFile(path, pseudoRandom(3 * MiB + 7, 9));
    assert.deepEqual(extentsOf(path, 3 * MiB + 7), [[0, 3 * MiB + 7]]);
  });
});

Deno.test("dataExtents clips to the size it is given", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/sparse`;
    await writeSparse(path, 16 * MiB, [[2 * MiB, pseudoRandom(2 * MiB)], [
      10 * MiB,
      pseudoRandom(4096),
    ]]);
    const extents = extentsOf(path, 3 * MiB);
    checkExtents(extents, 3 * MiB, [[2 * MiB, 3 * MiB]]);
    assert.equal(extents.length, 1);
    assert.equal(extents[0][1], 3 * MiB);
    // A size past the end of the file: nothing beyond the file's data.
    const longer = extentsOf(path, 32 * MiB);
    checkExtents(longer, 16 * MiB, [[2 * MiB, 4 * MiB], [10 * MiB, 10 * MiB + 4096]]);
  });
});

Deno.test("dataExtents can be iterated twice and broken off", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/sparse`;
    await writeSparse(path, 8 * MiB, [[0, pseudoRandom(4096)], [4 * MiB, pseudoRandom(4096)]]);
    // Descriptors open on this test's file (other test files run in this process too).
    const openFds = () =>
      [...Deno.readDirSync("/proc/self/fd")].filter((e) => {
        try {
          return Deno.readLinkSync(`/proc/self/fd/${e.name}`) === path;
        } catch {
          return false; // closed meanwhile
        }
      }).length;
    const before = openFds();
    const e = dataExtents(path, 8 * MiB)!;
    assert.deepEqual([...e], [...e]);
    assert.equal([...e].length, 2);
    for (const _ of e) {
      assert.equal(openFds(), before + 1, "the file is open while iterating");
      break;
    }
    assert.equal(openFds(), before, "every descriptor is closed");
  });
});

Deno.test("dataExtents returns null for what is not a regular file", async () => {
  await withTempDir((dir) => {
    assert.equal(dataExtents(dir, 0), null);
    assert.equal(dataExtents(`${dir}/missing`, 10), null);
    assert.equal(dataExtents("/dev/null", 0), null);
    return Promise.resolve();
  });
});

Deno.test("dataExtents returns null without the ffi permission", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/f`;
    await writeSparse(path, MiB, [[0, pseudoRandom(10)]]);
    const code = `import { dataExtents } from ${
      JSON.stringify(
        new URL("../lib/io/seek_data.ts", import.meta.url).href,
      )
    };
console.log(JSON.stringify(dataExtents(${JSON.stringify(path)}, ${MiB})));`;
    const script = `${dir}/probe.ts`;
    await Deno.writeTextFile(script, code);
    const denied = await run(Deno.execPath(), [
      "run",
      "--no-config",
      "--allow-read",
      "--deny-ffi",
      script,
    ]);
    assert.equal(denied.code, 0, denied.stderr);
    assert.equal(new TextDecoder().decode(denied.stdout).trim(), "null");
    const granted = await run(Deno.execPath(), ["run", "--no-config", "-A", script]);
    assert.equal(granted.code, 0, granted.stderr);
    assert.notEqual(new TextDecoder().decode(granted.stdout).trim(), "null");
  });
});
