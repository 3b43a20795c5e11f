/**
 * SIGINT, SIGTERM and SIGHUP during import and `export -o`, sent for real to a child
 * process: it stops promptly, removes a file it created, says on one line what was
 * interrupted (and for an existing file from which byte on it is partly written),
 * and exits with 128 + the signal's number.
 */
import assert from "node:assert/strict";
import { CLI, pseudoRandom, sha256File, withTempDir, writeSparse } from "./helpers.ts";
import { pathExists } from "../lib/io/same_file.ts";
import { CliChild, until } from "./cli_child.ts";
import { startServer } from "./http_fixtures.ts";

/** An 8 MiB disk whose first MiB is zeros (so its image writes nothing below 1 MiB). */
async function imageWithDataFrom1M(dir: string): Promise<Uint8Array> {
  await writeSparse(`${dir}/disk.raw`, 8 << 20, [[1 << 20, pseudoRandom(7 << 20, 5)]]);
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, "export", `${dir}/disk.raw`, "-o", `${dir}/disk.qcow2`],
  }).output();
  assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
  return await Deno.readFile(`${dir}/disk.qcow2`);
}

/** One line on stderr, matching `re`. */
function assertOneLine(stderr: string, re: RegExp) {
  assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  assert.match(stderr.trimEnd(), re);
}

Deno.test("signals: SIGTERM during an import from a stalled pipe removes the file it created", async () => {
  await withTempDir(async (dir) => {
    const image = await imageWithDataFrom1M(dir);
    const dest = `${dir}/new.raw`;
    const child = new CliChild(["import", dest]);
    // The metadata and half the data; then the pipe stays open and silent.
    await child.feed(image.subarray(0, 6 << 20)); // more than one 4 MiB chunk, not all
    await until(() => pathExists(dest), "the destination to be created");
    const { code, stderr, ms } = await child.stop("SIGTERM");
    assert.equal(code, 128 + 15, stderr);
    assertOneLine(
      stderr,
      /^diskstream: import into .*new\.raw interrupted by SIGTERM: .*new\.raw \(created by this import\) was removed$/,
    );
    assert.ok(ms < 5000, `stopped after ${ms} ms`);
    assert.equal(await pathExists(dest), false);
  });
});

Deno.test("signals: SIGINT during an import into an existing file says from which byte it is partly written", async () => {
  await withTempDir(async (dir) => {
    const image = await imageWithDataFrom1M(dir);
    const dest = `${dir}/existing.raw`;
    const before = new Uint8Array(8 << 20).fill(0xee);
    await Deno.writeFile(dest, before);
    const child = new CliChild(["import", dest, "--progress", "--machine"]);
    await child.feed(image.subarray(0, 6 << 20)); // more than one 4 MiB chunk, not all
    // Progress past a few percent: data has been written.
    await child.waitForOutput(/0[2-9]\d/);
    const { code, stderr } = await child.stop("SIGINT");
    assert.equal(code, 128 + 2, stderr);
    const m =
      /^diskstream: import into .*existing\.raw interrupted by SIGINT: .*existing\.raw \(an existing file\) is partly written from byte (\d+) on$/
        .exec(stderr.trimEnd());
    assert.ok(m, stderr);
    const from = Number(m[1]);
    assert.equal(from, 1 << 20); // the image holds nothing below 1 MiB
    const after = await Deno.readFile(dest);
    assert.equal(after.length, before.length);
    assert.deepEqual(after.subarray(0, from), before.subarray(0, from)); // intact below it
    const disk = await Deno.readFile(`${dir}/disk.raw`);
    assert.deepEqual(after.subarray(from, from + 65536), disk.subarray(from, from + 65536));
  });
});

Deno.test("signals: SIGHUP before the destination is written leaves an existing file unchanged", async () => {
  await withTempDir(async (dir) => {
    const image = await imageWithDataFrom1M(dir);
    const dest = `${dir}/existing.raw`;
    await Deno.writeFile(dest, new Uint8Array(8 << 20).fill(0x11));
    const hash = await sha256File(dest);
    const child = new CliChild(["import", dest]);
    await child.feed(image.subarray(0, 100)); // not even the whole header
    await child.waitForHandlers();
    const { code, stderr } = await child.stop("SIGHUP");
    assert.equal(code, 128 + 1, stderr);
    assertOneLine(
      stderr,
      /^diskstream: import into .*existing\.raw interrupted by SIGHUP: nothing was written to .*existing\.raw$/,
    );
    assert.equal(await sha256File(dest), hash);
  });
});

/** A 1 GiB sparse disk and a hint that calls all of it data: pass 2 copies for seconds. */
async function slowExportSource(dir: string): Promise<string[]> {
  const size = 1 << 30;
  await writeSparse(`${dir}/big.raw`, size, [[0, pseudoRandom(1 << 20, 3)]]);
  await Deno.writeTextFile(
    `${dir}/all.json`,
    JSON.stringify({ virtual_size: size, cluster_bits: 21, data_clusters: [[0, 511]] }),
  );
  return [`${dir}/big.raw`, "--allocation", `${dir}/all.json`, "--progress", "--machine"];
}

Deno.test("signals: SIGTERM during export -o removes the output file it created", async () => {
  await withTempDir(async (dir) => {
    const out = `${dir}/out.qcow2`;
    const child = new CliChild(["export", ...(await slowExportSource(dir)), "-o", out]);
    await child.waitForOutput(/00[1-9]/);
    const { code, stderr, ms } = await child.stop("SIGTERM");
    assert.equal(code, 128 + 15, stderr);
    assertOneLine(
      stderr,
      /^diskstream: export of .*big\.raw to .*out\.qcow2 interrupted by SIGTERM: .*out\.qcow2 \(created by this export\) was removed$/,
    );
    assert.ok(ms < 5000, `stopped after ${ms} ms`);
    assert.equal(await pathExists(out), false);
  });
});

Deno.test("signals: SIGINT during export -o onto an existing file says it is partly written from byte 0", async () => {
  await withTempDir(async (dir) => {
    const out = `${dir}/existing.qcow2`;
    await Deno.writeTextFile(out, "old contents");
    const child = new CliChild(["export", ...(await slowExportSource(dir)), "-o", out]);
    await child.waitForOutput(/00[1-9]/);
    const { code, stderr } = await child.stop("SIGINT");
    assert.equal(code, 128 + 2, stderr);
    assertOneLine(
      stderr,
      /^diskstream: export of .*big\.raw to .*existing\.qcow2 interrupted by SIGINT: .*existing\.qcow2 is partly written from byte 0 on \(up to \d+ of the image's \d+ bytes\)$/,
    );
    assert.ok(await pathExists(out)); // not ours to remove
  });
});

Deno.test("signals: SIGTERM during export -o URL says how far the upload got", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/b.raw`, 1 << 30);
    const server = await startServer(["--disk", `b=${dir}/b.raw`]);
    try {
      const url = `${server.url}/import_raw_vdi?vdi=b&format=qcow2`;
      const child = new CliChild(["export", ...(await slowExportSource(dir)), "-o", url]);
      await child.waitForOutput(/00[1-9]/);
      const { code, stderr, ms } = await child.stop("SIGTERM");
      assert.equal(code, 128 + 15, stderr);
      assertOneLine(
        stderr,
        /^diskstream: interrupted by SIGTERM: the upload to http:\/\/127\.0\.0\.1:\d+\/import_raw_vdi\?vdi=b&format=qcow2 stopped after \d+ of \d+ bytes \(.*\); the server holds an incomplete image$/,
      );
      assert.ok(ms < 5000, `stopped after ${ms} ms`);
      await server.waitLog(/import of 'b' failed, the disk is incomplete/);
    } finally {
      await server.stop();
    }
  });
});

/** Feeds part of an image through a socket as the CLI's stdin, then SIGTERM (python3). */
const SOCKET_FEEDER = `
import socket, subprocess, sys, time
img = open(sys.argv[1], "rb").read()
a, b = socket.socketpair()
p = subprocess.Popen(sys.argv[3:], stdin=b, stderr=subprocess.PIPE)
b.close()
a.sendall(img[: int(sys.argv[2])])
mask = (1 << 0) | (1 << 1) | (1 << 14)
while True:
    status = open(f"/proc/{p.pid}/status").read()
    cgt = int(status.split("SigCgt:")[1].split()[0], 16)
    if cgt & mask == mask: break
    time.sleep(0.02)
time.sleep(0.3)
t = time.time()
p.send_signal(15)
err = p.stderr.read().decode()
code = p.wait()
print(code, int((time.time() - t) * 1000))
print(err, end="")
`;

Deno.test("signals: SIGTERM during an import from a silent socket (XAPI's stdin) is handled promptly", async () => {
  await withTempDir(async (dir) => {
    const image = await imageWithDataFrom1M(dir);
    await Deno.writeFile(`${dir}/disk.qcow2`, image);
    const dest = `${dir}/new.raw`;
    const r = await new Deno.Command("python3", {
      args: [
        "-c",
        SOCKET_FEEDER,
        `${dir}/disk.qcow2`,
        String(6 << 20),
        Deno.execPath(),
        "run",
        "-A",
        CLI,
        "import",
        dest,
      ],
    }).output();
    const [status, message] = new TextDecoder().decode(r.stdout).split("\n");
    const [code, ms] = status.split(" ").map(Number);
    assert.equal(code, 128 + 15, message);
    assert.ok(ms < 5000, `stopped after ${ms} ms`);
    assert.match(
      message,
      /^diskstream: import into .*new\.raw interrupted by SIGTERM: .*new\.raw \(created by this import\) was removed$/,
    );
    assert.equal(await pathExists(dest), false);
  });
});
