/**
 * NBD: URIs, the client against real servers (nbdkit, qemu-nbd, with and without
 * TLS, structured replies, multi-conn), export from and import to NBD exports checked
 * with qemu-img and nbdcopy, `--allocation nbd://…` and `--diff` with an NBD base, and
 * the failures (refused export, error replies, dropped connections, bad replies from a
 * scripted server) as one-line errors.
 */
import assert from "node:assert/strict";
import { imagesEqual, pseudoRandom, qemu, runCli, withTempDir, writeSparse } from "./helpers.ts";
import {
  makeCertificates,
  nbdcopyTo,
  nbdinfoData,
  nbdTest,
  startNbdkit,
  startQemuNbd,
} from "./nbd_servers.ts";
import { isNbdUri, nbdUnixUri, parseNbdUri } from "../lib/nbd/uri.ts";
import { NbdExport } from "../lib/nbd/client.ts";
import { NbdError, UsageError } from "../lib/errors.ts";

const MiB = 1024 * 1024;

Deno.test("nbd URIs: the forms of the NBD URI spec", () => {
  const tcp = parseNbdUri("nbd://example.com:10810/disk");
  assert.deepEqual(tcp.transport, { kind: "tcp", host: "example.com", port: 10810 });
  assert.equal(tcp.exportName, "disk");
  assert.equal(tcp.tls, false);
  assert.equal(parseNbdUri("nbd://example.com").exportName, "");
  assert.equal(parseNbdUri("nbd://example.com/").exportName, "");
  assert.equal(parseNbdUri("nbd://example.com//disk").exportName, "/disk");
  assert.equal(parseNbdUri("nbd://example.com/hello%20world").exportName, "hello world");
  assert.equal((parseNbdUri("nbd://h/x").transport as { port: number }).port, 10809);
  const v6 = parseNbdUri("nbds://[::1]:9000/e");
  assert.deepEqual(v6.transport, { kind: "tcp", host: "::1", port: 9000 });
  assert.equal(v6.tls, true);
  const unix = parseNbdUri("nbd+unix:///disk?socket=/run/nbd.sock");
  assert.deepEqual(unix.transport, { kind: "unix", socket: "/run/nbd.sock" });
  assert.equal(unix.exportName, "disk");
  const tlsUnix = parseNbdUri("nbds+unix:///?socket=s.sock&tls-hostname=server.lan");
  assert.equal(tlsUnix.tls, true);
  assert.equal(tlsUnix.tlsHostname, "server.lan");
  assert.equal(parseNbdUri("nbds://host.lan/d").tlsHostname, "host.lan");
  assert.ok(isNbdUri("NBD://x/y") && isNbdUri("nbds+unix:///?socket=a"));
  const built = parseNbdUri(nbdUnixUri("/run/a b.sock", "vdi/1 x"));
  assert.deepEqual(built.transport, { kind: "unix", socket: "/run/a b.sock" });
  assert.equal(built.exportName, "vdi/1 x");
  assert.ok(!isNbdUri("/dev/sda") && !isNbdUri("http://x/y") && !isNbdUri("disk.raw"));
  for (
    const [bad, why] of [
      ["nbd+unix:///disk", /needs \?socket=PATH/],
      ["nbd:///disk", /names no host/],
      ["nbd://h/d?socket=/s", /belongs to nbd\+unix/],
      ["nbd://h/d?color=red", /unknown NBD URI parameter 'color'/],
      ["nbds://h/d?tls-verify-peer=0", /always verified/],
      ["nbds://h/d?tls-type=psk", /tls-type=x509/],
      ["nbd://user@h/d", /user names/],
      ["nbd+unix://host/d?socket=/s", /no host/],
    ] as const
  ) {
    assert.throws(
      () => parseNbdUri(bad),
      (e: Error) => e instanceof UsageError && why.test(e.message),
    );
  }
});

/**
 * Checks every read in an nbdkit log lies inside `data` widened to whole clusters of
 * `unit` bytes; returns the bytes read.
 */
function readsWithin(log: string, data: [number, number][], unit: number): number {
  const widened: [number, number][] = [];
  for (const [a, b] of data) {
    const [wa, wb] = [Math.floor(a / unit) * unit, Math.ceil(b / unit) * unit];
    const last = widened[widened.length - 1];
    if (last !== undefined && wa <= last[1]) last[1] = Math.max(last[1], wb);
    else widened.push([wa, wb]);
  }
  const reads = [...log.matchAll(/Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)]
    .map((m) => [parseInt(m[1], 16), parseInt(m[2], 16)]);
  assert.ok(reads.length > 0);
  for (const [offset, count] of reads) {
    assert.ok(
      widened.some(([a, b]) => offset >= a && offset + count <= b),
      `read of ${count} bytes at ${offset} outside the data extents`,
    );
  }
  return reads.reduce((s, [, c]) => s + c, 0);
}

nbdTest(
  "nbd export: sparse nbdkit export → qcow2 and VHD, only the data extents read",
  async () => {
    await withTempDir(async (dir) => {
      const log = `${dir}/nbdkit.log`;
      const server = await startNbdkit(dir, [
        "--filter=log",
        "sparse-random",
        "256M",
        "seed=11",
        "percent=5",
        "runlength=524288",
        `logfile=${log}`,
      ]);
      try {
        await nbdcopyTo(server.uri, `${dir}/ref.raw`);
        const data = await nbdinfoData(server.uri);
        assert.ok(data.length > 1, "the export has several data extents");
        const before = (await Deno.readTextFile(log)).length; // nbdcopy's and nbdinfo's requests
        const r = await runCli(["export", server.uri, "-o", `${dir}/out.qcow2`, "-c", "64K"]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(`${dir}/out.qcow2`, `${dir}/ref.raw`, "qcow2", "raw"));
        // Every read lies inside the data extents (widened to whole 64 KiB clusters).
        const logged = await Deno.readTextFile(log);
        const dataBytes = data.reduce((s, [a, b]) => s + b - a, 0);
        const readBytes = readsWithin(logged.slice(before), data, 65536);
        assert.ok(readBytes < dataBytes + 4 * MiB, `read ${readBytes} for ${dataBytes} of data`);
        // The same export as VHD (2 MiB blocks).
        const v = await runCli(["export", server.uri, "-f", "vhd", "-o", `${dir}/out.vhd`]);
        assert.equal(v.code, 0, v.stderr);
        assert.ok(await imagesEqual(`${dir}/out.vhd`, `${dir}/ref.raw`, "vpc", "raw"));
        readsWithin((await Deno.readTextFile(log)).slice(logged.length), data, 2 * MiB);
      } finally {
        await server.stop();
      }
    });
  },
);

nbdTest("nbd export: qemu-nbd serving a qcow2 with holes, over TCP, 4 connections", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/src.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", image, "48M"]);
    await qemu(
      ["-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 40M 512k", image],
      "qemu-io",
    );
    await qemu(["-c", "write -z 2M 64k", image], "qemu-io");
    const { freePort } = await import("./nbd_servers.ts");
    const server = await startQemuNbd(dir, image, { format: "qcow2", port: freePort() });
    try {
      const nbd = await NbdExport.open(server.uri, { connections: 4 });
      assert.equal(nbd.connections, 4, "qemu-nbd -r advertises multi-conn");
      assert.equal(nbd.size, 48 * MiB);
      const extents = await nbd.extents();
      assert.deepEqual(extents, [[1 * MiB, 2 * MiB], [2 * MiB + 65536, 4 * MiB], [
        40 * MiB,
        40 * MiB + 512 * 1024,
      ]]);
      await nbd.close();
      const r = await runCli(["export", server.uri, "-o", `${dir}/out.qcow2`]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(await imagesEqual(`${dir}/out.qcow2`, image, "qcow2", "qcow2"));
      const map = JSON.parse(await qemu(["map", "--output=json", `${dir}/out.qcow2`])) as {
        start: number;
        length: number;
        data: boolean;
      }[];
      const dataBytes = map.filter((m) => m.data).reduce((s, m) => s + m.length, 0);
      assert.equal(dataBytes, 3 * MiB - 65536 + 512 * 1024, "holes and zero extents left out");
    } finally {
      await server.stop();
    }
  });
});

nbdTest("nbd export: TLS (nbds:// and nbds+unix://) with --cacert; refusals", async () => {
  await withTempDir(async (dir) => {
    const pki = `${dir}/pki`;
    await makeCertificates(pki);
    const other = `${dir}/other`;
    await makeCertificates(other);
    const disk = `${dir}/disk.raw`;
    await writeSparse(disk, 8 * MiB, [[3 * MiB, pseudoRandom(MiB, 3)]]);
    const { freePort } = await import("./nbd_servers.ts");
    const tcp = await startQemuNbd(dir, disk, { tlsDir: pki, port: freePort() });
    const unix = await startQemuNbd(dir, disk, { tlsDir: pki });
    try {
      assert.match(tcp.uri, /^nbds:\/\/127\.0\.0\.1:\d+\/disk$/);
      for (const uri of [tcp.uri, unix.uri]) {
        const out = `${dir}/out-${uri.startsWith("nbds+unix") ? "unix" : "tcp"}.qcow2`;
        const r = await runCli(["export", uri, "--cacert", `${pki}/ca-cert.pem`, "-o", out]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(out, disk, "qcow2", "raw"));
      }
      // A CA that did not sign the server's certificate.
      const bad = await runCli([
        "export",
        tcp.uri,
        "--cacert",
        `${other}/ca-cert.pem`,
        "-o",
        `${dir}/x`,
      ]);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, /^diskstream: nbds:\/\/.*TLS handshake failed/);
      assert.equal(bad.stderr.trim().split("\n").length, 1, bad.stderr);
      // Cleartext to a TLS-only server.
      const clear = await runCli(["export", tcp.uri.replace("nbds:", "nbd:"), "-o", `${dir}/y`]);
      assert.equal(clear.code, 1);
      assert.match(clear.stderr, /requires TLS: use nbds:\/\//);
      // TLS asked of a server that has none: refused, never downgraded.
      const plain = await startNbdkit(dir, ["memory", "1M"]);
      try {
        const r = await runCli([
          "export",
          plain.uri.replace("nbd+unix:", "nbds+unix:"),
          "-o",
          `${dir}/z`,
        ]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /the server does not offer TLS/);
      } finally {
        await plain.stop();
      }
    } finally {
      await tcp.stop();
      await unix.stop();
    }
  });
});

nbdTest("nbd export: a server without structured replies, and without multi-conn", async () => {
  await withTempDir(async (dir) => {
    const disk = `${dir}/disk.raw`;
    await writeSparse(disk, 16 * MiB, [[MiB, pseudoRandom(2 * MiB, 5)], [
      9 * MiB,
      pseudoRandom(4096, 6),
    ]]);
    const noSr = await startNbdkit(dir, ["--no-sr", "file", disk]);
    const noMc = await startNbdkit(dir, [
      "--filter=multi-conn",
      "file",
      disk,
      "multi-conn-mode=disable",
    ]);
    try {
      const plain = await NbdExport.open(noSr.uri);
      assert.equal(plain.info.structured, false);
      assert.equal(await plain.extents(), null, "no block status without structured replies");
      await plain.close();
      const single = await NbdExport.open(noMc.uri, { connections: 8 });
      assert.equal(single.info.canMultiConn, false);
      assert.equal(single.connections, 1);
      await single.close();
      for (const [name, server] of [["no-sr", noSr], ["no-mc", noMc]] as const) {
        const out = `${dir}/${name}.qcow2`;
        const r = await runCli(["export", server.uri, "-o", out, "--connections", "8"]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(out, disk, "qcow2", "raw"), name);
        const info = JSON.parse(await qemu(["info", "--output=json", out]));
        assert.equal(info["virtual-size"], 16 * MiB);
      }
      // Without block status everything is read, but zero clusters are still left out.
      const map = JSON.parse(await qemu(["map", "--output=json", `${dir}/no-sr.qcow2`])) as {
        length: number;
        data: boolean;
      }[];
      assert.equal(map.filter((m) => m.data).reduce((s, m) => s + m.length, 0), 2 * MiB + 65536);
    } finally {
      await noSr.stop();
      await noMc.stop();
    }
  });
});

nbdTest("nbd import: writes, zeroes what the image lacks, --prezeroed, flush", async () => {
  await withTempDir(async (dir) => {
    const raw = `${dir}/src.raw`;
    await writeSparse(raw, 32 * MiB, [[0, pseudoRandom(MiB, 7)], [
      20 * MiB,
      pseudoRandom(3 * MiB, 8),
    ]]);
    await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, `${dir}/src.qcow2`]);
    const log = `${dir}/nbdkit.log`;
    // An export full of pattern bytes: what the image lacks must become zeros.
    const server = await startNbdkit(dir, ["--filter=log", "memory", "40M", `logfile=${log}`]);
    const pattern = await startNbdkit(dir, ["pattern", "40M"]);
    await nbdcopyTo(pattern.uri, server.uri);
    await pattern.stop();
    try {
      const r = await runCli(["import", server.uri, "-i", `${dir}/src.qcow2`]);
      assert.equal(r.code, 0, r.stderr);
      await nbdcopyTo(server.uri, `${dir}/back.raw`);
      const back = await Deno.readFile(`${dir}/back.raw`);
      const want = await Deno.readFile(raw);
      assert.equal(back.length, 40 * MiB);
      assert.ok(back.subarray(0, 32 * MiB).every((b, i) => b === want[i]), "image bytes");
      const text = await Deno.readTextFile(log);
      assert.match(text, / Zero id=/, "zero ranges sent as NBD_CMD_WRITE_ZEROES");
      assert.match(text, / Flush id=/, "NBD_CMD_FLUSH before success");
      // Bytes past the image's virtual size are left alone (the pattern's).
      assert.notDeepEqual(back.subarray(32 * MiB, 32 * MiB + 8), new Uint8Array(8));
    } finally {
      await server.stop();
    }
    // --prezeroed: nothing but the data is written.
    const log2 = `${dir}/nbdkit2.log`;
    const mem = await startNbdkit(dir, ["--filter=log", "memory", "32M", `logfile=${log2}`]);
    try {
      const r = await runCli(["import", mem.uri, "-i", `${dir}/src.qcow2`, "--prezeroed"]);
      assert.equal(r.code, 0, r.stderr);
      await nbdcopyTo(mem.uri, `${dir}/back2.raw`);
      assert.deepEqual(await Deno.readFile(`${dir}/back2.raw`), await Deno.readFile(raw));
      const text = await Deno.readTextFile(log2);
      assert.doesNotMatch(text, / Zero id=/);
      const written = [...text.matchAll(/Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)/g)]
        .reduce((s, m) => s + parseInt(m[1], 16), 0);
      assert.equal(written, 4 * MiB);
    } finally {
      await mem.stop();
    }
  });
});

/** Imports `image` through a pipe into the export at `uri` and checks it holds `raw`'s bytes. */
async function importFromPipe(uri: string, image: string, raw: string, args: string[] = []) {
  const r = await runCli(["import", uri, ...args], { stdinFile: image });
  assert.equal(r.code, 0, r.stderr);
  const back = `${image}.back.raw`;
  await nbdcopyTo(uri, back);
  assert.deepEqual(await Deno.readFile(back), await Deno.readFile(raw));
  await Deno.remove(back);
}

nbdTest("nbd import: several connections with multi-conn; VHD stream from a pipe", async () => {
  await withTempDir(async (dir) => {
    const raw = `${dir}/src.raw`;
    await writeSparse(raw, 24 * MiB, [[2 * MiB, pseudoRandom(9 * MiB, 9)]]);
    const exported = await runCli(["export", raw, "-f", "vhd", "-o", `${dir}/src.vhd`]);
    assert.equal(exported.code, 0, exported.stderr);
    const log = `${dir}/nbdkit.log`;
    const server = await startNbdkit(dir, ["--filter=log", "memory", "24M", `logfile=${log}`]);
    try {
      await importFromPipe(server.uri, `${dir}/src.vhd`, raw, ["--connections", "3"]);
      const conns = new Set(
        [...(await Deno.readTextFile(log)).matchAll(/connection=(\d+) Write/g)].map((m) => m[1]),
      );
      assert.equal(conns.size, 3, "writes spread over 3 connections");
    } finally {
      await server.stop();
    }
  });
});

/** The most requests of `command` (nbdkit's log filter names) that were in flight at once. */
function mostInFlight(log: string, command: string): number {
  let now = 0;
  let most = 0;
  for (const line of log.split("\n")) {
    if (new RegExp(`connection=\\d+ ${command} id=`).test(line)) most = Math.max(most, ++now);
    else if (new RegExp(`connection=\\d+ \\.\\.\\.${command} id=`).test(line)) now--;
  }
  return most;
}

nbdTest(
  "nbd import: writes pipelined from a pipe; an error reply among them fails it",
  async () => {
    await withTempDir(async (dir) => {
      const raw = `${dir}/src.raw`;
      await Deno.writeFile(raw, pseudoRandom(48 * MiB, 31));
      await qemu(["convert", "-f", "raw", "-O", "qcow2", raw, `${dir}/src.qcow2`]);
      // 300 ms per write, one connection: the import goes on sending while replies are
      // outstanding.
      const log = `${dir}/nbdkit.log`;
      const slow = await startNbdkit(dir, [
        "--filter=log",
        "--filter=delay",
        "memory",
        "48M",
        `logfile=${log}`,
        "wdelay=300ms",
      ]);
      try {
        await importFromPipe(slow.uri, `${dir}/src.qcow2`, raw, ["--connections", "1"]);
        const text = await Deno.readTextFile(log);
        assert.ok(
          mostInFlight(text, "Write") >= 4,
          `writes in flight: ${mostInFlight(text, "Write")}`,
        );
        // The flush comes after every write was answered.
        const lines = text.split("\n");
        const flush = lines.findIndex((l) => / Flush id=/.test(l));
        const lastWrite = lines.findLastIndex((l) => /\.\.\.Write id=/.test(l));
        assert.ok(flush > lastWrite && lastWrite > 0, "NBD_CMD_FLUSH after the last write's reply");
      } finally {
        await slow.stop();
      }
      // One write in ten fails with EIO, the others are slow: many writes are in flight
      // when the first error comes back. It must be reported, never a success.
      const failing = await startNbdkit(dir, [
        "--filter=delay",
        "--filter=error",
        "memory",
        "48M",
        "wdelay=2ms",
        "error=EIO",
        "error-pwrite-rate=10%",
      ]);
      try {
        const r = await runCli(["import", failing.uri], { stdinFile: `${dir}/src.qcow2` });
        assert.equal(r.code, 1, r.stderr);
        assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
        assert.match(
          r.stderr,
          /^diskstream: .*EIO \(input\/output error\) to a write of \d+ bytes at byte offset \d+.*partly written from byte \d+/,
        );
      } finally {
        await failing.stop();
      }
    });
  },
);

nbdTest(
  "nbd errors: refused export, EIO, ENOSPC, read-only, too small: one line, exit 1",
  async () => {
    await withTempDir(async (dir) => {
      const disk = `${dir}/disk.raw`;
      await writeSparse(disk, 8 * MiB, [[0, pseudoRandom(4 * MiB, 2)]]);
      await qemu(["convert", "-f", "raw", "-O", "qcow2", disk, `${dir}/disk.qcow2`]);
      const qn = await startQemuNbd(dir, disk);
      const eio = await startNbdkit(dir, [
        "--filter=error",
        "file",
        disk,
        "error=EIO",
        "error-pread-rate=100%",
      ]);
      const enospc = await startNbdkit(dir, [
        "--filter=error",
        "memory",
        "8M",
        "error=ENOSPC",
        "error-pwrite-rate=100%",
      ]);
      const ro = await startNbdkit(dir, ["-r", "memory", "8M"]);
      const small = await startNbdkit(dir, ["memory", "4M"]);
      const oneLine = (r: { code: number; stderr: string }, pattern: RegExp) => {
        assert.equal(r.code, 1, r.stderr);
        assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
        assert.match(r.stderr, /^diskstream: /);
        assert.match(r.stderr, pattern);
      };
      try {
        oneLine(
          await runCli(["export", qn.uri.replace("/disk?", "/nope?"), "-o", `${dir}/a`]),
          /no export named "nope"/,
        );
        oneLine(
          await runCli(["export", eio.uri, "-o", `${dir}/b`]),
          /EIO \(input\/output error\) to a read of \d+ bytes at byte offset \d+/,
        );
        oneLine(
          await runCli(["import", enospc.uri, "-i", `${dir}/disk.qcow2`]),
          /ENOSPC \(no space left on the export\) to a write/,
        );
        oneLine(await runCli(["import", ro.uri, "-i", `${dir}/disk.qcow2`]), /read-only/);
        oneLine(
          await runCli(["import", small.uri, "-i", `${dir}/disk.qcow2`]),
          /holds 4194304 bytes .*less than the image's virtual size of 8388608 bytes/,
        );
        oneLine(
          await runCli(["export", `nbd+unix:///x?socket=${dir}/none.sock`, "-o", `${dir}/c`]),
          /cannot connect to .*none\.sock: no such socket/,
        );
        const usage = await runCli(["export", qn.uri, "--connections", "0", "-o", `${dir}/d`]);
        assert.equal(usage.code, 2);
        assert.match(usage.stderr, /--connections needs a number from 1 to 64/);
      } finally {
        for (const s of [qn, eio, enospc, ro, small]) await s.stop();
      }
    });
  },
);

nbdTest("nbd --allocation: a local copy exported with the remote export's allocation", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/remote.qcow2`;
    await qemu(["create", "-q", "-f", "qcow2", image, "32M"]);
    await qemu(
      ["-c", "write -P 0x42 4M 2M", "-c", "write -P 0x17 30M 64k", image],
      "qemu-io",
    );
    // The local device holds the same bytes, plus garbage where the remote has holes
    // (as a thin device's stale blocks would): the allocation decides.
    const local = `${dir}/local.raw`;
    await qemu(["convert", "-f", "qcow2", "-O", "raw", image, local]);
    const f = await Deno.open(local, { write: true });
    await f.seek(10 * MiB, Deno.SeekMode.Start);
    await f.write(new Uint8Array(4096).fill(0xee));
    f.close();
    const server = await startQemuNbd(dir, image, { format: "qcow2" });
    try {
      const r = await runCli([
        "export",
        local,
        "--allocation",
        server.uri,
        "-o",
        `${dir}/out.qcow2`,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(await imagesEqual(`${dir}/out.qcow2`, image, "qcow2", "qcow2"));
      const { nbdAllocation } = await import("../lib/nbd/allocation.ts");
      const alloc = await nbdAllocation(server.uri, 2 * MiB);
      assert.equal(alloc.virtualSize, 32 * MiB);
      assert.deepEqual([...alloc.clusters.runs()], [[2, 2], [15, 15]]);
    } finally {
      await server.stop();
    }
  });
});

nbdTest(
  "vhd-tool stream --source-format nbdhybrid: bytes from the device, allocation from NBD",
  async () => {
    await withTempDir(async (dir) => {
      const image = `${dir}/remote.qcow2`;
      await qemu(["create", "-q", "-f", "qcow2", image, "32M"]);
      await qemu(["-c", "write -P 0x42 4M 2M", "-c", "write -P 0x17 30M 64k", image], "qemu-io");
      // The local device: the same bytes, and stale garbage where the export has holes.
      const local = `${dir}/local.raw`;
      await qemu(["convert", "-f", "qcow2", "-O", "raw", image, local]);
      const f = await Deno.open(local, { write: true });
      await f.seek(10 * MiB, Deno.SeekMode.Start);
      await f.write(new Uint8Array(4096).fill(0xee));
      f.close();
      const server = await startQemuNbd(dir, image, { format: "qcow2", name: "vdi" });
      try {
        const address = parseNbdUri(server.uri);
        assert.equal(address.transport.kind, "unix");
        const socket = (address.transport as { socket: string }).socket;
        const stream = (src: string, out: string) =>
          runCli([
            "vhd-tool",
            "stream",
            "--source-protocol",
            "none",
            "--source-format",
            "nbdhybrid",
            "--source",
            src,
            "--destination-protocol",
            "none",
            "--destination-format",
            "qcow2",
            "--destination",
            out,
          ]);
        const r = await stream(`${local}:${socket}:vdi:${32 * MiB}`, `${dir}/out.qcow2`);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(`${dir}/out.qcow2`, image, "qcow2", "qcow2"));
        // A size that is not the export's, and a source that is not four fields: refused.
        const wrong = await stream(`${local}:${socket}:vdi:${16 * MiB}`, `${dir}/w.qcow2`);
        assert.equal(wrong.code, 2, wrong.stderr);
        assert.match(wrong.stderr, /says 16777216 bytes, but .* holds 33554432/);
        const bad = await stream(`${local}:vdi:${32 * MiB}`, `${dir}/b.qcow2`);
        assert.equal(bad.code, 2, bad.stderr);
        assert.match(bad.stderr, /RAWDEV:NBDSERVER:EXPORT:SIZE/);
      } finally {
        await server.stop();
      }
    });
  },
);

nbdTest("nbd export --zero-check: data extents that hold zeros are left out", async () => {
  await withTempDir(async (dir) => {
    const disk = `${dir}/disk.raw`;
    // 1 MiB of written (allocated) zeros, then 64 KiB of data: a raw file's block status
    // calls both data.
    await writeSparse(disk, 8 * MiB, [[MiB, new Uint8Array(MiB)], [
      2 * MiB,
      pseudoRandom(65536, 3),
    ]]);
    const server = await startQemuNbd(dir, disk);
    try {
      const sizes: number[] = [];
      for (const extra of [[], ["--zero-check"]]) {
        const out = `${dir}/out${extra.length}.qcow2`;
        const r = await runCli(["export", server.uri, ...extra, "-o", out]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(await imagesEqual(out, disk, "qcow2", "raw"));
        const map = JSON.parse(await qemu(["map", "--output=json", out])) as {
          length: number;
          data: boolean;
        }[];
        sizes.push(map.filter((m) => m.data).reduce((s, m) => s + m.length, 0));
      }
      assert.deepEqual(sizes, [MiB + 65536, 65536]);
    } finally {
      await server.stop();
    }
  });
});

nbdTest("nbd --diff: the base is an NBD export", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.raw`;
    await writeSparse(base, 16 * MiB, [[0, pseudoRandom(8 * MiB, 1)]]);
    const next = `${dir}/next.raw`;
    await Deno.copyFile(base, next);
    const f = await Deno.open(next, { write: true });
    await f.seek(5 * MiB, Deno.SeekMode.Start);
    await f.write(pseudoRandom(100_000, 4));
    await f.seek(12 * MiB, Deno.SeekMode.Start);
    await f.write(pseudoRandom(4096, 5));
    f.close();
    const server = await startNbdkit(dir, ["file", base]);
    try {
      const r = await runCli(["export", next, "--diff", server.uri, "-o", `${dir}/delta.qcow2`]);
      assert.equal(r.code, 0, r.stderr);
      const map = JSON.parse(await qemu(["map", "--output=json", `${dir}/delta.qcow2`]));
      const bytes = map.filter((m: { data: boolean }) => m.data)
        .reduce((s: number, m: { length: number }) => s + m.length, 0);
      await qemu(["rebase", "-u", "-b", base, "-F", "raw", `${dir}/delta.qcow2`]);
      assert.ok(await imagesEqual(`${dir}/delta.qcow2`, next, "qcow2", "raw"));
      assert.equal(bytes, 3 * 65536, "only the changed clusters");
    } finally {
      await server.stop();
    }
  });
});

/** A scripted NBD server on a Unix socket: handshake, then `answer` for the first request. */
function scripted(
  dir: string,
  options: { structured?: boolean; blockStatus?: boolean },
  answer: (conn: Deno.Conn, request: DataView) => Promise<void>,
): { uri: string; done: Promise<void> } {
  const path = `${dir}/scripted.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const u32 = (n: number) => {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, n);
    return b;
  };
  const readExact = async (conn: Deno.Conn, n: number) => {
    const b = new Uint8Array(n);
    for (let at = 0; at < n;) {
      const k = await conn.read(b.subarray(at));
      if (k === null) throw new Error("client went away");
      at += k;
    }
    return new DataView(b.buffer);
  };
  const optionReply = (option: number, type: number, data = new Uint8Array(0)) => {
    const b = new Uint8Array(20 + data.length);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, 0x3e889045565a9n);
    v.setUint32(8, option);
    v.setUint32(12, type);
    v.setUint32(16, data.length);
    b.set(data, 20);
    return b;
  };
  const done = (async () => {
    const conn = await listener.accept();
    listener.close();
    try {
      const hello = new Uint8Array(18);
      const hv = new DataView(hello.buffer);
      hv.setBigUint64(0, 0x4e42444d41474943n);
      hv.setBigUint64(8, 0x49484156454f5054n);
      hv.setUint16(16, 3);
      await conn.write(hello);
      await readExact(conn, 4);
      for (;;) {
        const head = await readExact(conn, 16);
        const option = head.getUint32(8);
        await readExact(conn, head.getUint32(12));
        if (option === 8 && options.structured) await conn.write(optionReply(8, 1));
        else if (option === 10 && options.blockStatus) {
          const name = new TextEncoder().encode("base:allocation");
          await conn.write(optionReply(10, 4, new Uint8Array([...u32(7), ...name])));
          await conn.write(optionReply(10, 1));
        } else if (option === 7) {
          const info = new Uint8Array(12);
          const iv = new DataView(info.buffer);
          iv.setUint16(0, 0);
          iv.setBigUint64(2, BigInt(MiB));
          iv.setUint16(10, 1);
          await conn.write(optionReply(7, 3, info));
          await conn.write(optionReply(7, 1));
          break;
        } else await conn.write(optionReply(option, 0x80000001));
      }
      await answer(conn, await readExact(conn, 28));
    } catch {
      // the client hung up: expected in these scripts
    } finally {
      try {
        conn.close();
      } catch {
        // closed
      }
    }
  })();
  return { uri: `nbd+unix:///?socket=${path}`, done };
}

/** A structured reply chunk header. */
function chunk(flags: number, type: number, cookie: number, length: number): Uint8Array {
  const b = new Uint8Array(20);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x668e33ef);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setUint32(12, cookie);
  v.setUint32(16, length);
  return b;
}

nbdTest(
  "nbd protocol errors: dropped connection, stray cookie, bad lengths, short reads",
  async () => {
    await withTempDir(async (dir) => {
      const cases: [
        string,
        { structured?: boolean; blockStatus?: boolean },
        (conn: Deno.Conn, req: DataView) => Promise<void>,
        RegExp,
        "read" | "status",
      ][] = [
        ["drop", {}, async () => {}, /the server closed the connection/, "read"],
        [
          "stray cookie",
          {},
          async (conn, req) => {
            const b = new Uint8Array(16);
            const v = new DataView(b.buffer);
            v.setUint32(0, 0x67446698);
            v.setUint32(12, req.getUint32(12) + 1000);
            await conn.write(b);
            await new Promise((r) => setTimeout(r, 200));
          },
          /answered request \d+, which was never sent/,
          "read",
        ],
        [
          "huge data chunk",
          { structured: true },
          async (conn, req) => {
            await conn.write(chunk(1, 1, req.getUint32(12), 0xfffffff0));
            await conn.write(new Uint8Array(8));
            await new Promise((r) => setTimeout(r, 200));
          },
          /outside a read of 65536 bytes/,
          "read",
        ],
        [
          "short read",
          { structured: true },
          async (conn, req) => {
            const c = chunk(0, 1, req.getUint32(12), 8 + 4096);
            await conn.write(c);
            await conn.write(new Uint8Array(8 + 4096));
            await conn.write(chunk(1, 0, req.getUint32(12), 0));
            await new Promise((r) => setTimeout(r, 200));
          },
          /bytes 4096-65536 missing from the reply/,
          "read",
        ],
        [
          "huge block status",
          { structured: true, blockStatus: true },
          async (conn, req) => {
            await conn.write(chunk(1, 5, req.getUint32(12), 0x7ffffff4));
            await new Promise((r) => setTimeout(r, 200));
          },
          /a block status chunk of 2147483636 bytes/,
          "status",
        ],
        [
          "error chunk",
          { structured: true },
          async (conn, req) => {
            const msg = new TextEncoder().encode("disk on fire");
            await conn.write(chunk(1, 0x8001, req.getUint32(12), 6 + msg.length));
            const body = new Uint8Array(6 + msg.length);
            new DataView(body.buffer).setUint32(0, 5);
            new DataView(body.buffer).setUint16(4, msg.length);
            body.set(msg, 6);
            await conn.write(body);
            await new Promise((r) => setTimeout(r, 200));
          },
          /answered EIO \(input\/output error\) to a read of 65536 bytes at byte offset 0: disk on fire/,
          "read",
        ],
      ];
      for (const [name, opts, answer, pattern, op] of cases) {
        const server = scripted(dir, opts, answer);
        const nbd = await NbdExport.open(server.uri, { connections: 1 });
        const attempt = op === "read" ? nbd.read(new Uint8Array(65536), 0) : nbd.extents();
        await assert.rejects(attempt, (e: Error) => {
          assert.ok(e instanceof NbdError, `${name}: ${e}`);
          assert.match(e.message, pattern, name);
          return true;
        });
        await nbd.close();
        await server.done;
        await Deno.remove(`${dir}/scripted.sock`).catch(() => {});
      }
    });
  },
);
