/**
 * diskstream's HTTP side against hostile peers. The client (`import -i URL`, `export -o
 * URL`, httpGet/httpPut) against servers written here that lie about lengths, break
 * their encoding, stall, redirect in loops or to other servers, answer too early or
 * with binary junk; the server (`diskstream server`) against raw sockets that send
 * what no HTTP client would. Oracles: the client ends with status 1 (or 128 + signal)
 * and one `diskstream: …` line naming the URL, never 0 for an incomplete transfer; the
 * server answers a short 4xx, stays up, keeps its memory bounded and never touches a
 * file it does not serve.
 */
import assert from "node:assert/strict";
import { pseudoRandom, runCli, sha256File, withTempDir, writeSparse } from "./helpers.ts";
import { CliChild, until } from "./cli_child.ts";
import { makeCert, makeDisk, type ServerProcess, startServer } from "./http_fixtures.ts";
import { httpGet, httpPut, HttpTransferError } from "../mod.ts";

const MiB = 1 << 20;
/** Bytes as text, one character per byte (what was on the wire), and back. */
const latin1 = (b: Uint8Array) => String.fromCharCode(...b);
const bytes = (text: string) => Uint8Array.from(text, (c) => c.charCodeAt(0));

/** One line on stderr, matching `re`, and no stack trace. */
function assertOneLine(stderr: string, re: RegExp): void {
  assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  assert.match(stderr.trimEnd(), re);
  assert.doesNotMatch(stderr, /^\s+at /m);
}

// ---------------------------------------------------------------------------------
// A hostile server: each connection's request head is read, then `script` does what
// it likes with the connection (answers, reads the body or not, stalls, closes).

interface Seen {
  method: string;
  path: string;
  headers: Record<string, string>;
  /** Body bytes read so far (by {@link drain}). */
  body: number;
}

interface Hostile {
  url: string;
  port: number;
  seen: Seen[];
  close(): Promise<void>;
}

type Script = (conn: Deno.Conn, req: Seen, rest: Uint8Array) => Promise<void>;

function hostile(script: Script, tls?: { cert: string; key: string }): Hostile {
  const listener = tls
    ? Deno.listenTls({ hostname: "127.0.0.1", port: 0, ...tls })
    : Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const conns = new Set<Deno.Conn>();
  const handlers = new Set<Promise<void>>();
  const seen: Seen[] = [];
  const serving = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      const h = (async () => {
        try {
          const { head, rest } = await readHead(conn);
          const [line, ...lines] = head.split("\r\n");
          const [method, path] = line.split(" ");
          const headers: Record<string, string> = {};
          for (const l of lines) {
            const i = l.indexOf(":");
            if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
          }
          const req = { method, path, headers, body: 0 };
          seen.push(req);
          await script(conn, req, rest);
        } catch {
          // the client went away, or TLS failed: what the test looks at is `seen`
        } finally {
          conns.delete(conn);
          try {
            conn.close();
          } catch {
            // closed already
          }
        }
      })();
      handlers.add(h);
      h.finally(() => handlers.delete(h));
    }
  })();
  return {
    url: `${tls ? "https" : "http"}://127.0.0.1:${port}`,
    port,
    seen,
    async close() {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // closed already
        }
      }
      await serving.catch(() => {});
      await Promise.all([...handlers]);
    },
  };
}

async function readHead(conn: Deno.Conn): Promise<{ head: string; rest: Uint8Array }> {
  let buf = new Uint8Array(0);
  const chunk = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("no request");
    const next = new Uint8Array(buf.length + n);
    next.set(buf);
    next.set(chunk.subarray(0, n), buf.length);
    buf = next;
    const text = latin1(buf.subarray(0, Math.min(buf.length, 65536)));
    const end = text.indexOf("\r\n\r\n");
    if (end >= 0) return { head: text.slice(0, end), rest: buf.subarray(end + 4) };
  }
}

/** Reads up to `n` body bytes (counting `rest`, already read) into `req.body`. */
async function drain(conn: Deno.Conn, req: Seen, rest: Uint8Array, n: number): Promise<void> {
  req.body = Math.min(rest.length, n);
  const buf = new Uint8Array(MiB);
  while (req.body < n) {
    const k = await conn.read(buf.subarray(0, Math.min(buf.length, n - req.body)));
    if (k === null) return;
    req.body += k;
  }
}

/** Waits until the client closes the connection (a server that never answers). */
async function stall(conn: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  while (await conn.read(buf) !== null) {
    // discard
  }
}

/** Writes all of `data` (a write may take only part of it). */
async function send(conn: Deno.Conn, data: string | Uint8Array): Promise<void> {
  let rest = typeof data === "string" ? bytes(data) : data;
  while (rest.length > 0) rest = rest.subarray(await conn.write(rest));
}

/** A disk with `dataMiB` of random data, and its qcow2 export made by diskstream. */
async function diskAndImage(dir: string, dataMiB: number): Promise<Uint8Array> {
  await writeSparse(`${dir}/disk.raw`, (dataMiB + 1) * MiB, [[0, pseudoRandom(dataMiB * MiB, 7)]]);
  const r = await runCli(["export", `${dir}/disk.raw`, "-o", `${dir}/disk.qcow2`]);
  assert.equal(r.code, 0, r.stderr);
  return await Deno.readFile(`${dir}/disk.qcow2`);
}

// ---------------------------------------------------------------------------------
// The client

Deno.test("client GET: a body past its Content-Length is cut there; broken chunks, 204, huge and binary error bodies are one line", async () => {
  await withTempDir(async (dir) => {
    const image = await diskAndImage(dir, 1);
    const server = hostile(async (conn, req) => {
      switch (req.path) {
        case "/longer": // the image, then junk the length does not cover
          await send(
            conn,
            `HTTP/1.1 200 OK\r\nContent-Type: application/x-qemu-disk\r\nContent-Length: ${image.length}\r\n\r\n`,
          );
          await send(conn, image);
          await send(conn, "JUNK".repeat(1000));
          return;
        case "/badchunk":
          await send(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-qemu-disk\r\nTransfer-Encoding: chunked\r\n\r\n" +
              "4\r\nQFI\xfb\r\nZZ\r\n",
          );
          return await stall(conn);
        case "/204":
          return void await send(conn, "HTTP/1.1 204 No Content\r\n\r\n");
        case "/huge": { // 64 MiB of error page
          await send(conn, `HTTP/1.1 500 Oops\r\nContent-Length: ${64 * MiB}\r\n\r\n`);
          const page = new Uint8Array(MiB).fill(0x78);
          for (let i = 0; i < 64; i++) await send(conn, page);
          return;
        }
        case "/binary": {
          const body = bytes("\x1b[31mred\x1b]0;title\x07\0\x01 tail");
          await send(
            conn,
            `HTTP/1.1 403 No\x1b[2J Way\r\nContent-Length: ${body.length}\r\n\r\n`,
          );
          return void await send(conn, body);
        }
      }
    });
    try {
      const longer = await runCli(["import", `${dir}/copy.raw`, "-i", `${server.url}/longer`]);
      assert.equal(longer.code, 0, longer.stderr);
      const copy = await Deno.readFile(`${dir}/copy.raw`);
      assert.deepEqual(
        copy.subarray(0, MiB),
        (await Deno.readFile(`${dir}/disk.raw`)).subarray(0, MiB),
      );

      const bad = await runCli(["import", `${dir}/bad.raw`, "-i", `${server.url}/badchunk`]);
      assert.equal(bad.code, 1);
      assertOneLine(
        bad.stderr,
        /^diskstream: the download from http:\/\/127\.0\.0\.1:\d+\/badchunk broke after 4 bytes .*: invalid HTTP\/1\.1 \(.*chunk size\)$/,
      );

      const empty = await runCli(["import", `${dir}/e.raw`, "-i", `${server.url}/204`]);
      assert.equal(empty.code, 1);
      assertOneLine(
        empty.stderr,
        /^diskstream: GET http:\/\/127\.0\.0\.1:\d+\/204: HTTP 204 No Content: the answer holds no body, so no image$/,
      );
      await assert.rejects(Deno.stat(`${dir}/e.raw`)); // nothing created

      const t0 = Date.now();
      const huge = await runCli(["import", `${dir}/h.raw`, "-i", `${server.url}/huge`]);
      assert.equal(huge.code, 1);
      assertOneLine(huge.stderr, /^diskstream: GET .*\/huge: HTTP 500 Oops: x{200}…$/);
      assert.ok(Date.now() - t0 < 20_000, "the error page is not read whole");

      const binary = await runCli(["import", `${dir}/b.raw`, "-i", `${server.url}/binary`]);
      assert.equal(binary.code, 1);
      // Control characters from the server never reach the terminal.
      // deno-lint-ignore no-control-regex
      assert.doesNotMatch(binary.stderr, /[\x00-\x08\x0b-\x1f\x7f]/);
      assertOneLine(
        binary.stderr,
        /^diskstream: GET .*\/binary: HTTP 403 No\\x1b\[2J Way: \\x1b\[31mred\\x1b\]0;title\\x07\\x00\\x01 tail$/,
      );
    } finally {
      await server.close();
    }
  });
});

Deno.test("client PUT: 201/204 after the body succeed; a 2xx with a length before the end fails; XAPI's early 200 needs a clean close", async () => {
  await withTempDir(async (dir) => {
    const image = await diskAndImage(dir, 24); // more than the socket buffers hold
    const length = image.length;
    const server = hostile(async (conn, req, rest) => {
      const n = Number(req.headers["content-length"]);
      switch (req.path) {
        case "/201":
        case "/204":
          await send(conn, "HTTP/1.1 100 Continue\r\n\r\n");
          await drain(conn, req, rest, n);
          return void await send(
            conn,
            req.path === "/201"
              ? "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
              : "HTTP/1.1 204 No Content\r\n\r\n",
          );
        case "/early": // 200 before the body, then nothing read
          await send(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
          return await new Promise((r) => setTimeout(r, 500));
        case "/half": // reads half, then says 200 and closes
          await send(conn, "HTTP/1.1 100 Continue\r\n\r\n");
          await drain(conn, req, rest, n / 2);
          return void await send(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        case "/xapi": // XAPI's import_raw_vdi: 200 at once, read all, close
          await send(conn, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
          return await drain(conn, req, rest, n);
        case "/xapi-half":
          await send(conn, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
          return await drain(conn, req, rest, n / 2);
      }
    });
    const put = (path: string) => runCli(["export", `${dir}/disk.raw`, "-o", server.url + path]);
    try {
      for (const path of ["/201", "/204", "/xapi"]) {
        const r = await put(path);
        assert.equal(r.code, 0, `${path}: ${r.stderr}`);
        assert.equal(server.seen.at(-1)!.body, length, path);
      }
      const early = await put("/early");
      assert.equal(early.code, 1);
      assertOneLine(
        early.stderr,
        /^diskstream: PUT http:\/\/127\.0\.0\.1:\d+\/early: HTTP 200 OK before any byte of the upload was sent: nothing was uploaded$/,
      );
      const half = await put("/half");
      assert.equal(half.code, 1);
      assertOneLine(
        half.stderr,
        new RegExp(
          `^diskstream: the upload to http://127\\.0\\.0\\.1:\\d+/half (was answered 200 after only|broke after) \\d+ of ${length} bytes`,
        ),
      );
      const xapiHalf = await put("/xapi-half");
      assert.equal(xapiHalf.code, 1);
      assertOneLine(
        xapiHalf.stderr,
        new RegExp(
          `^diskstream: the upload to http://127\\.0\\.0\\.1:\\d+/xapi-half broke after \\d+ of ${length} bytes .*: the server closed the connection$`,
        ),
      );
    } finally {
      await server.close();
    }
  });
});

Deno.test("client redirects: a loop ends; another server gets no credentials and a note; https never leads to http", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/disk.raw`, 4 * MiB);
    const other = hostile(async (conn, req, rest) => {
      if (req.method === "PUT") {
        await drain(conn, req, rest, Number(req.headers["content-length"]));
        return void await send(conn, "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
      }
      await send(conn, "HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\ngone\n");
    });
    const { cert, key } = await makeCert(dir);
    const server = hostile(async (conn, req) => {
      const to = req.path === "/loop" ? "/loop" : `${other.url}/final`;
      await send(
        conn,
        `HTTP/1.1 307 Temporary Redirect\r\nLocation: ${to}\r\nContent-Length: 0\r\n\r\n`,
      );
    });
    const secure = hostile(async (conn) => {
      await send(
        conn,
        `HTTP/1.1 302 Found\r\nLocation: ${other.url}/plain\r\nContent-Length: 0\r\n\r\n`,
      );
    }, { cert: await Deno.readTextFile(cert), key: await Deno.readTextFile(key) });
    try {
      for (const args of [["import", `${dir}/x.raw`, "-i"], ["export", `${dir}/disk.raw`, "-o"]]) {
        const before = server.seen.length;
        const loop = await runCli([...args, `${server.url}/loop`]);
        assert.equal(loop.code, 1);
        assertOneLine(
          loop.stderr,
          /^diskstream: (GET|PUT) .*\/loop: more than 5 redirects; give the final URL$/,
        );
        assert.equal(server.seen.length - before, 6);
      }

      const creds = [
        "--header",
        "Authorization: Bearer SECRET",
        "--header",
        "Cookie: session_id=S",
      ];
      const base = server.url.replace("http://", "http://u:pw@");
      const get = await runCli(["import", `${dir}/x.raw`, "-i", `${base}/away`, ...creds]);
      assert.equal(get.code, 1);
      const lines = get.stderr.trimEnd().split("\n");
      assert.equal(lines.length, 2, get.stderr);
      assert.match(
        lines[0],
        /^diskstream: note: http:\/\/u:\*\*\*@127\.0\.0\.1:\d+\/away redirects to another server, http:\/\/127\.0\.0\.1:\d+\/final: /,
      );
      assert.match(
        lines[1],
        /^diskstream: GET http:\/\/127\.0\.0\.1:\d+\/final: HTTP 404 Not Found: gone$/,
      );
      const put = await runCli(["export", `${dir}/disk.raw`, "-o", `${server.url}/away`, ...creds]);
      assert.equal(put.code, 0, put.stderr);
      assert.match(put.stderr, /^diskstream: note: .* redirects to another server/);
      assert.equal(server.seen.at(-1)!.headers.authorization, "Bearer SECRET");
      assert.equal(other.seen.length, 2);
      for (const req of other.seen) {
        assert.equal(req.headers.authorization, undefined, `${req.method} leaked Authorization`);
        assert.equal(req.headers.cookie, undefined, `${req.method} leaked the cookie`);
      }
      assert.ok(other.seen[1].body > 0); // the body went along with the 307

      const down = await runCli([
        "import",
        `${dir}/y.raw`,
        "-i",
        `${secure.url}/x`,
        "--cacert",
        cert,
      ]);
      assert.equal(down.code, 1);
      assertOneLine(
        down.stderr,
        /^diskstream: GET https:\/\/127\.0\.0\.1:\d+\/x: HTTP 302 redirects to http:\/\/127\.0\.0\.1:\d+\/plain, which is not HTTPS: /,
      );
      assert.equal(other.seen.length, 2); // never asked
    } finally {
      await Promise.all([server.close(), secure.close(), other.close()]);
    }
  });
});

Deno.test("client TLS: an untrusted certificate is refused before any byte of the disk goes out", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/disk.raw`, 4 * MiB);
    const { cert, key } = await makeCert(dir);
    const server = hostile(async (conn, req, rest) => {
      await drain(conn, req, rest, Number(req.headers["content-length"] ?? 0));
      await send(conn, "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    }, { cert: await Deno.readTextFile(cert), key: await Deno.readTextFile(key) });
    try {
      const up = await runCli(["export", `${dir}/disk.raw`, "-o", `${server.url}/up`]);
      assert.equal(up.code, 1);
      assertOneLine(
        up.stderr,
        /^diskstream: PUT https:\/\/127\.0\.0\.1:\d+\/up: the server's certificate is not trusted: .*--cacert FILE/,
      );
      const down = await runCli(["import", `${dir}/x.raw`, "-i", `${server.url}/x`]);
      assert.equal(down.code, 1);
      assert.match(down.stderr, /certificate is not trusted/);
      assert.equal(server.seen.length, 0); // no request got through the handshake
      await assert.rejects(Deno.stat(`${dir}/x.raw`));
      const trusted = await runCli([
        "export",
        `${dir}/disk.raw`,
        "-o",
        `${server.url}/up`,
        "--cacert",
        cert,
      ]);
      assert.equal(trusted.code, 0, trusted.stderr);
      assert.ok(server.seen[0].body > 0);
    } finally {
      await server.close();
    }
  });
});

Deno.test("client stalls: the library gives up after its idle timeout, naming the bytes", async () => {
  const server = hostile(async (conn, req) => {
    if (req.path === "/headers") return await stall(conn);
    if (req.path === "/body") {
      await send(conn, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nQFI\xfb");
      return await stall(conn);
    }
    await new Promise((r) => setTimeout(r, 3000)); // /noread: never reads the upload
  });
  try {
    const t0 = Date.now();
    await assert.rejects(
      httpGet(`${server.url}/headers`, { idleTimeoutMs: 300 }),
      (e) =>
        e instanceof HttpTransferError && /\/headers: no byte moved for 0\.3 s/.test(e.message),
    );
    const d = await httpGet(`${server.url}/body`, { idleTimeoutMs: 300 });
    await assert.rejects(
      new Response(d.stream).arrayBuffer(),
      (e) =>
        e instanceof HttpTransferError &&
        /\/body broke after 4 of 1000 bytes .*: no byte moved for 0\.3 s/.test(e.message),
    );
    const zeros = new Uint8Array(8 * MiB);
    await assert.rejects(
      httpPut(`${server.url}/noread`, ReadableStream.from([zeros, zeros, zeros, zeros]), 32 * MiB, {
        idleTimeoutMs: 300,
      }),
      (e) => e instanceof HttpTransferError && /no byte moved for 0\.3 s/.test(e.message),
    );
    assert.ok(Date.now() - t0 < 10_000);
  } finally {
    await server.close();
  }
});

Deno.test("client stalls: SIGTERM ends a download or an upload that waits for a silent server", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/disk.raw`, 4 * MiB);
    const server = hostile(async (conn, req, rest) => {
      if (req.method === "GET") {
        await send(
          conn,
          "HTTP/1.1 200 OK\r\nContent-Type: application/x-qemu-disk\r\nContent-Length: 1000000\r\n\r\nQFI\xfb",
        );
      } else {
        await send(conn, "HTTP/1.1 100 Continue\r\n\r\n");
        await drain(conn, req, rest, Number(req.headers["content-length"]));
      }
      await stall(conn); // and never a word more
    });
    try {
      const dest = `${dir}/copy.raw`;
      const down = new CliChild(["import", dest, "-i", `${server.url}/d.qcow2`]);
      await until(() => Promise.resolve(server.seen.length === 1), "the GET");
      await down.waitForHandlers();
      await new Promise((r) => setTimeout(r, 300)); // the import now waits for bytes
      const a = await down.stop("SIGTERM");
      assert.equal(a.code, 128 + 15, a.stderr);
      assertOneLine(a.stderr, /^diskstream: import into .*copy\.raw interrupted by SIGTERM: /);
      assert.ok(a.ms < 5000, `stopped after ${a.ms} ms`);
      await assert.rejects(Deno.stat(dest));

      const up = new CliChild(["export", `${dir}/disk.raw`, "-o", `${server.url}/up`]);
      await until(
        () => Promise.resolve(server.seen.length === 2 && server.seen[1].body > 0),
        "the upload",
      );
      await up.waitForHandlers();
      const b = await up.stop("SIGTERM");
      assert.equal(b.code, 128 + 15, b.stderr);
      assertOneLine(
        b.stderr,
        /^diskstream: interrupted by SIGTERM: the upload to http:\/\/127\.0\.0\.1:\d+\/up stopped after \d+ of \d+ bytes/,
      );
      assert.ok(b.ms < 5000, `stopped after ${b.ms} ms`);
    } finally {
      await server.close();
    }
  });
});

// ---------------------------------------------------------------------------------
// The server

/** Sends `request` on a new connection; the answer up to the server's close (or `ms`). */
async function raw(port: number, request: string | Uint8Array, ms = 10_000): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => conn.close(), ms);
  try {
    await send(conn, request).catch(() => {});
    const parts: Uint8Array[] = [];
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await conn.read(buf).catch(() => null);
      if (n === null) break;
      parts.push(buf.slice(0, n));
    }
    return parts.map(latin1).join("");
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // closed by the timer
    }
  }
}

const GET_DISKS = "GET /disks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/** The server answers, and its process still runs. */
async function assertUp(server: ServerProcess): Promise<void> {
  assert.match(await raw(server.port, GET_DISKS), /^HTTP\/1\.1 200 OK/);
}

/** The server's RSS in bytes. */
async function rss(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]) * 1024;
}

Deno.test("server: a target that is no URL, non-HTTP requests, huge headers: short 4xx, and it stays up", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 4 * MiB);
    const server = await startServer(["--disk", `a=${dir}/a.raw`]);
    try {
      const cases: [string, RegExp][] = [
        // Used to kill the server: an uncaught "Invalid URL" from new URL().
        [
          "GET http://[/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          /^HTTP\/1\.1 400 .*\r\n\r\nthe request's target is not a valid path\n$/s,
        ],
        [
          "FOO /disks HTTP/1.1\r\nHost: x\r\n\r\n",
          /^HTTP\/1\.1 400 Bad Request\r\n.*\r\n\r\nthe request is not valid HTTP\/1\.1\n$/s,
        ],
        [
          "PUT /import_raw_vdi?vdi=a HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello",
          /^HTTP\/1\.1 400 Bad Request\r\n/,
        ],
        [
          "PUT /import_raw_vdi?vdi=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
          /^HTTP\/1\.1 400 Bad Request\r\n/,
        ],
        [
          "PUT /import_raw_vdi?vdi=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
          /^HTTP\/1\.1 400 Bad Request\r\n/,
        ],
        [
          `GET /disks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${"x".repeat(100_000)}\r\n\r\n`,
          /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/,
        ],
        [
          "OPTIONS /export_raw_vdi?vdi=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          /^HTTP\/1\.1 405 /,
        ],
        [
          "HEAD /import_raw_vdi?vdi=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          /^HTTP\/1\.1 405 /,
        ],
        [
          "GET /export_raw_vdi?vdi=a&format=qcow3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          /^HTTP\/1\.1 400 .*format 'qcow3' is not served here/s,
        ],
      ];
      for (const [request, want] of cases) {
        const answer = await raw(server.port, request);
        assert.match(answer, want, `${request.slice(0, 60)} → ${answer.slice(0, 200)}`);
        assert.ok(answer.length < 1000, "a short answer");
        await assertUp(server);
      }
      await server.waitLog(/"GET \(invalid target\)" 400 /);
    } finally {
      await server.stop();
    }
  });
});

Deno.test("server: names that are paths never reach the file system; control characters stay in one log line", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 4 * MiB);
    await Deno.mkdir(`${dir}/served`);
    await Deno.rename(`${dir}/a.raw`, `${dir}/served/a.raw`);
    await Deno.writeFile(`${dir}/secret.raw`, pseudoRandom(MiB, 9));
    const hashes = async () => [
      await sha256File(`${dir}/secret.raw`),
      await sha256File(`${dir}/served/a.raw`),
    ];
    const before = await hashes();
    const server = await startServer(["--disk", `a=${dir}/served/a.raw`]);
    try {
      const names = [
        `${dir}/secret.raw`,
        "../secret.raw",
        "a/../../secret.raw",
        "a%00",
        "__proto__",
      ];
      for (const name of names) {
        const q = encodeURIComponent(name);
        for (
          const request of [
            `GET /export_raw_vdi?vdi=${q}&format=raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
            `GET /export_raw_vdi?vdi=a&base=${q}&format=qcow2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
            `PUT /import_raw_vdi?vdi=${q}&format=raw HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nEVIL`,
          ]
        ) {
          const answer = await raw(server.port, request);
          assert.match(answer, /^HTTP\/1\.1 404 Not Found\r\n.*no disk named '.*' here/s, request);
          assert.ok(!answer.includes(`${dir}/served`), "the served disk's path is not told");
        }
      }
      for (const target of [`/..${dir}/secret.raw`, `${dir}/secret.raw`, "/../../etc/passwd"]) {
        const answer = await raw(
          server.port,
          `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
        );
        assert.match(answer, /^HTTP\/1\.1 404 Not Found\r\n.*no such endpoint/s);
      }
      assert.deepEqual(await hashes(), before);

      await raw(
        server.port,
        "GET /export_raw_vdi?vdi=a%0a2099-01-01T00:00:00.000Z%20FORGED%1b[2J HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
      );
      await server.waitLog(/no disk named 'a\\x0a2099/);
      assert.doesNotMatch(server.log(), /^2099-01-01/m);
      // deno-lint-ignore no-control-regex
      assert.doesNotMatch(server.log(), /\x1b/);
    } finally {
      await server.stop();
    }
  });
});

Deno.test("server: imports whose body lies about its length, or holds more than the disk", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 4 * MiB);
    const server = await startServer(["--disk", `a=${dir}/a.raw`]);
    const put = (format: string, headers: string, body = "") =>
      `PUT /import_raw_vdi?vdi=a&format=${format} HTTP/1.1\r\nHost: x\r\n${headers}Connection: close\r\n\r\n${body}`;
    const chunked = (mib: number) =>
      `${"100000\r\n".concat("z".repeat(MiB), "\r\n").repeat(mib)}0\r\n\r\n`;
    const state = async () =>
      JSON.parse((await raw(server.port, GET_DISKS)).split("\r\n\r\n")[1])[0].state;
    try {
      const hash = await sha256File(`${dir}/a.raw`);
      // More than 16 digits used to pass as "no length": now refused before reading.
      const absurd = await raw(
        server.port,
        put("raw", "Content-Length: 100000000000000000\r\n"),
        5000,
      );
      assert.match(
        absurd,
        /^HTTP\/1\.1 413 .*the body holds 100000000000000000 bytes but disk 'a' has 4194304: nothing was written/s,
      );
      assert.equal(await sha256File(`${dir}/a.raw`), hash);
      assert.equal(await state(), "ready");

      // A qcow2 upload that announces a petabyte: nothing is sized by it.
      const before = await rss(server.pid);
      await raw(server.port, put("qcow2", "Content-Length: 1000000000000000\r\n", "QFI\xfb"), 1000);
      await server.waitLog(
        /"PUT \/import_raw_vdi\?vdi=a&format=qcow2" 499 .*the disk is unchanged: .*broke after 4 of 1000000000000000 bytes/,
      );
      assert.ok((await rss(server.pid)) - before < 64 * MiB);
      // It broke before its first write: the disk is as it was, not marked failed.
      assert.equal(await sha256File(`${dir}/a.raw`), hash);
      assert.equal(await state(), "ready");

      // Shorter than its length, then gone: the import failed, and says so (its 5 bytes
      // never reached the disk, which is left as it was).
      await raw(server.port, put("raw", "Content-Length: 1000\r\n", "short"), 1000);
      await server.waitLog(
        /"PUT \/import_raw_vdi\?vdi=a&format=raw" 499 .*failed, the disk is unchanged: .*broke after 5 of 1000 bytes/,
      );
      assert.equal(await sha256File(`${dir}/a.raw`), hash);
      assert.equal(await state(), "ready");

      // A chunked raw body longer than the disk: 400, and nothing past its end.
      const longer = await raw(
        server.port,
        put("raw", "Transfer-Encoding: chunked\r\n", chunked(5)),
      );
      assert.match(longer, /^HTTP\/1\.1 400 .*holds more than the 4194304 bytes/s);
      assert.equal((await Deno.stat(`${dir}/a.raw`)).size, 4 * MiB);

      // A chunked raw body that ends, short: the client is there to read a 400, not a 499.
      const short = await raw(
        server.port,
        put("raw", "Transfer-Encoding: chunked\r\n", chunked(2)),
      );
      assert.match(
        short,
        /^HTTP\/1\.1 400 Bad Request\r\n.*ended after 2097152 of the 4194304 bytes/s,
      );
      await assertUp(server);
    } finally {
      await server.stop();
    }
  });
});

Deno.test("server: a thousand connections and a burst of bad requests: bounded, and it stays up", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/a.raw`, 4 * MiB);
    const server = await startServer(["--disk", `a=${dir}/a.raw`]);
    const conns: Deno.Conn[] = [];
    try {
      const base = await rss(server.pid);
      // Each sends half a request head and waits: beyond 256 they are closed at once.
      for (let i = 0; i < 1000; i++) {
        const c = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
        conns.push(c);
        await send(c, `GET /disks HTTP/1.1\r\nHost: x\r\nX-Pad: ${"p".repeat(8000)}`)
          .catch(() => {}); // closed by the server already
      }
      const closed = await Promise.all(conns.map(async (c) => {
        const buf = new Uint8Array(16);
        const r = await Promise.race([
          c.read(buf).then((n) => n === null, () => true),
          new Promise<false>((res) => setTimeout(() => res(false), 2000)),
        ]);
        return r;
      }));
      const open = closed.filter((c) => !c).length;
      assert.ok(open <= 256, `${open} connections held open`);
      assert.ok((await rss(server.pid)) - base < 100 * MiB);
      for (const c of conns.splice(0)) c.close();

      await new Promise((r) => setTimeout(r, 500));
      const bad = [
        "GET http://[/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /export_raw_vdi?vdi=nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "PUT /import_raw_vdi?vdi=a&format=zip HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
      ];
      const answers = await Promise.all(
        Array.from({ length: 200 }, (_, i) => raw(server.port, bad[i % bad.length])),
      );
      for (const a of answers) assert.match(a, /^HTTP\/1\.1 4\d\d /, a.slice(0, 100));
      await assertUp(server);
    } finally {
      for (const c of conns) c.close();
      await server.stop();
    }
  });
});
