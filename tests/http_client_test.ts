/**
 * The HTTP client against real peers: `export -o URL` and `import -i URL` with nginx
 * (DAV PUT, static GET, redirects, basic auth, errors), and hand-made misbehaving
 * servers for what nginx does not do (bodies cut short, connections dropped).
 */
import assert from "node:assert/strict";
import { imagesEqual, runCli, sha256File, withTempDir } from "./helpers.ts";
import { makeDisk, type Nginx, startNginx, toolTest } from "./http_fixtures.ts";

const MiB = 1 << 20;

/** A test with nginx running and a disk at `dir/disk.raw`. */
function nginxTest(
  name: string,
  tools: string[],
  fn: (dir: string, nginx: Nginx) => Promise<void>,
): void {
  toolTest(name, ["nginx", ...tools], () =>
    withTempDir(async (dir) => {
      const nginx = await startNginx(`${dir}/ng`);
      try {
        await makeDisk(`${dir}/disk.raw`);
        await fn(dir, nginx);
      } finally {
        await nginx.stop();
      }
    }));
}

nginxTest(
  "export -o http:// uploads to nginx with an exact Content-Length",
  ["qemu-img"],
  async (dir, nginx) => {
    for (const format of ["qcow2", "vhd"]) {
      const r = await runCli([
        "export",
        `${dir}/disk.raw`,
        "-f",
        format,
        "-o",
        `${nginx.url}/dav/up/disk.${format}`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      const local = await runCli([
        "export",
        `${dir}/disk.raw`,
        "-f",
        format,
        "-o",
        `${dir}/l.${format}`,
      ]);
      assert.equal(local.code, 0, local.stderr);
      const uploaded = `${nginx.root}/dav/up/disk.${format}`;
      if (format === "qcow2") {
        assert.equal(await sha256File(uploaded), await sha256File(`${dir}/l.${format}`));
      } else {
        // A VHD footer holds its time of creation: compare sizes and guest bytes.
        assert.equal((await Deno.stat(uploaded)).size, (await Deno.stat(`${dir}/l.vhd`)).size);
      }
      assert.ok(
        await imagesEqual(
          `${dir}/disk.raw`,
          uploaded,
          "raw",
          format === "vhd" ? "vpc" : "qcow2",
        ),
      );
      const size = (await Deno.stat(uploaded)).size;
      // nginx saw a Content-Length (not chunked) equal to the file, after 100-continue.
      const log = await nginx.accessLog();
      assert.match(
        log,
        new RegExp(`PUT /dav/up/disk\\.${format} HTTP/1\\.1 201 ${size} "-" "100-continue"`),
      );
    }
  },
);

nginxTest(
  "import -i http:// downloads from nginx, format from the bytes",
  ["qemu-img"],
  async (dir, nginx) => {
    assert.equal(
      (await runCli(["export", `${dir}/disk.raw`, "-o", `${nginx.root}/dav/d.qcow2`])).code,
      0,
    );
    const r = await runCli(["import", `${dir}/copy.raw`, "-i", `${nginx.url}/dav/d.qcow2`]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(await sha256File(`${dir}/copy.raw`), await sha256File(`${dir}/disk.raw`));
    // Through a 307 redirect too, and with -f given.
    const r2 = await runCli([
      "import",
      `${dir}/copy2.raw`,
      "-f",
      "qcow2",
      "-i",
      `${nginx.url}/old/d.qcow2`,
    ]);
    assert.equal(r2.code, 0, r2.stderr);
    assert.equal(await sha256File(`${dir}/copy2.raw`), await sha256File(`${dir}/disk.raw`));
  },
);

nginxTest(
  "PUT follows a 307 with its body; a 303 and errors end with one line",
  [],
  async (dir, nginx) => {
    const r = await runCli(["export", `${dir}/disk.raw`, "-o", `${nginx.url}/old/moved.qcow2`]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await Deno.stat(`${nginx.root}/dav/moved.qcow2`)).isFile, true);

    const seeOther = await runCli([
      "export",
      `${dir}/disk.raw`,
      "-o",
      `${nginx.url}/see-other`,
    ]);
    assert.equal(seeOther.code, 1);
    assert.match(
      seeOther.stderr,
      /^diskstream: PUT .*\/see-other: HTTP 303 redirects to .* upload to the new URL directly\n$/,
    );

    // nginx refuses PUT outside the DAV location: 405 and the first line of its page.
    const refused = await runCli([
      "export",
      `${dir}/disk.raw`,
      "-o",
      `${nginx.url}/nodav.qcow2`,
    ]);
    assert.equal(refused.code, 1);
    assert.match(
      refused.stderr,
      /^diskstream: PUT http:\/\/127\.0\.0\.1:\d+\/nodav\.qcow2: HTTP 405 Not Allowed: 405 Not Allowed\n$/,
    );

    const missing = await runCli([
      "import",
      `${dir}/x.raw`,
      "-i",
      `${nginx.url}/dav/none.qcow2`,
    ]);
    assert.equal(missing.code, 1);
    assert.match(
      missing.stderr,
      /^diskstream: GET .*\/dav\/none\.qcow2: HTTP 404 Not Found: 404 Not Found\n$/,
    );
    await assert.rejects(Deno.stat(`${dir}/x.raw`)); // nothing created
  },
);

nginxTest("basic auth from the URL's user-info; --header is sent", [], async (dir, nginx) => {
  const base = nginx.url.replace("http://", "");
  const denied = await runCli([
    "export",
    `${dir}/disk.raw`,
    "-o",
    `http://u:wrong@${base}/private/a.qcow2`,
  ]);
  assert.equal(denied.code, 1);
  assert.match(denied.stderr, /HTTP 401 Unauthorized: 401 Authorization Required/);
  assert.doesNotMatch(denied.stderr, /wrong/); // the password is not printed
  const ok = await runCli([
    "export",
    `${dir}/disk.raw`,
    "-o",
    `http://u:p%20w@${base}/private/a.qcow2`,
  ]);
  assert.equal(ok.code, 0, ok.stderr);
  // The same credentials as a header.
  const header = await runCli([
    "export",
    `${dir}/disk.raw`,
    "-o",
    `${nginx.url}/private/b.qcow2`,
    "--header",
    `Authorization: Basic ${btoa("u:p w")}`,
  ]);
  assert.equal(header.code, 0, header.stderr);
  assert.equal(
    await sha256File(`${nginx.root}/private/a.qcow2`),
    await sha256File(`${nginx.root}/private/b.qcow2`),
  );
  const bad = await runCli([
    "export",
    `${dir}/disk.raw`,
    "-o",
    `${nginx.url}/dav/c`,
    "--header",
    "nocolon",
  ]);
  assert.equal(bad.code, 2);
  const notUrl = await runCli(["export", `${dir}/disk.raw`, "-o", `${dir}/f`, "--insecure"]);
  assert.equal(notUrl.code, 2);
  assert.match(notUrl.stderr, /--insecure applies to an http\(s\):\/\/ -o\/--output only/);
});

/** A server that answers each connection with `answer` (raw bytes), then closes. */
function rawServer(answer: (request: string) => Uint8Array | string, readBody = 0) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const serving = (async () => {
    for await (const conn of listener) {
      const buf = new Uint8Array(64 * 1024);
      const n = await conn.read(buf) ?? 0;
      const request = new TextDecoder().decode(buf.subarray(0, n));
      let got = 0;
      while (got < readBody) {
        const k = await conn.read(buf);
        if (k === null) break;
        got += k;
      }
      const a = answer(request);
      await conn.write(typeof a === "string" ? new TextEncoder().encode(a) : a).catch(() => {});
      conn.close();
    }
  })();
  return {
    url: `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    async close() {
      listener.close();
      await serving.catch(() => {});
    },
  };
}

Deno.test("a download cut short never reports success, and names the bytes", async () => {
  await withTempDir(async (dir) => {
    const server = rawServer(() =>
      "HTTP/1.1 200 OK\r\nContent-Type: application/x-qemu-disk\r\nContent-Length: 1000000\r\n\r\n" +
      "QFI\xfb".padEnd(300, "\0")
    );
    try {
      const r = await runCli(["import", `${dir}/d.raw`, "-i", `${server.url}/x`]);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /^diskstream: the download from .* broke after \d+ of 1000000 bytes/,
      );
      const chunked = rawServer(() =>
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n"
      );
      try {
        const r2 = await runCli([
          "import",
          `${dir}/e.raw`,
          "-f",
          "qcow2",
          "-i",
          `${chunked.url}/x`,
        ]);
        assert.equal(r2.code, 1);
        assert.match(
          r2.stderr,
          /broke after 16 bytes .*: the server closed the connection|closed before the end/,
        );
      } finally {
        await chunked.close();
      }
    } finally {
      await server.close();
    }
  });
});

Deno.test("an upload whose connection drops names how many bytes got through", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/disk.raw`);
    // Reads about 2 MiB of the body, then closes without an answer.
    const server = rawServer(() => "", 2 * MiB);
    try {
      const r = await runCli(["export", `${dir}/disk.raw`, "-o", `${server.url}/up`]);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /^diskstream: the upload to http:\/\/127\.0\.0\.1:\d+\/up broke after \d+ of \d+ bytes .*: the server closed the connection\n$/,
      );
    } finally {
      await server.close();
    }
  });
});

Deno.test("a refused connection is one line", async () => {
  await withTempDir(async (dir) => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (listener.addr as Deno.NetAddr).port;
    listener.close();
    const r = await runCli(["import", `${dir}/d.raw`, "-i", `http://127.0.0.1:${port}/x`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^diskstream: GET http:\/\/127\.0\.0\.1:\d+\/x: connection refused/);
  });
});

Deno.test("a 307 after the upload started is not followed: the stream cannot be replayed", async () => {
  await withTempDir(async (dir) => {
    await makeDisk(`${dir}/disk.raw`);
    // Reads 1 MiB of the body, then redirects.
    const server = rawServer(
      () => "HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
      MiB,
    );
    try {
      const r = await runCli(["export", `${dir}/disk.raw`, "-o", `${server.url}/up`]);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /^diskstream: PUT .*\/up: HTTP 307 redirects to \/elsewhere after \d+ of \d+ bytes .* cannot be replayed: run again with that URL\n$/,
      );
    } finally {
      await server.close();
    }
  });
});
