/**
 * vhd-tool's chunked protocol and `diskstream vhd-tool` as a hostile peer or a careless
 * caller would use them: a peer that keeps its connection open after the stream's end
 * (XAPI hands over its HTTP connection and waits for the answer), bytes after the end
 * header, streams of many tiny pieces, `file://` URLs that name no absolute path, and
 * a chunked diff against a base of another size.
 */
import assert from "node:assert/strict";
import { decodeChunkedStream, encodeChunkHeader } from "../lib/chunked/chunked.ts";
import { ChunkStream } from "../lib/io/chunk_stream.ts";
import type { ImageTarget } from "../lib/io/endpoint.ts";
import {
  CLI,
  CLI_SH,
  concat,
  pseudoRandom,
  run,
  runCli,
  sh,
  sha256,
  sha256File,
  toolTest,
  withTempDir,
} from "./helpers.ts";

const MiB = 1 << 20;
const DS = CLI_SH;
const PY = "/usr/bin/python3";

/** A chunked stream of `pieces` ([offset, bytes]) and its end header. */
function chunked(pieces: [number, Uint8Array][], after: Uint8Array = new Uint8Array(0)) {
  const parts = pieces.flatMap(([at, b]) => [encodeChunkHeader(at, b.length), b]);
  parts.push(encodeChunkHeader(0, 0), after);
  return concat(parts);
}

/**
 * Python: runs `vhd-tool serve ARGS --source-fd 3` with one end of a socket pair as
 * descriptor 3, sends the file PAYLOAD and keeps the socket open (as XAPI's client does
 * while it waits for the answer); prints the exit status, or HANG after 20 s.
 */
const HELD_SOCKET = `
import os, socket, subprocess, sys
a, b = socket.socketpair()
def child():
    os.dup2(b.fileno(), 3)
p = subprocess.Popen([sys.argv[1], "run", "-A", sys.argv[2], "vhd-tool", "serve", "--source-fd", "3"]
    + sys.argv[4:], preexec_fn=child, pass_fds=(), close_fds=False,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
b.close()
a.sendall(open(sys.argv[3], "rb").read())
try:
    print(p.wait(timeout=20))
except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
    print("HANG")
a.close()
`;

toolTest(
  "vhd-tool serve over a connection the peer keeps open: chunked, raw and tar end at their end",
  [[PY, "-c", "import socket"]],
  "apt-get install -y python3",
  async () => {
    await withTempDir(async (dir) => {
      const data = pseudoRandom(MiB, 7);
      await Deno.writeFile(`${dir}/disk.raw`, data);
      await Deno.writeFile(`${dir}/held.py`, new TextEncoder().encode(HELD_SOCKET));
      await Deno.writeFile(`${dir}/s.chunked`, chunked([[4096, data.subarray(0, 8192)]]));
      await sh(`${DS} export ${dir}/disk.raw -f tar --checksum sha1 > ${dir}/s.tar`);
      const serve = async (payload: string, dest: string, ...flags: string[]) => {
        const r = await run(PY, [
          `${dir}/held.py`,
          Deno.execPath(),
          CLI,
          `${dir}/${payload}`,
          ...flags,
          "--destination",
          `file://${dir}/${dest}`,
          "--destination-format",
          "raw",
        ]);
        return new TextDecoder().decode(r.stdout).trim();
      };
      // XAPI's import call (compat.md), on a connection that stays open.
      await Deno.writeFile(`${dir}/c.raw`, new Uint8Array(MiB));
      const xapi = ["--source-format", "raw", "--tar-filename-prefix", "", "--progress"];
      assert.equal(
        await serve("s.chunked", "c.raw", ...xapi, "--source-protocol", "chunked", "--machine"),
        "0",
      );
      const want = new Uint8Array(MiB);
      want.set(data.subarray(0, 8192), 4096);
      assert.equal(await sha256File(`${dir}/c.raw`), sha256(want));
      // Raw with its size: the stream ends after that many bytes.
      await Deno.writeFile(`${dir}/r.raw`, new Uint8Array(MiB));
      assert.equal(
        await serve(
          "disk.raw",
          "r.raw",
          "--source-protocol",
          "none",
          "--destination-size",
          `${MiB}`,
        ),
        "0",
      );
      assert.equal(await sha256File(`${dir}/r.raw`), sha256(data));
      // Tar: the tar end is the stream's end.
      assert.equal(await serve("s.tar", "t.raw", "--source-protocol", "tar"), "0");
      assert.equal(await sha256File(`${dir}/t.raw`), sha256(data));
    });
  },
);

Deno.test("import -f chunked: bytes after the end header are refused (file, pipe); nothing is applied", async () => {
  await withTempDir(async (dir) => {
    const piece = pseudoRandom(1000, 3);
    await Deno.writeFile(
      `${dir}/two.chunked`,
      chunked([[0, piece]], chunked([[65536, piece]])), // two streams joined
    );
    await Deno.writeFile(`${dir}/junk.chunked`, chunked([[0, piece]], new Uint8Array([1])));
    for (const [name, how] of [["two", "-i"], ["junk", "-i"], ["two", "<"]] as const) {
      await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(MiB));
      const r = await run("bash", [
        "-c",
        how === "-i"
          ? `${DS} import ${dir}/d.raw -f chunked -i ${dir}/${name}.chunked`
          : `cat ${dir}/${name}.chunked | ${DS} import ${dir}/d.raw -f chunked`,
      ]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        /^diskstream: bytes follow the chunked stream's end header \(offset 0, length 0\).*\(at byte offset 1024\); .*d\.raw was not written\n$/,
      );
      assert.equal(await sha256File(`${dir}/d.raw`), sha256(new Uint8Array(MiB)));
    }
    // A new file is removed.
    const r = await run("bash", [
      "-c",
      `${DS} import ${dir}/new.raw --size 1M -f chunked < ${dir}/two.chunked`,
    ]);
    assert.equal(r.code, 1);
    await assert.rejects(Deno.stat(`${dir}/new.raw`), Deno.errors.NotFound);
    // The same stream without what follows its end imports.
    await Deno.writeFile(`${dir}/one.chunked`, chunked([[0, piece]]));
    await sh(`cat ${dir}/one.chunked | ${DS} import ${dir}/d.raw -f chunked`);
    const want = new Uint8Array(MiB);
    want.set(piece);
    assert.equal(await sha256File(`${dir}/d.raw`), sha256(want));
  });
});

Deno.test("import -f chunked: a failure in an existing file says what it left there", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(MiB));
    const big = pseudoRandom(17 * MiB, 5); // more than one flush (16 MiB) before the cut
    const cut = chunked([[0, new Uint8Array(MiB)]]).subarray(0, 12 + 100);
    await Deno.writeFile(`${dir}/cut.chunked`, cut);
    const r = await runCli(["import", `${dir}/d.raw`, "-f", "chunked", "-i", `${dir}/cut.chunked`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /ended inside a chunk: .*; .*d\.raw was not written\n$/);
    await Deno.writeFile(`${dir}/e.raw`, new Uint8Array(32 * MiB));
    const flushed = chunked([[0, big]]).subarray(0, 12 + big.length);
    await Deno.writeFile(`${dir}/flushed.chunked`, flushed);
    const p = await runCli([
      "import",
      `${dir}/e.raw`,
      "-f",
      "chunked",
      "-i",
      `${dir}/flushed.chunked`,
    ]);
    assert.equal(p.code, 1);
    assert.match(
      p.stderr,
      /without its end header.*; .*e\.raw \(an existing file\) is partly written from byte 0 on\n$/,
    );
  });
});

Deno.test("decodeChunkedStream: tiny pieces are flushed by their count, not only their bytes", async () => {
  let pending = 0;
  let most = 0;
  const target: ImageTarget = {
    queued: 0, // one-byte pieces never reach the flush threshold in bytes
    write: () => {
      pending++;
      most = Math.max(most, pending);
    },
    zero: () => {},
    flush: () => {
      pending = 0;
      return Promise.resolve();
    },
  };
  const pieces: [number, Uint8Array][] = [];
  for (let i = 0; i < 20000; i++) pieces.push([i * 2 + 1, new Uint8Array([i & 0xff])]);
  const bytes = chunked(pieces);
  const r = await decodeChunkedStream(new ChunkStream(ReadableStream.from([bytes])), target, {
    size: 40002,
  });
  assert.equal(r.pieces, 20000);
  assert.ok(most <= 4096, `${most} writes held before a flush`);
});

Deno.test("vhd-tool serve --destination file://: only an absolute path, %-escapes decoded", async () => {
  await withTempDir(async (dir) => {
    const stream = chunked([[0, new Uint8Array([1, 2, 3])]]);
    const serve = (dest: string) =>
      run("bash", [
        "-c",
        `cd ${dir} && ${DS} vhd-tool serve --source-protocol chunked --source stdin: ` +
        `--destination-size 1M --destination '${dest}'`,
      ], { stdin: stream });
    for (
      const [dest, why] of [
        [`file://${dir}/x%ZZ.raw`, /a malformed %-escape/],
        [`file://${dir}/x.raw?vdi=1`, /a query or fragment names no file/],
        [`file://${dir}/x.raw#1`, /a query or fragment names no file/],
        ["file://x.raw", /'x\.raw' stands where a host name goes/],
        [`file://host${dir}/x.raw`, /'host' stands where a host name goes/],
        [`file://${dir}/x%00.raw`, /NUL byte/],
        ["file://", /holds no path/],
      ] as const
    ) {
      const r = await serve(dest);
      assert.equal(r.code, 2, `${dest}: ${r.stderr}`);
      assert.match(r.stderr, why);
      assert.match(r.stderr, /^diskstream: --destination .*give file:\/\/\/ABSOLUTE\/PATH/);
      assert.doesNotMatch(r.stderr, /internal error|\n\s+at /);
    }
    assert.deepEqual([...Deno.readDirSync(dir)], []); // nothing created
    // %-escapes are decoded; file://localhost/ is the local host.
    for (const dest of [`file://${dir}/a%20b.raw`, `file://localhost${dir}/c.raw`]) {
      const r = await serve(dest);
      assert.equal(r.code, 0, `${dest}: ${r.stderr}`);
    }
    assert.equal((await Deno.stat(`${dir}/a b.raw`)).size, MiB);
    assert.equal((await Deno.stat(`${dir}/c.raw`)).size, MiB);
  });
});

Deno.test("export -f chunked --diff: a base of another size is refused (the stream does not carry it)", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/disk.raw`, pseudoRandom(2 * MiB, 9));
    for (const size of [MiB, 3 * MiB, 2 * MiB + 1]) {
      await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(size));
      const r = await runCli([
        "export",
        `${dir}/disk.raw`,
        "--diff",
        `${dir}/base.raw`,
        "-f",
        "chunked",
      ]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(
        r.stderr,
        new RegExp(
          `^diskstream: the base .*base\\.raw holds ${size} bytes and the disk ${2 * MiB}: `,
        ),
      );
      assert.equal(r.stdout.length, 0);
    }
    // The same size: the diff applies onto a copy of the base.
    const base = pseudoRandom(2 * MiB, 9);
    base.fill(0, 100, 5000);
    await Deno.writeFile(`${dir}/base.raw`, base);
    await Deno.writeFile(`${dir}/copy.raw`, base);
    await sh(
      `${DS} export ${dir}/disk.raw --diff ${dir}/base.raw -f chunked | ` +
        `${DS} import ${dir}/copy.raw -f chunked`,
    );
    assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/disk.raw`));
  });
});

Deno.test("vhd-tool serve --source-protocol chunked into a new or empty file asks for --destination-size", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/empty.raw`, new Uint8Array(0));
    for (const dest of ["new.raw", "empty.raw"]) {
      const r = await runCli([
        "vhd-tool",
        "serve",
        "--source-protocol",
        "chunked",
        "--source",
        "stdin:",
        "--destination",
        `file://${dir}/${dest}`,
      ], { stdin: chunked([]) });
      assert.equal(r.code, 2);
      assert.match(r.stderr, /is new or empty .*: give --destination-size\n$/);
    }
    await assert.rejects(Deno.stat(`${dir}/new.raw`), Deno.errors.NotFound);
  });
});
