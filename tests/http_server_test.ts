/**
 * `diskstream server` against curl (and diskstream's own client): both endpoints,
 * HEAD, tokens, locks, limits, clients that vanish, timeouts, TLS, SIGTERM.
 */
import assert from "node:assert/strict";
import {
  imagesEqual,
  pseudoRandom,
  qemu,
  runCli,
  sha256File,
  withTempDir,
  writeSparse,
} from "./helpers.ts";
import { curl, makeCert, makeDisk, startServer, toolTest } from "./http_fixtures.ts";

const MiB = 1 << 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

toolTest("curl exports qcow2 and VHD; HEAD gives the length; content types", [
  "curl",
  "qemu-img",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`);
    const server = await startServer(["--disk", `a=${dir}/a.raw`]);
    try {
      for (
        const [format, type, qemuFormat] of [
          ["qcow2", "application/x-qemu-disk", "qcow2"],
          ["vhd", "application/vhd", "vpc"],
        ]
      ) {
        const url = `${server.url}/export_raw_vdi?vdi=a&format=${format}&session_id=OpaqueRef:s`;
        const head = await curl(["-I", url]);
        assert.equal(head.code, 0, head.stderr);
        assert.match(head.body, /^HTTP\/1\.1 200/);
        assert.match(head.body, new RegExp(`content-type: ${type}`, "i"));
        const length = Number(/content-length: (\d+)/i.exec(head.body)![1]);
        const get = await curl(["-f", "-o", `${dir}/a.${format}`, "-w", "%{content_type}", url]);
        assert.equal(get.code, 0, get.stderr);
        assert.equal(get.body, type);
        assert.equal((await Deno.stat(`${dir}/a.${format}`)).size, length);
        assert.ok(await imagesEqual(`${dir}/a.raw`, `${dir}/a.${format}`, "raw", qemuFormat));
      }
      const disks = JSON.parse((await curl([`${server.url}/disks`])).body);
      assert.deepEqual(disks, [{ name: "a", size: 32 * MiB, state: "ready" }]);
      // The access log hides XAPI's session id.
      await server.waitLog(/"GET \/export_raw_vdi\?vdi=a&format=vhd&session_id=\*\*\*" 200 \d+/);
      assert.doesNotMatch(server.log(), /OpaqueRef/);
    } finally {
      await server.stop();
    }
  });
});

toolTest("curl imports qcow2 (from qemu-img) into a disk; answers after the sync", [
  "curl",
  "qemu-img",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/src.raw`, 32 * MiB, 7);
    await qemu(["convert", "-f", "raw", "-O", "qcow2", `${dir}/src.raw`, `${dir}/src.qcow2`]);
    await writeSparse(`${dir}/b.raw`, 32 * MiB, [[0, pseudoRandom(32 * MiB, 9)]]); // old data
    const server = await startServer(["--disk", `b=${dir}/b.raw`]);
    try {
      const put = await curl([
        "-f",
        "-T",
        `${dir}/src.qcow2`,
        `${server.url}/import_raw_vdi?vdi=b&format=qcow2`,
      ]);
      assert.equal(put.code, 0, put.stderr);
      const answer = JSON.parse(put.body);
      assert.deepEqual([answer.vdi, answer.format, answer.virtual_size], ["b", "qcow2", 32 * MiB]);
      assert.ok(answer.data_bytes >= 3 * MiB && answer.data_bytes < 4 * MiB);
      // The access log counts the answer's body bytes (it said 0 for an import's JSON).
      await server.waitLog(
        new RegExp(`"PUT /import_raw_vdi\\?vdi=b&format=qcow2" 200 ${put.stdout.length} \\d+ms`),
      );
      assert.equal(await sha256File(`${dir}/b.raw`), await sha256File(`${dir}/src.raw`));

      // An image larger than the disk is refused before anything is written.
      const before = await sha256File(`${dir}/b.raw`);
      await qemu(["create", "-f", "qcow2", `${dir}/big.qcow2`, "64M"]);
      await qemu(["-c", "write -P 0x5a 0 1M", `${dir}/big.qcow2`], "qemu-io");
      const big = await curl([
        "-T",
        `${dir}/big.qcow2`,
        "-w",
        "%{http_code}",
        `${server.url}/import_raw_vdi?vdi=b&format=qcow2`,
      ]);
      assert.match(
        big.body,
        /import of 'b' failed, the disk is unchanged: .*less than the image's virtual size/,
      );
      assert.match(big.body, /413$/);
      assert.equal(await sha256File(`${dir}/b.raw`), before);
      // Nothing was written: the disk keeps its state ("import failed" is for a disk
      // an import left incomplete).
      const disks = JSON.parse((await curl([`${server.url}/disks`])).body);
      assert.equal(disks[0].state, "ready");

      // diskstream's own client: export -o the server, import -i the server.
      await makeDisk(`${dir}/c.raw`, 32 * MiB, 11);
      const up = await runCli([
        "export",
        `${dir}/c.raw`,
        "-f",
        "vhd",
        "-o",
        `${server.url}/import_raw_vdi?vdi=b&format=vhd`,
      ]);
      assert.equal(up.code, 0, up.stderr);
      assert.equal(await sha256File(`${dir}/b.raw`), await sha256File(`${dir}/c.raw`));
      const down = await runCli([
        "import",
        `${dir}/d.raw`,
        "-i",
        `${server.url}/export_raw_vdi?vdi=b&format=qcow2`,
      ]);
      assert.equal(down.code, 0, down.stderr);
      assert.equal(await sha256File(`${dir}/d.raw`), await sha256File(`${dir}/c.raw`));
    } finally {
      await server.stop();
    }
  });
});

toolTest(
  "--read-only, unknown disks, formats, methods and paths are refused",
  ["curl"],
  async () => {
    await withTempDir(async (dir) => {
      await makeDisk(`${dir}/a.raw`, 4 * MiB);
      const server = await startServer(["--disk", `a=${dir}/a.raw`, "--read-only"]);
      try {
        const cases: [string[], number, RegExp][] = [
          [
            ["-T", `${dir}/a.raw`, `${server.url}/import_raw_vdi?vdi=a&format=qcow2`],
            403,
            /read-only/,
          ],
          [[`${server.url}/export_raw_vdi?vdi=zz&format=qcow2`], 404, /no disk named 'zz'/],
          [
            [`${server.url}/export_raw_vdi?vdi=../../etc/passwd&format=qcow2`],
            404,
            /no disk named/,
          ],
          [[`${server.url}/export_raw_vdi?format=qcow2`], 400, /vdi=NAME/],
          [[`${server.url}/export_raw_vdi?vdi=a&format=zip`], 400, /format 'zip' is not served/],
          [["-X", "DELETE", `${server.url}/disks`], 405, /use GET or HEAD/],
          [[`${server.url}/etc/passwd`], 404, /no such endpoint/],
        ];
        for (const [args, status, body] of cases) {
          const r = await curl(["-w", "\n%{http_code}", ...args]);
          const lines = r.body.trimEnd().split("\n");
          assert.equal(Number(lines.at(-1)), status, `${args.join(" ")}: ${r.body}`);
          assert.match(lines[0], body);
        }
      } finally {
        await server.stop();
      }
    });
  },
);

toolTest("tokens: Bearer or basic-auth password; required off loopback; file not world-readable", [
  "curl",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 4 * MiB);
    const token = "t0ken-0123456789abcdef";
    await Deno.writeTextFile(`${dir}/token`, token + "\n", { mode: 0o600 });
    await Deno.chmod(`${dir}/token`, 0o600);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--token-file", `${dir}/token`]);
    try {
      const url = `${server.url}/disks`;
      const status = async (args: string[]) =>
        (await curl(["-o", "/dev/null", "-w", "%{http_code}", ...args, url])).body;
      assert.equal(await status([]), "401");
      assert.equal(await status(["-H", "Authorization: Bearer wrong-token-0123456789"]), "401");
      assert.equal(await status(["-H", `Authorization: Bearer ${token}x`]), "401");
      assert.equal(await status(["-H", `Authorization: Bearer ${token}`]), "200");
      assert.equal(await status(["-u", `root:${token}`]), "200");
      assert.equal(await status(["-u", `root:nope`]), "401");
      const www = await curl(["-I", url]);
      assert.match(www.body, /www-authenticate: Bearer/i);
      // The client sends basic auth from the URL's user-info.
      const copy = await runCli([
        "import",
        `${dir}/copy.raw`,
        "-i",
        `${server.url.replace("://", `://root:${token}@`)}/export_raw_vdi?vdi=a&format=qcow2`,
      ]);
      assert.equal(copy.code, 0, copy.stderr);
      assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/a.raw`));
    } finally {
      await server.stop();
    }

    // Refusals at start.
    const open = await runCli(["server", "--listen", "0.0.0.0:0", "--disk", `a=${dir}/a.raw`]);
    assert.equal(open.code, 2);
    assert.match(open.stderr, /^diskstream: refusing to serve disks on 0\.0\.0\.0 without a token/);
    await Deno.chmod(`${dir}/token`, 0o644);
    const readable = await runCli([
      "server",
      "--disk",
      `a=${dir}/a.raw`,
      "--token-file",
      `${dir}/token`,
    ]);
    assert.equal(readable.code, 1);
    assert.match(readable.stderr, /is world-readable: chmod o-r/);
    const noDisk = await runCli(["server", "--disk", `a=${dir}/none.raw`]);
    assert.equal(noDisk.code, 1);
    assert.match(noDisk.stderr, /no such file/);
  });
});

/** Starts a slow upload of `bytes` with curl (rate-limited) and returns it. */
function slowUpload(file: string, url: string, rate = "1M") {
  return new Deno.Command("curl", {
    args: ["-sS", "--limit-rate", rate, "-T", file, "-w", "%{http_code}", url],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

toolTest("one writer per disk (409), --max-streams (503), a client that vanishes", [
  "curl",
  "qemu-img",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`);
    // Full of data, so that a slow reader holds its stream past the socket buffers.
    await writeSparse(`${dir}/b.raw`, 48 * MiB, [[0, pseudoRandom(48 * MiB, 3)]]);
    await writeSparse(`${dir}/img.raw`, 32 * MiB, [[0, pseudoRandom(8 * MiB, 5)]]);
    await qemu(["convert", "-f", "raw", "-O", "qcow2", `${dir}/img.raw`, `${dir}/img.qcow2`]);
    const server = await startServer([
      "--disk",
      `a=${dir}/a.raw`,
      "--disk",
      `b=${dir}/b.raw`,
      "--max-streams",
      "2",
    ]);
    try {
      const upload = slowUpload(
        `${dir}/img.qcow2`,
        `${server.url}/import_raw_vdi?vdi=a&format=qcow2`,
      );
      await sleep(1500);
      const code = async (url: string, args: string[] = []) =>
        (await curl(["-o", "/dev/null", "-w", "%{http_code}", ...args, url])).body;
      // While a is written: no reader, no second writer; b is free.
      assert.equal(await code(`${server.url}/export_raw_vdi?vdi=a&format=qcow2`), "409");
      assert.equal(await code(`${server.url}/export_raw_vdi?vdi=b&format=qcow2&base=a`), "409");
      assert.equal(
        await code(`${server.url}/import_raw_vdi?vdi=a&format=qcow2`, ["-T", `${dir}/img.qcow2`]),
        "409",
      );
      const state = JSON.parse((await curl([`${server.url}/disks`])).body);
      assert.equal(state[0].state, "importing");
      // Two streams at most: a slow export of b fills the second slot.
      const reader = new Deno.Command("curl", {
        args: [
          "-sS",
          "--limit-rate",
          "200K",
          "-o",
          "/dev/null",
          `${server.url}/export_raw_vdi?vdi=b&format=qcow2`,
        ],
        stdout: "null",
        stderr: "null",
      }).spawn();
      await sleep(1000);
      assert.equal(await code(`${server.url}/export_raw_vdi?vdi=b&format=vhd`), "503");
      // That reader vanishes: the server logs it and frees the slot.
      reader.kill("SIGKILL");
      await reader.status;
      await server.waitLog(
        /"GET \/export_raw_vdi\?vdi=b&format=qcow2" 200 \d+ \d+ms the client went away after \d+ of \d+ bytes/,
      );
      const out = await upload.output();
      assert.equal(new TextDecoder().decode(out.stdout).slice(-3), "200");
      assert.equal(await sha256File(`${dir}/a.raw`), await sha256File(`${dir}/img.raw`));
      assert.equal(await code(`${server.url}/export_raw_vdi?vdi=b&format=vhd`), "200");

      // An uploader that vanishes mid-import leaves a log line and a failed state.
      const gone = slowUpload(
        `${dir}/img.qcow2`,
        `${server.url}/import_raw_vdi?vdi=a&format=qcow2`,
        "2M",
      );
      await sleep(1500);
      gone.kill("SIGKILL");
      await gone.output();
      await server.waitLog(
        /"PUT \/import_raw_vdi\?vdi=a&format=qcow2" \d+ \d+ \d+ms import of 'a' failed, the disk is incomplete: the upload from 127\.0\.0\.1:\d+ broke after \d+ of \d+ bytes/,
      );
      const after = JSON.parse((await curl([`${server.url}/disks`])).body);
      assert.match(after[0].state, /^import failed: the upload from .* broke after/);
    } finally {
      await server.stop();
    }
  });
});

toolTest("16 concurrent curl exports are byte-correct", ["curl"], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 16 * MiB);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--max-streams", "16"]);
    try {
      const url = `${server.url}/export_raw_vdi?vdi=a&format=qcow2`;
      await curl(["-f", "-o", `${dir}/ref.qcow2`, url]);
      const want = await sha256File(`${dir}/ref.qcow2`);
      const results = await Promise.all(
        Array.from({ length: 16 }, (_, i) => curl(["-f", "-o", `${dir}/c${i}.qcow2`, url])),
      );
      for (const [i, r] of results.entries()) {
        assert.equal(r.code, 0, r.stderr);
        assert.equal(await sha256File(`${dir}/c${i}.qcow2`), want);
      }
    } finally {
      await server.stop();
    }
  });
});

Deno.test("a client that sends no full header in time is disconnected", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, MiB * 4);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--header-timeout", "1"]);
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      await conn.write(new TextEncoder().encode("GET /disks HTTP/1.1\r\nHost: x\r\n"));
      const started = Date.now();
      const n = await conn.read(new Uint8Array(100)).catch(() => null);
      assert.equal(n, null); // closed without an answer
      const waited = Date.now() - started;
      assert.ok(waited >= 800 && waited < 10_000, `closed after ${waited} ms`);
      conn.close();
    } finally {
      await server.stop();
    }
  });
});

toolTest(
  "TLS: curl and diskstream with --cacert; no trust, no transfer",
  ["curl", "certtool"],
  async () => {
    await withTempDir(async (dir) => {
      await makeDisk(`${dir}/a.raw`, 8 * MiB);
      const { cert, key } = await makeCert(dir);
      const server = await startServer([
        "--disk",
        `a=${dir}/a.raw`,
        "--tls-cert",
        cert,
        "--tls-key",
        key,
      ]);
      try {
        assert.match(server.url, /^https:\/\//);
        const url = `${server.url}/export_raw_vdi?vdi=a&format=qcow2`;
        const ok = await curl(["-f", "--cacert", cert, "-o", `${dir}/a.qcow2`, url]);
        assert.equal(ok.code, 0, ok.stderr);
        const untrusted = await curl(["-o", "/dev/null", url]);
        assert.notEqual(untrusted.code, 0);

        const refused = await runCli(["import", `${dir}/x.raw`, "-i", url]);
        assert.equal(refused.code, 1);
        assert.match(refused.stderr, /certificate is not trusted: .*--cacert FILE/);
        for (const flags of [["--cacert", cert], ["--insecure"]]) {
          const r = await runCli(["import", `${dir}/copy.raw`, "-i", url, ...flags]);
          assert.equal(r.code, 0, r.stderr);
          assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/a.raw`));
          await Deno.remove(`${dir}/copy.raw`);
        }
        const up = await runCli([
          "export",
          `${dir}/a.raw`,
          "-o",
          `${server.url}/import_raw_vdi?vdi=a&format=qcow2`,
          "--cacert",
          cert,
        ]);
        assert.equal(up.code, 0, up.stderr);
      } finally {
        await server.stop();
      }
    });
  },
);

toolTest("SIGTERM: no new requests, running streams get the grace period, then abort", [
  "curl",
], async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/a.raw`, 48 * MiB, [[0, pseudoRandom(48 * MiB, 3)]]);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--grace", "1"]);
    const reader = new Deno.Command("curl", {
      args: [
        "-sS",
        "--limit-rate",
        "100K",
        "-o",
        "/dev/null",
        `${server.url}/export_raw_vdi?vdi=a&format=qcow2`,
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      await sleep(1000);
      const t0 = Date.now();
      server.kill("SIGTERM");
      const code = await server.exited();
      assert.equal(code, 0);
      const took = Date.now() - t0;
      assert.ok(took >= 900 && took < 15_000, `stopped after ${took} ms`);
      assert.match(server.log(), /SIGTERM: no new requests/);
      assert.match(server.log(), /aborting 1 running stream\(s\) after the grace period/);
      assert.match(
        server.log(),
        /"GET \/export_raw_vdi\?vdi=a&format=qcow2" 200 \d+ \d+ms aborted by the server's stop after \d+ of \d+ bytes/,
      );
    } finally {
      try {
        reader.kill("SIGKILL");
      } catch {
        // already ended
      }
      await reader.status;
      await server.stop();
    }
  });
});

Deno.test("a reader that stops reading is disconnected after the idle timeout", async () => {
  await withTempDir(async (dir) => {
    await writeSparse(`${dir}/a.raw`, 48 * MiB, [[0, pseudoRandom(48 * MiB, 4)]]);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--idle-timeout", "1"]);
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      await conn.write(
        new TextEncoder().encode(
          "GET /export_raw_vdi?vdi=a&format=qcow2 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
      );
      // Read nothing while the socket buffers fill and the server stalls.
      await server.waitLog(/the client went away after \d+ of \d+ bytes/, 30_000);
      let got = 0;
      const buf = new Uint8Array(MiB);
      for (;;) {
        const n = await conn.read(buf).catch(() => null);
        if (n === null) break;
        got += n;
      }
      conn.close();
      assert.ok(got < 48 * MiB, `read ${got} bytes`);
    } finally {
      await server.stop();
    }
  });
});

toolTest("export with base=NAME is a diff that rebuilds the disk on a copy of the base", [
  "curl",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/base.raw`, 16 * MiB, 21);
    await Deno.copyFile(`${dir}/base.raw`, `${dir}/new.raw`);
    const f = await Deno.open(`${dir}/new.raw`, { write: true });
    await f.seek(5 * MiB, Deno.SeekMode.Start);
    await f.write(pseudoRandom(MiB, 22));
    f.close();
    await Deno.copyFile(`${dir}/base.raw`, `${dir}/copy.raw`);
    const server = await startServer([
      "--disk",
      `new=${dir}/new.raw`,
      "--disk",
      `base=${dir}/base.raw`,
    ]);
    try {
      const url = `${server.url}/export_raw_vdi?vdi=new&format=qcow2&base=base`;
      const head = await curl(["-I", url]);
      const length = Number(/content-length: (\d+)/i.exec(head.body)![1]);
      assert.ok(length < 2 * MiB, `a diff of 1 MiB is ${length} bytes`);
      const r = await runCli(["import", `${dir}/copy.raw`, "--delta", "-i", url]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/new.raw`));
      const missing = await curl([
        "-w",
        "\n%{http_code}",
        `${url.replace("base=base", "base=nope")}`,
      ]);
      assert.match(missing.body, /no disk named 'nope'[\s\S]*404$/);
    } finally {
      await server.stop();
    }
  });
});

toolTest("raw, chunked (XAPI's chunked=true) and tar through the server; a raw body too big: 413", [
  "curl",
], async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 8 * MiB, 31);
    await writeSparse(`${dir}/b.raw`, 8 * MiB);
    const server = await startServer(["--disk", `a=${dir}/a.raw`, "--disk", `b=${dir}/b.raw`]);
    try {
      const base = `${server.url}/export_raw_vdi?vdi=a`;
      for (
        const [format, type, query] of [
          ["raw", "application/octet-stream", "format=raw"],
          ["chunked", "application/octet-stream", "format=raw&chunked=true"],
          ["tar", "application/x-tar", "format=tar"],
        ]
      ) {
        await writeSparse(`${dir}/b.raw`, 8 * MiB); // start from zeros
        const get = await curl([
          "-f",
          "-o",
          `${dir}/out.${format}`,
          "-w",
          "%{content_type}",
          `${base}&format=${format}`,
        ]);
        assert.equal(get.code, 0, get.stderr);
        assert.equal(get.body, type);
        if (format === "raw") {
          assert.equal(await sha256File(`${dir}/out.raw`), await sha256File(`${dir}/a.raw`));
        }
        const put = await curl([
          "-f",
          "-T",
          `${dir}/out.${format}`,
          `${server.url}/import_raw_vdi?vdi=b&${query}`,
        ]);
        assert.equal(put.code, 0, `${format}: ${put.stderr}`);
        assert.equal(JSON.parse(put.body).format, format);
        assert.equal(await sha256File(`${dir}/b.raw`), await sha256File(`${dir}/a.raw`), format);
      }
      // diskstream's client picks tar from the Content-Type.
      const r = await runCli([
        "import",
        `${dir}/c.raw`,
        "--size",
        "8M",
        "-i",
        `${base}&format=tar`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await sha256File(`${dir}/c.raw`), await sha256File(`${dir}/a.raw`));
      // A raw body longer than the disk is refused before anything is written.
      await writeSparse(`${dir}/big.raw`, 9 * MiB, [[0, pseudoRandom(MiB, 5)]]);
      const before = await sha256File(`${dir}/b.raw`);
      const big = await curl([
        "-w",
        "\n%{http_code}",
        "-T",
        `${dir}/big.raw`,
        `${server.url}/import_raw_vdi?vdi=b&format=raw`,
      ]);
      assert.match(
        big.body,
        /the body holds 9437184 bytes but disk 'b' has 8388608: nothing was written\n\n413$/,
      );
      assert.equal(await sha256File(`${dir}/b.raw`), before);
    } finally {
      await server.stop();
    }
  });
});
