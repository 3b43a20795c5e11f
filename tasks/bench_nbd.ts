/**
 * The NBD cases of `deno task bench` (issue 12): export from qemu-nbd against
 * `nbdcopy`, a sparse export against its data as a dense one and against a full read,
 * several connections against one with 10 ms of latency per read (nbdkit's delay
 * filter), and import into an NBD export against `nbdcopy` of the raw bytes. The
 * servers run for the length of their case, on Unix sockets in the work dir.
 *
 * @module
 */
import { type Server, startNbdkit, startQemuNbd } from "../tests/nbd_servers.ts";
import type { BenchCase, Contender, Pipeline } from "./bench_measure.ts";
import { type Inputs, zeroFilled } from "./bench_inputs.ts";
import type { Goal } from "./bench.ts";

/** What the NBD cases need from the bench. */
export interface NbdBenchContext {
  /** The diskstream command line (`deno run -A … cli.ts`). */
  ds: string[];
  inputs: Inputs;
  work: string;
  /** Why a diskstream command or flag cannot run, if it cannot. */
  missing(command: string, flag?: string): Promise<string | undefined>;
  /** Checks that `out` (format `format`) holds the bytes of the raw `source`. */
  sameAs(source: string, out: string, format?: string): () => Promise<string | null>;
}

/** The import peer: nbdcopy with the durability of diskstream's import (it flushes). */
const NBDCOPY = "nbdcopy --flush";

const toPipe = (...stages: string[][]): Pipeline => ({ stages: [...stages, ["cat"]] });

/**
 * glibc malloc settings for a qemu-nbd that imports write into, so that it is not the
 * bound: with glibc's defaults it maps and unmaps a buffer for every write it receives,
 * and on this VM (where a page fault is dear) that cost it some 14 s of CPU per 2 GiB
 * (measured with perf: 90% of it faulting pages in), which every client then waits for.
 */
const SERVER_MALLOC = {
  GLIBC_TUNABLES: "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456",
};

/** Runs `start` (which spawns a server) with `env` added to the environment it inherits. */
async function withEnv<T>(env: Record<string, string>, start: () => Promise<T>): Promise<T> {
  const before = Object.keys(env).map((k) => [k, Deno.env.get(k)] as const);
  for (const [k, v] of Object.entries(env)) Deno.env.set(k, v);
  try {
    return await start();
  } finally {
    for (const [k, v] of before) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
  }
}

/** The NBD cases; each starts its servers when prepared and stops them in `teardown`. */
export function nbdCases(ctx: NbdBenchContext): BenchCase[] {
  const servers: Server[] = [];
  const serve = async (start: Promise<Server>) => {
    const s = await start;
    servers.push(s);
    return s.uri;
  };
  const teardown = async () => {
    for (const s of servers.splice(0)) await s.stop();
  };
  const ds = ctx.ds;

  /**
   * A zero-filled export of the full disk's size for the imports (its qemu-nbd started with
   * `env`), with diskstream reading its image file (as nbdcopy reads the raw file) and
   * nbdcopy writing into it.
   */
  const importTarget = async (file: string, env: Record<string, string> = {}) => {
    const [raw, image] = [await ctx.inputs.fullRaw(), await ctx.inputs.fullQcow2()];
    const target = `${ctx.work}/${file}`;
    await zeroFilled(target, (await Deno.stat(raw)).size);
    const uri = await serve(
      withEnv(env, () => startQemuNbd(ctx.work, target, { readOnly: false })),
    );
    const verify = ctx.sameAs(raw, target, "raw");
    const diskstream: Contender = {
      name: "diskstream",
      pipeline: { stages: [[...ds, "import", "-i", image, uri]] },
      unavailable: await ctx.missing("import", "--connections"),
      verify,
    };
    const nbdcopy: Contender = {
      name: NBDCOPY,
      pipeline: { stages: [["nbdcopy", "--flush", raw, uri]] },
      verify,
    };
    return { image, uri, verify, diskstream, nbdcopy };
  };

  return [
    {
      name: "nbd-export",
      title: "export of a fully allocated disk served by qemu-nbd → pipe (`| cat > /dev/null`)",
      reference: "nbdcopy",
      cleanup: teardown,
      contenders: async () => {
        const uri = await serve(startQemuNbd(ctx.work, await ctx.inputs.fullRaw()));
        return [
          {
            name: "diskstream",
            pipeline: toPipe([...ds, "export", uri]),
            unavailable: await ctx.missing("export", "--connections"),
          },
          { name: "nbdcopy", pipeline: toPipe(["nbdcopy", uri, "-"]) },
        ];
      },
    },
    {
      name: "nbd-sparse",
      title: "export of the sparse disk served by qemu-nbd vs its data as a dense disk, and " +
        "a full read of the sparse export (`nbdcopy --no-extents`) → pipe",
      reference: "sparse",
      cleanup: teardown,
      contenders: async () => {
        const sparse = await serve(startQemuNbd(ctx.work, await ctx.inputs.sparse()));
        const dense = await serve(startQemuNbd(ctx.work, await ctx.inputs.dense()));
        const missing = await ctx.missing("export", "--connections");
        return [
          { name: "sparse", pipeline: toPipe([...ds, "export", sparse]), unavailable: missing },
          { name: "dense", pipeline: toPipe([...ds, "export", dense]), unavailable: missing },
          {
            name: "nbdcopy --no-extents",
            pipeline: toPipe(["nbdcopy", "--no-extents", sparse, "-"]),
            // Reading 64 GiB takes about a minute, some 80 × the sparse export: one run.
            runs: 1,
          },
        ];
      },
    },
    {
      name: "nbd-latency",
      title: "export of 1 GiB (nbdkit pattern plugin) with 10 ms added to every read " +
        "(delay filter), 4 connections vs 1 → pipe",
      reference: "4 connections",
      cleanup: teardown,
      contenders: async () => {
        const uri = await serve(
          startNbdkit(ctx.work, ["--filter=delay", "pattern", "1G", "rdelay=10ms"]),
        );
        const missing = await ctx.missing("export", "--connections");
        return [
          {
            name: "4 connections",
            pipeline: toPipe([...ds, "export", uri, "--connections", "4"]),
            unavailable: missing,
          },
          {
            name: "1 connection",
            pipeline: toPipe([...ds, "export", uri, "--connections", "1"]),
            unavailable: missing,
            // Its time is the injected delay's: 1024 reads one after another × 10 ms (11.4
            // to 11.7 s across runs, 2% apart), so one run says it; saves 23 s of bench.
            runs: 1,
          },
        ];
      },
    },
    {
      name: "nbd-import",
      title: "import of the qcow2 of the fully allocated disk into an export served by " +
        "qemu-nbd (its malloc tuned so that it is not the bound: " +
        "`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=32M`) vs `nbdcopy --flush` of the raw " +
        "bytes into it",
      reference: NBDCOPY,
      notes: [
        "diskstream's import ends with `NBD_CMD_FLUSH` (the data is durable when it reports " +
        "success); `nbdcopy` flushes only with `--flush`, which is therefore its row here " +
        "(the same durability; plain nbdcopy skips the server's fdatasync of the 2 GiB, " +
        "about 1 s here). With glibc's defaults qemu-nbd maps and unmaps a buffer for " +
        "every write it receives; on this VM that costs it ~14 s of CPU per 2 GiB, which " +
        "bounds every client: the tuned server lets the clients be what is timed, and " +
        "nbd-import-default shows the default one.",
      ],
      cleanup: teardown,
      contenders: async () => {
        const t = await importTarget("nbd-target.raw", SERVER_MALLOC);
        return [t.diskstream, {
          name: "diskstream (pipe)",
          pipeline: { stages: [["cat", t.image], [...ds, "import", t.uri]], mainStage: 1 },
          unavailable: t.diskstream.unavailable,
          verify: t.verify,
        }, t.nbdcopy];
      },
    },
    {
      name: "nbd-import-default",
      title: "nbd-import into a qemu-nbd with glibc's default malloc (the server is the bound)",
      reference: NBDCOPY,
      notes: [
        "Each timed once: both take the server's time (~12–16 s of page faults per 2 GiB), " +
        "which a client cannot change.",
      ],
      cleanup: teardown,
      contenders: async () => {
        const t = await importTarget("nbd-target-default.raw");
        return [{ ...t.diskstream, runs: 1 }, { ...t.nbdcopy, runs: 1 }];
      },
    },
  ];
}

/** The goals of issue 12. */
export function nbdGoals(
  goal: (
    text: string,
    c: string,
    a: string,
    b: string,
    t: Pick<Goal, "target" | "ok">,
  ) => Goal,
): Goal[] {
  const atMost = (x: number) => ({ target: `≤ ${x}`, ok: (r: number) => r <= x });
  const atLeast = (x: number) => ({ target: `≥ ${x}`, ok: (r: number) => r >= x });
  return [
    goal(
      "NBD export → pipe within 1.1 × nbdcopy",
      "nbd-export",
      "diskstream",
      "nbdcopy",
      atMost(1.1),
    ),
    goal(
      "sparse NBD export at most 3 × its data as a dense export",
      "nbd-sparse",
      "sparse",
      "dense",
      atMost(3),
    ),
    goal(
      "sparse NBD export ≥ 20 × faster than a full read (ratio = full read / sparse)",
      "nbd-sparse",
      "nbdcopy --no-extents",
      "sparse",
      atLeast(20),
    ),
    goal(
      "with 10 ms per read, 4 connections ≥ 3 × faster than 1 (ratio = 1 / 4)",
      "nbd-latency",
      "1 connection",
      "4 connections",
      atLeast(3),
    ),
    goal(
      "import into NBD within 1.2 × `nbdcopy --flush` (each reading its file)",
      "nbd-import",
      "diskstream",
      NBDCOPY,
      atMost(1.2),
    ),
    goal(
      "(extra) import into NBD through a pipe (`cat image |`) within 1.2 × `nbdcopy --flush`",
      "nbd-import",
      "diskstream (pipe)",
      NBDCOPY,
      atMost(1.2),
    ),
    goal(
      "(info) import into a default qemu-nbd (the server is the bound) / `nbdcopy --flush`",
      "nbd-import-default",
      "diskstream",
      NBDCOPY,
      { target: "—", ok: () => true },
    ),
  ];
}
