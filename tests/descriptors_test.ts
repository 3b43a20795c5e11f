/**
 * Only descriptors the caller passed: `--output-fd`, `--input-fd`, `fd:N` hints and
 * the drop-ins' descriptor flags refuse a descriptor this process did not inherit
 * (the runtime's own files, which have close-on-exec set) or that is not open.
 */
import assert from "node:assert/strict";
import { CLI, pseudoRandom, run, withTempDir, writeSparse } from "./helpers.ts";
import { inheritedFd } from "../lib/io/descriptor.ts";
import { resolveAllocationSpec } from "../lib/headers/allocation_spec.ts";
import { UsageError } from "../lib/errors.ts";

/**
 * Runs the CLI from a shell that closed descriptors 3–9 first, so the runtime's own
 * files (its event loop, caches) take those numbers; `setup` adds redirections.
 */
function cliFromShell(args: string[], setup = "") {
  const quoted = args.map((a) => `'${a}'`).join(" ");
  return run("bash", [
    "-c",
    `exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; ${setup} exec '${Deno.execPath()}' run -A '${CLI}' ${quoted}`,
  ]);
}

const OWN = /descriptor \d+ was not passed to diskstream \(it is one of the runtime's own files/;

Deno.test("descriptors: the runtime's own descriptors are refused by every flag that takes one", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    await writeSparse(src, 1 << 20, [[0, pseudoRandom(65536)]]);
    const cases: [string[], RegExp][] = [
      [["export", src, "--output-fd", "4"], /^diskstream: --output-fd 4: /],
      [["export", src, "-f", "vhd", "--output-fd", "5"], /^diskstream: --output-fd 5: /],
      [["import", `${dir}/dest.raw`, "--input-fd", "4"], /^diskstream: --input-fd 4: /],
      [["export", src, "-o", `${dir}/out.qcow2`, "--allocation", "fd:5"], /^diskstream: fd:5: /],
      [
        ["export", src, "-o", `${dir}/out.qcow2`, "--diff", src, "--base-allocation", "fd:6"],
        /^diskstream: fd:6: /,
      ],
      [
        ["qcow2-to-stdout", src, "--json-header-map", "6", "--json-header-info", "7"],
        /^diskstream: --json-header-map 6: /,
      ],
      [
        ["qcow2-to-stdout", src, "--json-header-diff-map", "8"],
        /^diskstream: --json-header-diff-map 8: /,
      ],
    ];
    for (const [args, re] of cases) {
      const r = await cliFromShell(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, re);
      assert.match(r.stderr, OWN);
      assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
      assert.equal(r.stdout.length, 0, "nothing written");
    }
    for (const f of ["dest.raw", "out.qcow2"]) {
      await assert.rejects(Deno.stat(`${dir}/${f}`), Deno.errors.NotFound);
    }
  });
});

Deno.test("descriptors: a descriptor that is not open is named, and inherited ones still work", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/disk.raw`;
    const data = pseudoRandom(65536, 9);
    await writeSparse(src, 1 << 20, [[65536, data]]);
    const closed = await cliFromShell(["import", `${dir}/dest.raw`, "--input-fd", "1000"]);
    assert.equal(closed.code, 2);
    assert.match(closed.stderr, /--input-fd 1000: descriptor 1000 is not open/);

    // Passed by the shell: accepted, through every flag.
    const hint = `${dir}/hint.json`;
    await Deno.writeTextFile(
      hint,
      '{"virtual_size":1048576,"cluster_bits":16,"data_clusters":[[1,1]]}',
    );
    const out = `${dir}/out.qcow2`;
    const ok = await cliFromShell(
      ["export", src, "--output-fd", "4", "--allocation", "fd:5"],
      `exec 4>'${out}' 5<'${hint}';`,
    );
    assert.equal(ok.code, 0, ok.stderr);
    const back = await cliFromShell(
      ["import", `${dir}/copy.raw`, "--input-fd", "6"],
      `exec 6<'${out}';`,
    );
    assert.equal(back.code, 0, back.stderr);
    assert.deepEqual(await Deno.readFile(`${dir}/copy.raw`), await Deno.readFile(src));
  });
});

/** A descriptor of this process with close-on-exec set (one the runtime opened). */
function ownDescriptor(): number {
  for (let fd = 3; fd < 64; fd++) {
    try {
      const flags = /^flags:\s+([0-7]+)/m.exec(Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`));
      if (flags && (parseInt(flags[1], 8) & 0o2000000) !== 0) return fd;
    } catch {
      // not open
    }
  }
  throw new Error("no close-on-exec descriptor found");
}

Deno.test("descriptors: inheritedFd and fd:N specs in the library", async () => {
  assert.equal(inheritedFd(2, "stderr"), 2);
  const own = ownDescriptor();
  assert.throws(() => inheritedFd(own, `fd:${own}`), UsageError);
  await assert.rejects(resolveAllocationSpec(`fd:${own}`, 65536), OWN);
  assert.throws(() => inheritedFd(2 ** 31, "--output-fd"), /not a file descriptor number/);
});
