/**
 * The NBD client against a hostile or broken server (tests/nbd_fake_server.ts): bad
 * greetings and option replies, absurd sizes and block sizes, replies that lie about
 * their request, block status out of bounds, connections dropped or silent at every
 * step, and a read-only export given to an import. The command line is run against
 * it (under /usr/bin/time for its peak memory); each failure must be exit status 1
 * with one `diskstream: URI: …` line saying what was wrong, no stack trace, no
 * output claimed as complete, in bounded time and memory. A server that stops
 * answering must not hold the command past a SIGTERM.
 */
import assert from "node:assert/strict";
import { CLI, withTempDir } from "./helpers.ts";
import {
  type Behaviour,
  type FakeNbd,
  pattern,
  type Request,
  type Session,
  startFakeNbd,
} from "./nbd_fake_server.ts";

const MiB = 1 << 20;
/** Peak memory allowed to one run of the command line. */
const MAX_RSS_MIB = 200;
/** Time allowed to one run that fails (it should take well under a second). */
const MAX_MS = 10_000;

/** What one run of the command line did. */
interface Outcome {
  code: number;
  stdout: Uint8Array;
  stderr: string;
  ms: number;
  rssMiB: number;
}

/**
 * Runs `diskstream ARGS` under /usr/bin/time (peak memory) and `timeout` (a hang is
 * killed after 20 s and shows as exit status 137), with `stdin` from a file.
 */
async function cli(dir: string, args: string[], stdin?: string): Promise<Outcome> {
  const rss = `${dir}/rss`;
  const t0 = performance.now();
  const child = new Deno.Command("/usr/bin/time", {
    args: ["-o", rss, "-f", "%M", "timeout", "-s", "KILL", "20", Deno.execPath(), "run", "-A"]
      .concat([CLI, ...args]),
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const feeding = stdin === undefined
    ? Promise.resolve()
    : (await Deno.open(stdin)).readable.pipeTo(child.stdin).catch(() => {});
  const out = await child.output();
  await feeding;
  const ms = performance.now() - t0;
  const kib = Number((await Deno.readTextFile(rss)).trim().split("\n").at(-1));
  return {
    code: out.code,
    stdout: out.stdout,
    stderr: new TextDecoder().decode(out.stderr),
    ms,
    rssMiB: kib / 1024,
  };
}

function bounded(r: Outcome, what: string): void {
  assert.ok(r.ms < MAX_MS, `${what}: took ${r.ms.toFixed(0)} ms`);
  assert.ok(r.rssMiB < MAX_RSS_MIB, `${what}: peak memory ${r.rssMiB.toFixed(0)} MiB`);
}

/** Exit status 1 and one line naming the server's URI and matching `why`. */
function failsCleanly(r: Outcome, server: FakeNbd, why: RegExp, what: string): void {
  assert.equal(r.code, 1, `${what}: exit status ${r.code}: ${r.stderr}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `${what}: one line expected: ${r.stderr}`);
  assert.ok(lines[0].startsWith("diskstream: "), `${what}: ${lines[0]}`);
  assert.ok(lines[0].includes(server.uri), `${what}: the URI is not named: ${lines[0]}`);
  assert.match(lines[0], why, `${what}: ${lines[0]}`);
  assert.ok(!lines[0].includes("internal error") && !lines[0].includes("\x1b"), what);
  bounded(r, what);
}

/** A behaviour that answers reads with `f` (other requests as usual). */
function onRead(f: (s: Session, r: Request) => Promise<void>): Behaviour {
  return {
    request: async (s, r) => r.command === 0 && (await f(s, r), true),
  };
}

/** A behaviour that answers block status with `f`. */
function onStatus(f: (s: Session, r: Request) => Promise<void>): Behaviour {
  return {
    request: async (s, r) => r.command === 7 && (await f(s, r), true),
  };
}

/** A behaviour that answers option `option` with `f`. */
function onOption(option: number, f: (s: Session) => Promise<void>): Behaviour {
  return { option: async (s, o) => o === option && (await f(s), true) };
}

/** The 8-byte offset and `n` bytes of a data chunk's payload. */
function dataPayload(offset: bigint, n: number): Uint8Array {
  const p = new Uint8Array(8 + n);
  new DataView(p.buffer).setBigUint64(0, offset);
  return p;
}

const greeting = (flags: number) => {
  const g = new Uint8Array(18);
  const v = new DataView(g.buffer);
  v.setBigUint64(0, 0x4e42444d41474943n);
  v.setBigUint64(8, 0x49484156454f5054n);
  v.setUint16(16, flags);
  return g;
};

/**
 * Exports from a fake server with `behaviour` to a pipe and checks the run failed
 * cleanly with `why`: as raw bytes (every byte read, no block status), without the
 * whole disk on stdout; as qcow2 (planned from block status), with nothing on stdout.
 */
async function exportFails(
  dir: string,
  name: string,
  behaviour: Behaviour,
  why: RegExp,
  format: "raw" | "qcow2" = "raw",
): Promise<void> {
  const server = startFakeNbd(dir, behaviour);
  try {
    const r = await cli(dir, ["export", server.uri, "-f", format, "--connections", "1"]);
    failsCleanly(r, server, why, name);
    if (format === "raw") assert.ok(r.stdout.length < MiB, `${name}: the whole disk on stdout`);
    else assert.equal(r.stdout.length, 0, `${name}: an image begun before its plan`);
  } finally {
    await server.stop();
  }
}

/**
 * Exports from a fake server with `behaviour` to qcow2 (planned from its block
 * status) and returns the disk it holds (imported back), with the server's log.
 */
async function exportBack(
  dir: string,
  name: string,
  behaviour: Behaviour,
): Promise<{ disk: Uint8Array; log: Request[] }> {
  const server = startFakeNbd(dir, behaviour);
  try {
    const r = await cli(dir, ["export", server.uri, "-o", `${dir}/back.qcow2`]);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    bounded(r, name);
    const back = await cli(dir, ["import", `${dir}/back.raw`, "-i", `${dir}/back.qcow2`]);
    assert.equal(back.code, 0, `${name}: ${back.stderr}`);
    const disk = await Deno.readFile(`${dir}/back.raw`);
    await Deno.remove(`${dir}/back.raw`);
    return { disk, log: server.log };
  } finally {
    await server.stop();
  }
}

/** Exports from a fake server with `behaviour` as raw bytes and returns them. */
async function exportRaw(dir: string, name: string, behaviour: Behaviour): Promise<Uint8Array> {
  const server = startFakeNbd(dir, behaviour);
  try {
    const r = await cli(dir, ["export", server.uri, "-f", "raw", "--connections", "1"]);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    assert.equal(r.stderr, "", name);
    bounded(r, name);
    return r.stdout;
  } finally {
    await server.stop();
  }
}

Deno.test("nbd hostile: greetings and option replies", async () => {
  await withTempDir(async (dir) => {
    const cases: [string, Behaviour, RegExp][] = [
      ["bad magic", { greeting: new Uint8Array(18).fill(0x41) }, /not an NBD server/],
      ["oldstyle", {
        greeting: (() => {
          const g = greeting(0);
          new DataView(g.buffer).setBigUint64(8, 0x00420281861253n);
          return g;
        })(),
      }, /oldstyle/],
      ["not fixed newstyle", { handshakeFlags: 0 }, /does not speak fixed newstyle/],
      ["closed mid-greeting", {
        greeting: greeting(3).subarray(0, 5),
        afterGreeting: (s) => Promise.resolve(s.close()),
      }, /the server closed the connection/],
      // The client's flags then meet a closed socket (EPIPE): before, no message at all.
      [
        "closed after the greeting",
        { afterGreeting: (s) => Promise.resolve(s.close()) },
        /closed the connection/,
      ],
      [
        "option reply of 4 GiB",
        onOption(8, async (s) => {
          await s.optionReply(8, 1, new Uint8Array(0), 0xffffffff);
          await s.hang();
        }),
        /claims 4294967295 bytes \(at most 16384 expected\)/,
      ],
      [
        "truncated option reply",
        onOption(8, async (s) => {
          await s.optionReply(8, 1, new Uint8Array(10), 100);
          s.close();
        }),
        /the server closed the connection/,
      ],
      ["reply to another option", onOption(7, (s) => s.optionReply(8, 1)), /answered option 8/],
      [
        "NBD_REP_ERR_UNKNOWN",
        onOption(7, async (s) => {
          // A message with newlines and a terminal escape: quoted on the same line, cleaned.
          const text = "no such\nexport\x1b[31m here\r\n" + "x".repeat(3000);
          await s.optionReply(7, 0x80000006, new TextEncoder().encode(text));
        }),
        /no export named "disk".*the server says: no such\\x0aexport\\x1b\[31m here\\x0d\\x0ax+…\)$/,
      ],
      ["NBD_REP_ERR_POLICY", onOption(7, (s) => s.optionReply(7, 0x80000002)), /by policy/],
      ["NBD_REP_ERR_SHUTDOWN", onOption(7, (s) => s.optionReply(7, 0x80000007)), /shutting/],
      ["unknown error", onOption(7, (s) => s.optionReply(7, 0x8000abcd)), /error 43981/],
      ["NBD_REP_ERR_TLS_REQD", onOption(8, (s) => s.optionReply(8, 0x80000005)), /use nbds/],
      ["GO without a size", onOption(7, (s) => s.optionReply(7, 1)), /without a size/],
      [
        "closed at NBD_OPT_GO",
        onOption(7, (s) => Promise.resolve(s.close())),
        /closed the connection/,
      ],
    ];
    for (const [name, behaviour, why] of cases) {
      await exportFails(dir, name, behaviour, why, "qcow2");
    }
    // Handshake flags the client does not know are ignored (the spec's SHOULD).
    const data = await exportRaw(dir, "unknown handshake flags", { handshakeFlags: 0xffff });
    assert.deepEqual(data, pattern());
  });
});

Deno.test("nbd hostile: export sizes and block sizes", async () => {
  await withTempDir(async (dir) => {
    const cases: [string, Behaviour, RegExp][] = [
      [
        "size 2^64-1",
        { size: 0xffffffffffffffffn },
        /size \(18446744073709551615 bytes\) is too large/,
      ],
      ["size 2^63", { size: 1n << 63n }, /too large/],
      ["size 2^53", { size: 1n << 53n }, /too large/],
      ["minimum block 0", { blockSizes: [0, 4096, MiB] }, /minimum block size 0 is not a power/],
      ["minimum block 3", { blockSizes: [3, 4096, MiB] }, /minimum block size 3 is not a power/],
      ["minimum block 1 MiB", { blockSizes: [MiB, MiB, MiB] }, /up to 64 KiB/],
      ["maximum below minimum", { blockSizes: [4096, 4096, 512] }, /maximum payload 512 is below/],
      ["maximum 0", { blockSizes: [1, 1, 0] }, /maximum payload 0 is below/],
    ];
    for (const [name, behaviour, why] of cases) {
      await exportFails(dir, name, behaviour, why, "qcow2");
    }
    // Odd but usable block sizes: requests stay aligned to the minimum and within the
    // maximum, and the bytes are right.
    const usable: [string, Behaviour][] = [
      ["preferred above maximum", { blockSizes: [512, 1 << 30, 65536] }],
      ["maximum not a multiple of the minimum", { blockSizes: [4096, 4096, 4096 * 3 + 1] }],
      ["maximum 4 GiB", { blockSizes: [512, 4096, 0xffffffff] }],
      ["size not a multiple of the minimum", { size: 1000000n, blockSizes: [4096, 4096, MiB] }],
    ];
    for (const [name, behaviour] of usable) {
      const server = startFakeNbd(dir, behaviour);
      try {
        const r = await cli(dir, ["export", server.uri, "-f", "raw"]);
        assert.equal(r.code, 0, `${name}: ${r.stderr}`);
        const size = Number(behaviour.size ?? BigInt(MiB));
        assert.deepEqual(r.stdout.subarray(0, size), pattern().subarray(0, size), name);
        const [min, , max] = behaviour.blockSizes!;
        for (const q of server.log) {
          assert.ok(q.offset % min === 0, `${name}: request at ${q.offset}`);
          assert.ok(q.length % min === 0 || q.offset + q.length === size, `${name}: ${q.length}`);
          assert.ok(q.command !== 0 || q.length <= max, `${name}: read of ${q.length}`);
        }
      } finally {
        await server.stop();
      }
    }
  });
});

Deno.test("nbd hostile: an export claiming 64 TiB, all zero, in bounded memory", async () => {
  await withTempDir(async (dir) => {
    // Block status spans of 1 GiB used to be asked all at once (65536 of them
    // waiting): 300 MiB here, and gigabytes for a petabyte.
    const server = startFakeNbd(dir, {
      size: 1n << 46n,
      ...onStatus((s, r) => s.statusChunk(1, r.cookie, 1, [[r.length, 3]])),
    });
    try {
      const r = await cli(dir, ["export", server.uri, "-c", "2M", "-o", `${dir}/big.qcow2`]);
      assert.equal(r.code, 0, r.stderr);
      bounded(r, "64 TiB");
      assert.ok(server.log.every((q) => q.command === 7), "nothing but block status");
    } finally {
      await server.stop();
    }
  });
});

Deno.test("nbd hostile: replies to reads", async () => {
  await withTempDir(async (dir) => {
    const cases: [string, Behaviour, RegExp][] = [
      [
        "simple reply to a request never sent",
        onRead((s, r) => s.simple(r.cookie + 77)),
        /protocol error: the server answered request \d+, which was never sent/,
      ],
      [
        "structured reply to a request never sent",
        onRead((s, r) => s.chunk(1, 0, r.cookie ^ 0x8000, new Uint8Array(0))),
        /which was never sent/,
      ],
      [
        "EIO",
        onRead((s, r) => s.simple(r.cookie, 5)),
        /answered EIO \(input\/output error\) to a read of \d+ bytes at byte offset 0$/,
      ],
      [
        "unknown error number",
        onRead((s, r) => s.simple(r.cookie, 0xdeadbeef)),
        /answered error 3735928559 to a read/,
      ],
      [
        "simple reply with data",
        onRead((s, r) => s.simple(r.cookie)),
        /a simple reply with data to a read/,
      ],
      [
        "bad reply magic",
        onRead((s) => s.write(new Uint8Array(16).fill(0x55))),
        /bad magic number 0x55555555/,
      ],
      [
        "data past the request",
        onRead((s, r) => s.dataChunk(1, r.cookie, r.offset + r.length - 10, new Uint8Array(20))),
        /data chunk for bytes \d+-\d+ outside a read/,
      ],
      [
        "data offset past 2^64",
        onRead((s, r) => s.chunk(1, 1, r.cookie, dataPayload(0xfffffffffffffe00n, 1024))),
        /bytes 18446744073709551104-18446744073709552128 outside/,
      ],
      [
        "data chunk claiming 4 GiB",
        onRead(async (s, r) => {
          await s.chunk(1, 1, r.cookie, dataPayload(BigInt(r.offset), 0), 0xfffffff0);
          await s.hang();
        }),
        /outside a read/,
      ],
      [
        "overlapping chunks",
        onRead(async (s, r) => {
          await s.dataChunk(0, r.cookie, r.offset, s.data.subarray(r.offset, r.offset + r.length));
          await s.dataChunk(1, r.cookie, r.offset + 512, new Uint8Array(512));
        }),
        /overlapping chunks in the reply to a read/,
      ],
      // Chunks without end used to pile up (about 100 bytes of memory per 29 on the wire).
      [
        "a flood of chunks without NBD_REPLY_FLAG_DONE",
        onRead(async (s, r) => {
          const one = new Uint8Array(1);
          for (let i = 0; i < 1_000_000; i++) await s.dataChunk(0, r.cookie, r.offset, one);
          await s.hang();
        }),
        /overlapping chunks/,
      ],
      [
        "bytes left out",
        onRead(async (s, r) => {
          // Every other byte, backwards, then done: the odd bytes were never sent.
          for (let i = 32; i >= 0; i -= 2) {
            await s.dataChunk(0, r.cookie, r.offset + i, s.data.subarray(i, i + 1));
          }
          await s.chunk(1, 0, r.cookie, new Uint8Array(0));
        }),
        /bytes 1-2 missing from the reply to a read/,
      ],
      [
        "hole of 0 bytes",
        onRead((s, r) => s.chunk(1, 2, r.cookie, new Uint8Array(12))),
        /a hole chunk of 0 bytes/,
      ],
      [
        "NBD_REPLY_TYPE_NONE with a payload",
        onRead((s, r) => s.chunk(1, 0, r.cookie, new Uint8Array(4))),
        /malformed NBD_REPLY_TYPE_NONE/,
      ],
      [
        "block status chunk to a read",
        onRead((s, r) => s.statusChunk(1, r.cookie, 1, [[r.length, 0]])),
        /unexpected reply chunk of type 5/,
      ],
      [
        "error chunk with a message longer than the chunk",
        onRead((s, r) => s.errorChunk(1, r.cookie, 5, "x", 60000)),
        /an error message longer than its chunk/,
      ],
      [
        "error chunk claiming 4 GiB",
        onRead(async (s, r) => {
          await s.chunk(1, 0x8001, r.cookie, new Uint8Array(0), 0xfffffff0);
          await s.hang();
        }),
        /an error chunk of 4294967280 bytes/,
      ],
      [
        "error chunk with newlines",
        onRead((s, r) => s.errorChunk(1, r.cookie, 28, "disk\nfull\x07\u2028now")),
        /answered ENOSPC \(no space left on the export\) to a read of \d+ bytes at byte offset 0: disk\\x0afull\\x07\\u\{2028\}now$/,
      ],
      [
        "closed mid-header",
        onRead(async (s) => {
          await s.write(new Uint8Array([0x66, 0x8e]));
          s.close();
        }),
        /the server closed the connection/,
      ],
      [
        "closed mid-payload",
        onRead(async (s, r) => {
          await s.chunk(1, 1, r.cookie, dataPayload(BigInt(r.offset), 100), 8 + r.length);
          s.close();
        }),
        /the server closed the connection/,
      ],
      [
        "structured replies refused but sent",
        onOption(8, (s) => s.optionReply(8, 0x80000001)),
        /a structured reply that was not negotiated/,
      ],
    ];
    for (const [name, behaviour, why] of cases) await exportFails(dir, name, behaviour, why);
  });
});

Deno.test("nbd hostile: block status replies", async () => {
  await withTempDir(async (dir) => {
    const cases: [string, Behaviour, RegExp][] = [
      [
        "extent of 0 bytes",
        onStatus((s, r) => s.statusChunk(1, r.cookie, 1, [[0, 0]])),
        /an extent of length 0 in a block status query/,
      ],
      [
        "more than 2^20 extents",
        onStatus(async (s, r) => {
          await s.chunk(1, 5, r.cookie, new Uint8Array(0), 4 + 8 * ((1 << 20) + 1));
          await s.hang();
        }),
        /a block status chunk of 8388620 bytes/,
      ],
      [
        "length not 4 + 8n",
        onStatus((s, r) => s.chunk(1, 5, r.cookie, new Uint8Array(13))),
        /a block status chunk of 13 bytes/,
      ],
      [
        "another metadata context",
        onStatus((s, r) => s.statusChunk(1, r.cookie, 99, [[r.length, 0]])),
        /metadata context 99, which was not asked for/,
      ],
      [
        "two chunks for one context",
        onStatus(async (s, r) => {
          await s.statusChunk(0, r.cookie, 1, [[r.length, 0]]);
          await s.statusChunk(1, r.cookie, 1, [[r.length, 0]]);
        }),
        /two block status chunks for one context/,
      ],
      [
        "no extents",
        onStatus((s, r) => s.chunk(1, 0, r.cookie, new Uint8Array(0))),
        /no extents in the reply/,
      ],
      [
        "simple reply",
        onStatus((s, r) => s.simple(r.cookie)),
        /a simple reply to a block status query/,
      ],
      [
        "error reply",
        onStatus((s, r) => s.errorChunk(1, r.cookie, 22, "nope")),
        /answered EINVAL \(invalid argument\) to a block status query of \d+ bytes at byte offset 0: nope/,
      ],
    ];
    for (const [name, behaviour, why] of cases) {
      await exportFails(dir, name, behaviour, why, "qcow2");
    }
    // Extents past the request, and one of 4 GiB: only the request's range is believed.
    const past = await exportBack(
      dir,
      "extents past the request",
      onStatus((s, r) => s.statusChunk(1, r.cookie, 1, [[r.length - 65536, 0], [0xffffffff, 3]])),
    );
    assert.deepEqual(past.disk.subarray(0, MiB - 65536), pattern().subarray(0, MiB - 65536));
    assert.ok(past.disk.subarray(MiB - 65536).every((b) => b === 0), "the zero extent");
    assert.ok(
      past.log.every((q) => q.command !== 0 || q.offset + q.length <= MiB - 65536),
      "the zero extent is not read",
    );
    // Extents of 1 byte flagged zero (under the minimum block size of 512): each answer
    // used to move the next query on by 1 byte, unaligned (a million queries for 1 MiB).
    // The undescribed rest of each block is data.
    const tiny = await exportBack(
      dir,
      "1-byte extents",
      onStatus((s, r) => s.statusChunk(1, r.cookie, 1, [[1, 3]])),
    );
    assert.deepEqual(tiny.disk, pattern());
    const queries = tiny.log.filter((q) => q.command === 7);
    assert.ok(queries.every((q) => q.offset % 512 === 0), "queries aligned to 512");
    assert.equal(queries.length, MiB / 512);
  });
});

Deno.test("nbd hostile: --allocation and --diff from a broken server; a hinted NBD source", async () => {
  await withTempDir(async (dir) => {
    const disk = `${dir}/disk.raw`;
    await Deno.writeFile(disk, pattern());
    for (
      const [flag, behaviour, why] of [
        [
          "--allocation",
          onStatus((s, r) => s.statusChunk(1, r.cookie, 7, [[r.length, 0]])),
          /metadata context 7/,
        ],
        [
          "--diff",
          onRead((s, r) => s.simple(r.cookie, 1)),
          /answered EPERM \(operation not permitted\) to a read/,
        ],
      ] as const
    ) {
      const server = startFakeNbd(dir, behaviour);
      try {
        const out = `${dir}/out.qcow2`;
        const r = await cli(dir, ["export", disk, flag, server.uri, "-o", out]);
        failsCleanly(r, server, why, flag);
        assert.equal(await Deno.stat(out).catch(() => null), null, `${flag}: ${out} is left`);
      } finally {
        await server.stop();
      }
    }
    // An NBD source with a local hint: its size is learned over NBD (it used to be
    // opened as a file: "no such file or directory"), and only hinted clusters are read.
    const hint = `${dir}/hint.json`;
    await Deno.writeTextFile(
      hint,
      '{"virtual_size":1048576,"cluster_bits":16,"data_clusters":[[0,1]]}',
    );
    const server = startFakeNbd(dir);
    try {
      const r = await cli(dir, ["export", server.uri, "--allocation", hint, "-f", "raw"]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.subarray(0, 131072), pattern().subarray(0, 131072));
      assert.ok(r.stdout.subarray(131072).every((b) => b === 0), "unhinted clusters are zeros");
      assert.equal(r.stdout.length, MiB);
      assert.ok(server.log.every((q) => q.command !== 0 || q.offset + q.length <= 131072));
    } finally {
      await server.stop();
    }
  });
});

/** A 1 MiB qcow2 image of `pattern()` in `dir`. */
async function image(dir: string): Promise<string> {
  await Deno.writeFile(`${dir}/src.raw`, pattern());
  const r = await cli(dir, ["export", `${dir}/src.raw`, "-o", `${dir}/src.qcow2`]);
  assert.equal(r.code, 0, r.stderr);
  return `${dir}/src.qcow2`;
}

Deno.test("nbd hostile: import into a broken or read-only server", async () => {
  await withTempDir(async (dir) => {
    const qcow2 = await image(dir);
    const cases: [string, Behaviour, RegExp, "none" | "some"][] = [
      ["read-only", { flags: 1 | 2 | 4 }, /the export is read-only$/, "none"],
      ["smaller than the image", { size: BigInt(MiB / 2) }, /holds 524288 bytes.*1048576/, "none"],
      [
        "ENOSPC",
        {
          request: async (s, r) => r.command === 1 && (await s.simple(r.cookie, 28), true),
        },
        /answered ENOSPC .* to a write of \d+ bytes at byte offset \d+; .* is partly written/,
        "some",
      ],
      [
        "closed during the writes",
        {
          request: (s, r) => Promise.resolve(r.command === 1 && (s.close(), true)),
        },
        // Before, a write meeting the closed socket (EPIPE) gave no message at all.
        /the server closed the connection|the connection broke while sending a write/,
        "some",
      ],
      [
        "flush fails",
        {
          request: async (s, r) => r.command === 3 && (await s.simple(r.cookie, 5), true),
        },
        /answered EIO .* to a flush/,
        "some",
      ],
    ];
    for (const [name, behaviour, why, writes] of cases) {
      const server = startFakeNbd(dir, behaviour);
      try {
        // From a file and from a pipe (the image's size known only at its end).
        for (const args of [["-i", qcow2], []]) {
          const r = await cli(
            dir,
            ["import", server.uri, ...args],
            args.length ? undefined : qcow2,
          );
          failsCleanly(r, server, why, `${name} ${args.length ? "file" : "pipe"}`);
        }
        const written = server.log.some((q) => q.command === 1 || q.command === 6);
        assert.equal(written, writes === "some", `${name}: writes sent`);
      } finally {
        await server.stop();
      }
    }
  });
});

/**
 * Runs `diskstream ARGS` against a server that stops answering once `stuck` resolves,
 * sends SIGTERM then, and returns the exit status, stderr and the time it took to exit.
 */
async function interrupted(
  args: string[],
  stuck: Promise<void>,
): Promise<{ code: number; stderr: string; ms: number }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, ...args],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const killer = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    const early = await Promise.race([stuck.then(() => null), child.status]);
    if (early !== null) throw new Error(`exited before the server went silent: ${await stderr}`);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = performance.now();
    child.kill("SIGTERM");
    const status = await child.status;
    return { code: status.code, stderr: await stderr, ms: performance.now() - t0 };
  } finally {
    clearTimeout(killer);
    await child.status;
  }
}

Deno.test("nbd hostile: a server that stops answering does not hold off SIGTERM", async () => {
  await withTempDir(async (dir) => {
    const qcow2 = await image(dir);
    const silent = (when: (r: Request) => boolean) => {
      let reached!: () => void;
      const stuck = new Promise<void>((r) => reached = r);
      const behaviour: Behaviour = {
        request: async (s, r) => {
          if (!when(r)) return false;
          reached();
          await s.hang();
          return true;
        },
      };
      return { stuck, behaviour };
    };
    const handshake = (() => {
      let reached!: () => void;
      const stuck = new Promise<void>((r) => reached = r);
      const behaviour: Behaviour = {
        afterGreeting: async (s) => {
          reached();
          await s.hang();
        },
      };
      return { stuck, behaviour };
    })();
    const cases: [string, { stuck: Promise<void>; behaviour: Behaviour }, "export" | "import"][] = [
      ["export: a read never answered", silent((r) => r.command === 0), "export"],
      ["export: block status never answered", silent((r) => r.command === 7), "export"],
      ["export: the handshake never finished", handshake, "export"],
      ["import: writes never answered", silent((r) => r.command === 1), "import"],
      ["import: flush never answered", silent((r) => r.command === 3), "import"],
    ];
    for (const [name, { stuck, behaviour }, command] of cases) {
      const server = startFakeNbd(dir, behaviour);
      try {
        const out = `${dir}/out.qcow2`;
        const r = command === "export"
          ? await interrupted(["export", server.uri, "-o", out], stuck)
          : await interrupted(["import", server.uri, "-i", qcow2], stuck);
        assert.equal(r.code, 143, `${name}: ${r.stderr}`);
        assert.ok(r.ms < 3000, `${name}: exited ${r.ms.toFixed(0)} ms after SIGTERM`);
        assert.match(
          r.stderr,
          /^diskstream: (export|import) .*interrupted by SIGTERM/,
          `${name}: ${r.stderr}`,
        );
        assert.equal(r.stderr.trimEnd().split("\n").length, 1, `${name}: ${r.stderr}`);
        if (command === "export") assert.equal(await Deno.stat(out).catch(() => null), null);
      } finally {
        await server.stop();
      }
    }
  });
});
