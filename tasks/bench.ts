/**
 * `deno task bench`: diskstream against its peers, in one run, alternating.
 *
 * Builds its inputs in a temp dir once (sparse where possible; removed afterwards, also
 * on Ctrl-C or failure), runs every case for diskstream and the peers in rotating order,
 * checks the output of each command's first timed run (untimed), and prints a Markdown
 * report: medians, ratios, peak RSS, and the goals of issues 5 and 13 with PASS/FAIL.
 *
 *   deno task bench [--runs N] [--quick] [--case NAME]... [--dir DIR] [--cold] [--cli PATH]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { FULL_SIZES, Inputs, type InputSizes, QUICK_SIZES, zeroFilled } from "./bench_inputs.ts";
import {
  type BenchCase,
  CommandFailed,
  commandOutput,
  type Contender,
  displayPipeline,
  HAVE_GNU_TIME,
  killCurrent,
  measure,
  median,
  type Pipeline,
  type Sample,
  shellQuote,
} from "./bench_measure.ts";
import { imagesEqual } from "../tests/helpers.ts";
import { nbdCases, nbdGoals } from "./bench_nbd.ts";
import { httpCases, httpGoalRows } from "./bench_http.ts";
import { type Quieted, quietMachine } from "./bench_quiet.ts";

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const DENO = Deno.execPath();
const COPY_LOOP = [DENO, "run", "--allow-read", `${ROOT}/tasks/bench_copy_loop.ts`];
const XO_VERSION = "1.3.1";
const XO_SCRIPT = `${ROOT}/tasks/bench_xo_qcow2.mjs`;
const MiB = 1024 * 1024;
const RSS_LIMIT_MIB = 200;

/** Names of the contenders, used by the goals. */
const DISKSTREAM = "diskstream";
const XO = "@xen-orchestra/qcow2";
const PV = "pv -q";
const VERSION = "diskstream --version";
const CAT_BOTH = "cat base new";
const QEMU_WB = "qemu-img convert -t writeback";
const STREAMS_DS = "8 × diskstream export";
const STREAMS_PV = "8 × pv -q";
const STREAMS_VERSION = "8 × diskstream --version";
/** Concurrent streams of the many-streams case. */
const STREAMS = 8;
/** Worst peak RSS of one diskstream process in the many-streams case (MiB). */
let streamsRssMiB = NaN;

/** What happened to one contender of a case. */
interface Outcome {
  name: string;
  display: string;
  samples: Sample[];
  mainStage: number;
  problem?: string;
  /** Peak page cache use of the case's files per timed run, MiB (cases that watch it). */
  cacheGrowth: number[];
}

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    runs: { type: "string", default: "3" },
    quick: { type: "boolean", default: false },
    case: { type: "string", multiple: true },
    dir: { type: "string" },
    cli: { type: "string" },
    cold: { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
});

const CLI = opts.cli ?? `${ROOT}/cli.ts`;
const CLI_DIR = CLI.replace(/\/[^/]*$/, "") || ".";
const DS = [DENO, "run", "-A", `--config=${CLI_DIR}/deno.json`, CLI];
const sizes: InputSizes = opts.quick ? QUICK_SIZES : FULL_SIZES;
const runs = Number(opts.runs);
if (!Number.isInteger(runs) || runs < 1) {
  console.error(`bench: --runs needs a positive integer, got '${opts.runs}'`);
  Deno.exit(2);
}
const started = performance.now();
/** Minutes and seconds since the bench started, for the progress lines. */
const elapsed = () => {
  const s = Math.round((performance.now() - started) / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
};
const log = (s: string) => console.error(`[${elapsed()}] ${s}`);
// --help needs the case names only: nothing is made on disk for it (the cases read `work`
// and `inputs` only when they run).
const work = opts.help
  ? "(the work dir)"
  : await Deno.makeTempDir({ prefix: "diskstream-bench-", dir: opts.dir });
const scratch = `${work}/scratch`;
if (!opts.help) await Deno.mkdir(scratch);
/** A work dir in memory (tmpfs), for a server's uploads; removed with `work`. */
const memoryWork = opts.help ? undefined : await Deno.makeTempDir({
  prefix: "diskstream-bench-",
  dir: "/dev/shm",
}).catch(() => undefined);
const inputs = new Inputs(work, sizes, log);

/** DAMON reclaim and free page reporting, paused while the bench runs (root only). */
const quiet: Quieted = opts.help ? { notes: [], resume() {} } : quietMachine(opts.quick ? 1 : 6);

function cleanupAndExit(code: number): never {
  quiet.resume();
  killCurrent();
  for (const dev of loops) new Deno.Command("losetup", { args: ["-d", dev] }).outputSync();
  for (const dir of [work, memoryWork]) {
    try {
      if (dir) Deno.removeSync(dir, { recursive: true });
    } catch {
      // best effort
    }
  }
  Deno.exit(code);
}
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  Deno.addSignalListener(sig, () => {
    log(`\nbench: ${sig}, removing ${work}`);
    cleanupAndExit(130);
  });
}

/** The script with `$W` for the work dir and without the long absolute paths. */
function shorten(script: string): string {
  return script
    .replaceAll(` --config=${CLI_DIR}/deno.json`, "")
    .replaceAll(DENO, "deno")
    .replace(/env XO_QCOW2_DIR=\S+ /g, "")
    .replaceAll(work, "$W")
    .replaceAll(`${ROOT}/`, "");
}

// ---- availability of diskstream's commands and of the peers ----

const helpCache = new Map<string, string | null>();
async function dsHelp(command: string): Promise<string | null> {
  if (!helpCache.has(command)) {
    const out = await commandOutput(DS[0], [...DS.slice(1), command, "--help"]);
    helpCache.set(command, out?.includes(`Usage: diskstream ${command}`) ? out : null);
  }
  return helpCache.get(command)!;
}

/** Why `diskstream COMMAND [flag]` cannot run yet, or undefined when it can. */
async function dsMissing(command: string, flag?: string): Promise<string | undefined> {
  const help = await dsHelp(command);
  if (help === null) return `not available: \`diskstream ${command}\` is not implemented yet`;
  if (flag && !help.includes(flag)) {
    return `not available: \`diskstream ${command}\` has no ${flag} yet`;
  }
}

let xoDir: Promise<string> | undefined;
/** A directory whose node_modules holds @xen-orchestra/qcow2 (installed once, cached). */
function xoInstall(): Promise<string> {
  xoDir ??= (async () => {
    if (await commandOutput("node", ["--version"]) === null) throw new Error("node is missing");
    const cache = Deno.env.get("XDG_CACHE_HOME") ?? `${Deno.env.get("HOME") ?? "/tmp"}/.cache`;
    const dir = `${cache}/diskstream-bench/xo-qcow2-${XO_VERSION}`;
    try {
      await Deno.stat(`${dir}/node_modules/@vates/read-chunk/package.json`);
      await Deno.stat(`${dir}/node_modules/@xen-orchestra/qcow2/package.json`);
      return dir;
    } catch {
      // not installed yet
    }
    await Deno.mkdir(dir, { recursive: true });
    log(`  installing @xen-orchestra/qcow2@${XO_VERSION} with npm into ${dir}`);
    // 1.3.1 imports @vates/read-chunk without declaring it: install it alongside.
    const r = await new Deno.Command("npm", {
      args: [
        "install",
        "--prefix",
        dir,
        "--no-audit",
        "--no-fund",
        `@xen-orchestra/qcow2@${XO_VERSION}`,
        "@vates/read-chunk@1",
      ],
      stdout: "null",
      stderr: "piped",
    }).output().catch((e) => ({ success: false, stderr: new TextEncoder().encode(String(e)) }));
    if (!r.success) {
      throw new Error(`npm install failed: ${new TextDecoder().decode(r.stderr).trim()}`);
    }
    return dir;
  })();
  return xoDir;
}

/** A contender driven by tasks/bench_xo_qcow2.mjs, or an unavailable one with the reason. */
async function xo(pipeline: (node: string[]) => Pipeline, extra: Partial<Contender> = {}) {
  try {
    const dir = await xoInstall();
    const node = ["env", `XO_QCOW2_DIR=${dir}`, "node", XO_SCRIPT];
    return { name: XO, pipeline: pipeline(node), ...extra };
  } catch (err) {
    return { name: XO, pipeline: pipeline(["node"]), unavailable: (err as Error).message };
  }
}

// ---- the cases ----

const remove = (path: string) => () => Deno.remove(path).catch(() => {});

/** True when Debian's xxhash is there: raw outputs are then checked by XXH128. */
const HAVE_XXHSUM = await commandOutput("xxhsum", ["-H2", "/dev/null"]) !== null;
const hashes = new Map<string, Promise<string>>();
/** XXH128 (`xxhsum -H2`) of a file or device, in hex. */
async function xxh128(path: string): Promise<string> {
  return (await must("xxhsum", ["-H2", path])).split(/\s/)[0];
}
/** XXH128 of an input of the bench (made once, never changed): computed once. */
function inputHash(path: string): Promise<string> {
  let h = hashes.get(path);
  if (h === undefined) {
    h = xxh128(path);
    hashes.set(path, h);
  }
  return h;
}

/**
 * A check that `out` (format `fOut`) holds the bytes of the raw `source`: a raw output by
 * XXH128 against the source's (hashed once), else by `qemu-img compare`.
 */
const sameAs = (source: string, out: string, fOut?: string) => async () => {
  const same = fOut === "raw" && HAVE_XXHSUM
    ? await xxh128(out) === await inputHash(source)
    : await imagesEqual(source, out, "raw", fOut);
  return same ? null : `${out} differs from ${source}`;
};

function allCases(): BenchCase[] {
  const toPipe = (...stages: string[][]): Pipeline => ({ stages: [...stages, ["cat"]] });
  /** `export -f tar` of the full disk with the 5% hint and without it (tar-hint, tar-hint-cold). */
  const tarPair = async (): Promise<Contender[]> => {
    const [raw, hint] = [await inputs.fullRaw(), await inputs.hint5()];
    const unavailable = await dsMissing("export", "--tar-prefix");
    return [
      {
        name: "tar --allocation",
        pipeline: toPipe([...DS, "export", "-f", "tar", "--allocation", hint, raw]),
        unavailable,
      },
      { name: "tar", pipeline: toPipe([...DS, "export", "-f", "tar", raw]), unavailable },
    ];
  };
  return [
    {
      name: "export-pipe",
      title: "export, fully allocated disk → pipe (`| cat > /dev/null`)",
      reference: "bare Deno loop",
      contenders: async () => {
        const raw = await inputs.fullRaw();
        return [
          {
            name: DISKSTREAM,
            pipeline: toPipe([...DS, "export", raw]),
            unavailable: await dsMissing("export"),
          },
          { name: "cat | cat", pipeline: toPipe(["cat", raw]) },
          { name: PV, pipeline: toPipe(["pv", "-q", raw]), unavailable: await missingTool("pv") },
          { name: VERSION, pipeline: { stages: [[...DS, "--version"]] } },
          { name: "bare Deno loop", pipeline: toPipe([...COPY_LOOP, raw]) },
          // About 8 × diskstream's time, where the goal is < 1: timed once.
          await xo((node) => toPipe([...node, "export", raw, "-"]), { runs: 1 }),
        ];
      },
    },
    {
      name: "export-file",
      title: "export, fully allocated disk → qcow2 file",
      reference: "qemu-img convert",
      contenders: async () => {
        const raw = await inputs.fullRaw();
        const out = `${work}/out.qcow2`;
        const common = { after: remove(out), verify: sameAs(raw, out, "qcow2") };
        // diskstream's first output, once checked, is the http cases' image (not made again).
        let checked = false;
        return [
          {
            name: DISKSTREAM,
            pipeline: { stages: [[...DS, "export", raw, "-o", out]] },
            unavailable: await dsMissing("export"),
            verify: async () => {
              const wrong = await common.verify();
              checked = wrong === null;
              return wrong;
            },
            after: async () => {
              if (!checked || !(await inputs.adoptFullExport(out))) await common.after();
            },
          },
          {
            name: "qemu-img convert",
            pipeline: { stages: [["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out]] },
            ...common,
          },
          {
            // qemu-img convert writes with cache=unsafe (no final sync); diskstream syncs.
            name: QEMU_WB,
            pipeline: {
              stages: [[
                "qemu-img",
                "convert",
                "-t",
                "writeback",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw,
                out,
              ]],
            },
            after: remove(out),
          },
          // About 3 × diskstream's time, where the goal is < 1: timed once.
          await xo((node) => ({ stages: [[...node, "export", raw, out]] }), { ...common, runs: 1 }),
        ];
      },
    },
    {
      name: "sparse",
      title: `export of a sparse ${gib(sizes.sparseVirtual)} file with ${
        mib(sizes.sparsePieces * 65536)
      } of data vs that data as a dense file → pipe`,
      reference: "dense",
      notes: [
        `${XO}: not run — its RawDisk reports every block as allocated (no hole detection), ` +
        `so it would read and emit all ${gib(sizes.sparseVirtual)}.`,
      ],
      contenders: async () => {
        const missing = await dsMissing("export");
        return [
          {
            name: "sparse",
            pipeline: toPipe([...DS, "export", await inputs.sparse()]),
            unavailable: missing,
          },
          {
            name: "dense",
            pipeline: toPipe([...DS, "export", await inputs.dense()]),
            unavailable: missing,
          },
        ];
      },
    },
    {
      name: "hint-diff",
      title: "export of the fully allocated disk with an allocation hint / with --diff " +
        "(5% of clusters changed) → pipe",
      reference: "plain",
      notes: [
        `The hint is \`qemu-img map --output=json\` of the raw disk. ${XO} and qemu-img have ` +
        `no content diff of two raw disks, so there is no peer here; the ratios show the cost ` +
        `of the hint and of reading the base.`,
      ],
      contenders: async () => {
        const raw = await inputs.fullRaw();
        const [hint, base] = [await inputs.hint(), await inputs.diffBase()];
        return [
          {
            name: "plain",
            pipeline: toPipe([...DS, "export", raw]),
            unavailable: await dsMissing("export"),
          },
          {
            name: "--allocation",
            pipeline: toPipe([...DS, "export", "--allocation", hint, raw]),
            unavailable: await dsMissing("export", "--allocation"),
          },
          {
            name: "--diff",
            pipeline: toPipe([...DS, "export", "--diff", base, raw]),
            unavailable: await dsMissing("export", "--diff"),
          },
          { name: CAT_BOTH, pipeline: { stages: [["cat", base, raw]] } },
          { name: VERSION, pipeline: { stages: [[...DS, "--version"]] } },
        ];
      },
    },
    {
      name: "import",
      title: "import of a qcow2 written by `qemu-img convert` through a pipe → new raw file",
      reference: "cat > file",
      notes: [
        "`cat > file` copies file to file inside the kernel (coreutils uses copy_file_range), " +
        "with no pipe; `cat | cat > file` is the floor for anything that reads a pipe; " +
        "diskstream import syncs its data (fdatasync) before it reports success, as " +
        "`+ fdatasync` does. " +
        `${XO}'s stream reader (QcowStream) reads every L2 table before any data and cannot ` +
        "go back, so it only reads images whose tables all come first (its own output), not " +
        "qemu-img's, whose L2 tables sit among the data.",
      ],
      contenders: async () => {
        const [raw, image] = [await inputs.fullRaw(), await inputs.fullQcow2()];
        const out = `${work}/out.raw`;
        const common = { after: remove(out), verify: sameAs(raw, out, "raw") };
        return [
          {
            name: DISKSTREAM,
            pipeline: { stages: [["cat", image], [...DS, "import", out]], mainStage: 1 },
            unavailable: await dsMissing("import"),
            ...common,
          },
          {
            // The reference of the CPU goal: every run timed (one sample swung 0.76–1.7 s).
            name: QEMU_WB,
            pipeline: { stages: [qemuToRaw(image, out)] },
            ...common,
          },
          {
            name: "cat > file",
            pipeline: { stages: [["cat", image]], stdout: out },
            after: remove(out),
          },
          {
            name: "cat > file + fdatasync",
            pipeline: {
              stages: [["sh", "-c", 'cat "$1" > "$2" && sync -d "$2"', "sh", image, out]],
            },
            after: remove(out),
          },
          {
            name: "cat | cat > file",
            pipeline: { stages: [["cat", image], ["cat"]], stdout: out, mainStage: 1 },
            after: remove(out),
          },
          await xo(
            (node) => ({ stages: [["cat", image], [...node, "import-stream", out]], mainStage: 1 }),
            { ...common, name: `${XO} (stream)` },
          ),
          await xo(
            (node) => ({ stages: [[...node, "import-file", image, out]] }),
            // 3 × diskstream's time (goal: slower than diskstream): one run says enough.
            { ...common, name: `${XO} (file, random access)`, runs: 1 },
          ),
        ];
      },
    },
    {
      name: "import-snapshot",
      title: "import of a qcow2 snapshotted then fully rewritten (its active L2 tables after " +
        "all the old data) vs the same image after `qemu-img convert` (tables first), through " +
        "a pipe and from a file → new raw file",
      reference: "pipe, converted",
      notes: [
        "Through a pipe the old data must be held until the last active L2 table has gone by " +
        "(nothing in the stream says it is stale): up to --max-buffer (16M) in memory, the " +
        "rest in the spool file, forgotten once every table is known. From a file (`-i`) " +
        "the tables are read first and only the live data is read, in file order.",
      ],
      contenders: async () => {
        const [snap, flat, want] = await Promise.all([
          inputs.snapshotQcow2(),
          inputs.snapshotFlat(),
          inputs.diffBase(),
        ]);
        const out = `${work}/out.raw`;
        const common = { after: remove(out), verify: sameAs(want, out, "raw") };
        const missing = await dsMissing("import", "--spool-dir");
        const pipe = (image: string): Pipeline => ({
          stages: [["cat", image], [...DS, "import", out]],
          mainStage: 1,
        });
        const file = (image: string): Pipeline => ({
          stages: [[...DS, "import", out, "-i", image]],
        });
        return [
          { name: "pipe, snapshotted", pipeline: pipe(snap), unavailable: missing, ...common },
          { name: "pipe, converted", pipeline: pipe(flat), unavailable: missing, ...common },
          { name: "file, snapshotted", pipeline: file(snap), unavailable: missing, ...common },
          { name: "file, converted", pipeline: file(flat), unavailable: missing, ...common },
        ];
      },
    },
    {
      name: "tar-hint",
      title: "export -f tar (XVA disk members) of the fully allocated disk with a hint " +
        "listing 5% of its 2 MiB blocks, vs qcow2 with the same hint, vs tar without it → pipe",
      reference: "qcow2 --allocation",
      contenders: async () => {
        const [hinted, plain] = await tarPair();
        const [raw, hint] = [await inputs.fullRaw(), await inputs.hint5()];
        const qcow2 = toPipe([...DS, "export", "--allocation", hint, raw]);
        return [hinted, { ...hinted, name: "qcow2 --allocation", pipeline: qcow2 }, plain];
      },
    },
    {
      name: "tar-hint-cold",
      title: "the tar pair of tar-hint with the page cache dropped before every run (a host " +
        "reading the VDI from its storage) → pipe",
      reference: "tar --allocation",
      cold: true,
      contenders: tarPair,
    },
    {
      name: "tar-import",
      title: "import -f tar (XVA disk members) of the fully allocated disk through a pipe → " +
        "new raw file, vs import of its qcow2",
      reference: "import qcow2",
      contenders: async () => {
        const [raw, image] = [await inputs.fullRaw(), await inputs.fullQcow2()];
        const missing = await dsMissing("import", "--ignore-checksums");
        const tar = missing ? "" : await inputs.fullTar(DS);
        const out = `${work}/out.raw`;
        const common = { after: remove(out), verify: sameAs(raw, out, "raw") };
        return [
          {
            name: "import -f tar",
            pipeline: { stages: [["cat", tar], [...DS, "import", "-f", "tar", out]], mainStage: 1 },
            unavailable: missing,
            ...common,
          },
          {
            name: "import qcow2",
            pipeline: { stages: [["cat", image], [...DS, "import", out]], mainStage: 1 },
            unavailable: missing,
            ...common,
          },
        ];
      },
    },
    {
      name: "headers",
      title: `headers of a ${gib(sizes.hugeVirtual)} qcow2 with ${sizes.hugeWrites} ` +
        `scattered 64 KiB clusters`,
      reference: DISKSTREAM,
      contenders: async () => {
        const image = await inputs.hugeQcow2();
        return [
          {
            name: DISKSTREAM,
            pipeline: { stages: [[...DS, "headers", image]] },
            unavailable: await dsMissing("headers"),
          },
          {
            name: "qemu-img map",
            pipeline: { stages: [["qemu-img", "map", "--output=json", image]] },
          },
          // About 5 × diskstream's time, where the goal is > 1: timed once.
          await xo((node) => ({ stages: [[...node, "headers", image]] }), { runs: 1 }),
        ];
      },
    },
    {
      name: "compressed",
      title: `import of a ${mib(sizes.compressible)} disk compressed by \`qemu-img convert -c\` ` +
        "(deflate, zstd) through a pipe → new raw file",
      reference: `${QEMU_WB} deflate`,
      runs: 3,
      notes: [
        "qemu-img reads the image from the file (random access, a thread pool decompressing); " +
        "diskstream reads it from a pipe, decompressing on worker threads.",
      ],
      contenders: async () => {
        const raw = await inputs.compressibleRaw();
        const out = `${work}/out.raw`;
        const common = { after: remove(out), verify: sameAs(raw, out, "raw") };
        const missing = await dsMissing("import");
        const list: Contender[] = [];
        // Both images at once: deflate compresses on one thread, so zstd takes the other core.
        const types = ["deflate", "zstd"] as const;
        const images = await Promise.all(types.map((type) => inputs.compressedQcow2(type)));
        for (const [n, type] of types.entries()) {
          const image = images[n];
          list.push(
            {
              name: `${DISKSTREAM} ${type}`,
              pipeline: { stages: [["cat", image], [...DS, "import", out]], mainStage: 1 },
              unavailable: missing,
              ...common,
            },
            {
              name: `${QEMU_WB} ${type}`,
              pipeline: { stages: [qemuToRaw(image, out)] },
              ...common,
            },
          );
        }
        return list;
      },
    },
    directCase(),
    {
      name: "streams",
      title: `${STREAMS} concurrent exports of a ${mib(sizes.small)} disk → ${STREAMS} pipes`,
      reference: STREAMS_PV,
      contenders: async () => {
        const raw = await inputs.smallRaw();
        const each = (cmd: string[], rss?: boolean) => {
          const one = cmd.map(shellQuote).join(" ");
          const lines = Array.from({ length: STREAMS }, (_, i) => {
            const timed = rss ? `/usr/bin/time -f %M -o ${scratch}/streams-rss.${i} ${one}` : one;
            return `${timed} | cat > /dev/null &`;
          });
          return { stages: [["bash", "-c", `${lines.join("\n")}\nwait`]] };
        };
        return [
          {
            name: STREAMS_DS,
            pipeline: each([...DS, "export", raw], HAVE_GNU_TIME),
            unavailable: await dsMissing("export"),
            after: async () => {
              for (let i = 0; i < STREAMS && HAVE_GNU_TIME; i++) {
                const kib = Number(
                  await Deno.readTextFile(`${scratch}/streams-rss.${i}`)
                    .then((t) => t.trim().split("\n").at(-1)).catch(() => NaN),
                );
                streamsRssMiB = Number.isNaN(streamsRssMiB)
                  ? kib / 1024
                  : Math.max(streamsRssMiB, kib / 1024);
              }
            },
          },
          {
            name: STREAMS_PV,
            pipeline: each(["pv", "-q", raw]),
            unavailable: await missingTool("pv"),
          },
          { name: STREAMS_VERSION, pipeline: each([...DS, "--version"]) },
        ];
      },
    },
    {
      name: "startup",
      title: "start-up: the source entry (`deno run cli.ts`) and the bundled file " +
        "(`deno task bundle`), `--version` and the export of a 1 MiB disk",
      reference: "--version (cli.ts)",
      contenders: async () => {
        // As `deno task bundle` makes it: split at the dynamic imports, the entry renamed.
        const dir = `${work}/bundle`;
        const bundle = `${dir}/diskstream.js`;
        const built = await new Deno.Command(DENO, {
          args: [
            "bundle",
            "--quiet",
            "--platform",
            "deno",
            "--code-splitting",
            `--config=${CLI_DIR}/deno.json`,
            "--outdir",
            dir,
            CLI,
          ],
          stdout: "null",
          stderr: "piped",
        }).output();
        if (built.success) await Deno.rename(`${dir}/cli.js`, bundle);
        const noBundle = built.success
          ? undefined
          : `deno bundle failed: ${new TextDecoder().decode(built.stderr).trim().split("\n")[0]}`;
        const disk = `${work}/one-mib.raw`;
        await Deno.writeFile(disk, new Uint8Array(1024 * 1024).fill(0x5a));
        const BUNDLED = [DENO, "run", "-A", bundle];
        return [
          { name: "--version (cli.ts)", pipeline: { stages: [[...DS, "--version"]] } },
          {
            name: "--version (bundle)",
            pipeline: { stages: [[...BUNDLED, "--version"]] },
            unavailable: noBundle,
          },
          { name: "export 1 MiB (cli.ts)", pipeline: toPipe([...DS, "export", disk]) },
          {
            name: "export 1 MiB (bundle)",
            pipeline: toPipe([...BUNDLED, "export", disk]),
            unavailable: noBundle,
          },
        ];
      },
    },
    ...httpCases({
      work,
      memoryWork,
      ds: DS,
      fullRaw: () => inputs.fullRaw(),
      fullExport: () => inputs.fullExport(DS),
      sizes,
      log,
    }),
    ...nbdCases({ ds: DS, inputs, work, missing: dsMissing, sameAs }),
  ];
}

/** `qemu-img convert -t writeback` of a qcow2 into a raw file (qemu-img's import). */
function qemuToRaw(image: string, out: string): string[] {
  return ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", image, out];
}

/** Why `tool` cannot run here (not installed), or undefined. */
async function missingTool(tool: string): Promise<string | undefined> {
  return await commandOutput("sh", ["-c", `command -v ${tool}`]) === null
    ? `not available: ${tool} is not installed (Debian package ${tool})`
    : undefined;
}

/** Runs a command; returns its stdout, throwing with its stderr on failure. */
async function must(cmd: string, args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (!r.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(r.stderr).trim()}`);
  }
  return new TextDecoder().decode(r.stdout).trim();
}

/**
 * `--direct` on loop devices with the page cache dropped before every run (root):
 * export of a device over the full disk, import into a device over a scratch file.
 * The loop devices do direct I/O on their files, so only the device's own cache counts.
 */
/** Loop devices set up by the bench (detached after their case, or on Ctrl-C). */
const loops: string[] = [];

function directCase(): BenchCase {
  return {
    name: "direct",
    title: `cold ${gib(sizes.full)} transfers on loop devices, buffered and with --direct ` +
      "(page cache dropped before every run)",
    reference: "export",
    // The device's own spread is ±20 % a run (measured by hand, alternating): the
    // medians of 5 runs, not 3, decide the --direct goals.
    minRuns: 5,
    cold: true,
    watchCache: () => loops,
    notes: [
      "Page cache use is the peak, sampled every 50 ms with mincore(2), of the two loop " +
      "devices' pages in the cache (the devices do direct I/O on their files, and the " +
      "import's input is read with `dd iflag=direct`, so nothing else caches the data).",
    ],
    contenders: async () => {
      const [raw, image] = [await inputs.fullRaw(), await inputs.fullQcow2()];
      const dest = `${work}/direct-dest.raw`;
      let unavailable: string | undefined;
      try {
        await zeroFilled(dest, sizes.full);
        for (const file of [raw, dest]) {
          loops.push(await must("losetup", ["-f", "--show", "--direct-io=on", file]));
        }
      } catch (err) {
        unavailable = `not available: loop devices need root and losetup (${
          (err as Error).message
        })`;
      }
      const [src, dst] = loops;
      const dsExport = (flags: string[]) => ({
        stages: [[...DS, "export", ...flags, src ?? raw], ["cat"]],
      });
      const dsImport = (flags: string[]) => ({
        stages: [
          ["dd", `if=${image}`, "iflag=direct", "bs=4M", "status=none"],
          [...DS, "import", ...flags, "--prezeroed", dst ?? dest],
        ],
        mainStage: 1,
      });
      const missing = unavailable ?? await dsMissing("export", "--direct");
      const verify = sameAs(raw, dst ?? dest, "raw");
      return [
        { name: "export", pipeline: dsExport([]), unavailable: missing },
        { name: "export --direct", pipeline: dsExport(["--direct"]), unavailable: missing },
        { name: "import", pipeline: dsImport([]), unavailable: missing, verify },
        { name: "import --direct", pipeline: dsImport(["--direct"]), unavailable: missing, verify },
      ];
    },
    cleanup: async () => {
      for (const dev of loops.splice(0)) await must("losetup", ["-d", dev]).catch(() => "");
    },
  };
}

function caseNames(): string[] {
  return allCases().map((c) => c.name);
}

function gib(n: number): string {
  return `${n / (1024 * MiB)} GiB`;
}
function mib(n: number): string {
  return `${n / MiB} MiB`;
}

// ---- running ----

let coldState: string;
async function dropCaches(): Promise<boolean> {
  try {
    await new Deno.Command("sync").output();
    await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3");
    return true;
  } catch {
    return false;
  }
}

const libc = (() => {
  try {
    return Deno.dlopen("libc.so.6", {
      open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
      close: { parameters: ["i32"], result: "i32" },
      lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
      mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
      munmap: { parameters: ["pointer", "usize"], result: "i32" },
      mincore: { parameters: ["pointer", "usize", "buffer"], result: "i32" },
    }).symbols;
  } catch {
    return null;
  }
})();

/**
 * MiB of `paths` (files or block devices) in the page cache, by mincore(2) over a
 * mapping of each (util-linux's fincore sees no block device: their size is 0 to
 * stat). The machine-wide `Cached:` is useless here: after the page cache is dropped,
 * every process on the machine refills it.
 */
function cachedMiB(paths: string[]): number {
  if (libc === null) return NaN;
  let pages = 0;
  for (const path of paths) {
    const fd = libc.open(new TextEncoder().encode(path + "\0"), 0, 0);
    if (fd < 0) return NaN;
    try {
      const size = Number(libc.lseek(fd, 0n, 2));
      if (size <= 0) continue;
      const map = libc.mmap(null, BigInt(size), 1, 1, fd, 0n);
      if (map === null || Deno.UnsafePointer.value(map) === 0xffffffffffffffffn) return NaN;
      const vec = new Uint8Array(Math.ceil(size / 4096));
      const ok = libc.mincore(map, BigInt(size), vec) === 0;
      libc.munmap(map, BigInt(size));
      if (!ok) return NaN;
      for (const v of vec) pages += v & 1;
    } finally {
      libc.close(fd);
    }
  }
  return pages * 4096 / MiB;
}

/**
 * Runs `f`, sampling how much of `paths` is in the page cache every 50 ms; returns
 * its result and the peak (MiB).
 */
async function watchingCache<T>(paths: string[], f: () => Promise<T>): Promise<[T, number]> {
  let peak = cachedMiB(paths);
  const timer = setInterval(() => peak = Math.max(peak, cachedMiB(paths)), 50);
  try {
    const r = await f();
    return [r, Math.max(peak, cachedMiB(paths))];
  } finally {
    clearInterval(timer);
  }
}

async function runCase(c: BenchCase): Promise<Outcome[]> {
  log(`case ${c.name}: preparing`);
  if (c.cold && !opts.cold && !(await dropCaches())) {
    return [{
      name: c.reference,
      display: "",
      samples: [],
      mainStage: 0,
      problem: "not run: dropping the page cache needs root",
      cacheGrowth: [],
    }];
  }
  const t = performance.now();
  const contenders = await c.contenders();
  caseTime(c.name).prepare += (performance.now() - t) / 1000;
  return await runContenders(c, contenders);
}

/** Where a case's time went (seconds): making its inputs, timed runs, the rest. */
interface CaseTime {
  prepare: number;
  timed: number;
  /** Output checks, clean-up and the `sync` after every run. */
  between: number;
  /** The whole case, as seen from the main loop. */
  total: number;
}
const caseTimes = new Map<string, CaseTime>();
function caseTime(name: string): CaseTime {
  let t = caseTimes.get(name);
  if (t === undefined) {
    t = { prepare: 0, timed: 0, between: 0, total: 0 };
    caseTimes.set(name, t);
  }
  return t;
}
const secs = (x: number) => `${x.toFixed(0)} s`;
function caseTimeText(name: string): string {
  const t = caseTime(name);
  return `${secs(t.total)} (inputs ${secs(t.prepare)}, timed ${secs(t.timed)}, ` +
    `checks and syncs ${secs(t.between)})`;
}

async function runContenders(c: BenchCase, contenders: Contender[]): Promise<Outcome[]> {
  // Let the writeback of freshly made inputs finish before anything is timed.
  await new Deno.Command("sync").output();
  const outcomes: Outcome[] = contenders.map((k) => ({
    name: k.name,
    display: displayPipeline(k.pipeline, shorten),
    samples: [],
    mainStage: k.pipeline.mainStage ?? 0,
    problem: k.unavailable,
    cacheGrowth: [],
  }));
  // The output of each command's first timed run is checked (before its `after`), untimed.
  const checked = contenders.map((k) => k.verify === undefined);
  const once = async (i: number) => {
    const k = contenders[i], o = outcomes[i];
    if (o.problem !== undefined) return;
    if (opts.cold || c.cold) await dropCaches();
    const time = caseTime(c.name);
    let t = performance.now();
    const lap = () => {
      const now = performance.now(), dt = (now - t) / 1000;
      t = now;
      return dt;
    };
    try {
      const [s, growth] = c.watchCache
        ? await watchingCache(c.watchCache(), () => measure(k.pipeline, scratch))
        : [await measure(k.pipeline, scratch), NaN];
      time.timed += lap();
      const wrong = checked[i] ? null : await k.verify!();
      checked[i] = true;
      if (wrong !== null) {
        // No time for a wrong output: the row shows the problem, its goals say n/a.
        o.problem = `WRONG OUTPUT: ${wrong}`;
        o.samples.length = o.cacheGrowth.length = 0;
      } else {
        o.samples.push(s);
        o.cacheGrowth.push(growth);
      }
    } catch (err) {
      if (!(err instanceof CommandFailed)) throw err;
      o.problem = `failed: ${err.message}`;
    } finally {
      await k.after?.();
      // Start every run with nothing dirty: no writeback of one run slows the next.
      await new Deno.Command("sync").output();
      time.between += lap();
    }
  };
  const rounds = caseRounds(c);
  for (let r = 0; r < rounds; r++) {
    // No round left for anyone (every contender timed fewer times than the case's rounds).
    if (contenders.every((k, i) => outcomes[i].problem !== undefined || r >= (k.runs ?? rounds))) {
      break;
    }
    log(`case ${c.name}: round ${r + 1}/${rounds}`);
    // Alternate, and rotate who goes first so that no one always follows the same peer.
    for (let j = 0; j < contenders.length; j++) {
      const k = (r + j) % contenders.length;
      if (r < (contenders[k].runs ?? rounds)) await once(k);
    }
    const times = outcomes.filter((o) => o.samples.length > r)
      .map((o) => `${o.name} ${o.samples[r].seconds.toFixed(2)} s`);
    if (times.length) log(`  ${times.join(", ")}`);
  }
  return outcomes;
}

// ---- the report ----

const seconds = (o: Outcome | undefined) => median(o?.samples.map((s) => s.seconds) ?? []);
const rssMiB = (o: Outcome) => median(o.samples.map((s) => s.rssKiB[o.mainStage])) / 1024;
/** CPU seconds of the whole pipeline (every stage), median of the runs. */
const cpu = (o: Outcome) => median(o.samples.map((s) => s.cpuSeconds.reduce((a, b) => a + b, 0)));
/** CPU seconds of the contender's own process (its main stage), median of the runs. */
const cpuMain = (o: Outcome) => median(o.samples.map((s) => s.cpuSeconds[o.mainStage]));
const fmt = (x: number, digits = 2) => Number.isNaN(x) ? "—" : x.toFixed(digits);
/** Text for a Markdown table cell: `|` must be escaped, even in code spans. */
const cell = (s: string) => s.replaceAll("|", "\\|");

/** The timed runs of case `c`: --runs, capped by the case's `runs`, raised to its `minRuns`. */
function caseRounds(c: BenchCase): number {
  const rounds = Math.min(runs, c.runs ?? runs);
  return runs > 1 ? Math.max(rounds, c.minRuns ?? 0) : rounds;
}

function caseTable(c: BenchCase, outcomes: Outcome[]): string {
  const ref = seconds(outcomes.find((o) => o.name === c.reference));
  const cache = c.watchCache !== undefined;
  const rounds = caseRounds(c);
  const rows = outcomes.map((o) => {
    if (o.problem !== undefined && o.samples.length === 0) {
      return `| ${cell(o.name)} | \`${cell(o.display)}\` | ${cell(o.problem)} | | | | |` +
        (cache ? " |" : "");
    }
    const t = o.samples.map((s) => s.seconds);
    // A command timed once (Contender.runs): say so.
    const range = t.length === 1 && rounds > 1
      ? "(timed once)"
      : `${fmt(Math.min(...t))}–${fmt(Math.max(...t))}`;
    const ratio = fmt(seconds(o) / ref);
    return `| ${cell(o.name)} | \`${cell(o.display)}\` | ${
      fmt(seconds(o))
    } | ${range} | ${ratio} | ${fmt(cpu(o))} | ${fmt(rssMiB(o), 0)} |` +
      (cache ? ` ${fmt(cacheGrowthMiB(o), 0)} |` : "");
  });
  return [
    `### ${c.name}: ${c.title}`,
    "",
    `| command | pipeline | median s | min–max s | × ${c.reference} | CPU s | peak RSS MiB |` +
    (cache ? " peak page cache MiB |" : ""),
    "|---|---|--:|--:|--:|--:|--:|" + (cache ? "--:|" : ""),
    ...rows,
    ...(c.notes ?? []).map((n) => `\n${n}`),
    "",
  ].join("\n");
}

/**
 * A goal: `m(a) / m(b)` in case `case` must satisfy `ok`, where m is the median wall
 * time (`metric` "cpu": the CPU seconds of the contender's own process), less the
 * median time of the `startup` contenders when given (start-up not counted).
 */
export interface Goal {
  text: string;
  case: string;
  a: string;
  b: string;
  target: string;
  ok: (ratio: number) => boolean;
  metric?: "seconds" | "cpu";
  startup?: { a?: string; b?: string };
}

/** A limit: a value measured for contender `a` of case `case` (peak cache growth, RSS). */
interface Limit {
  text: string;
  case: string;
  a: string;
  unit: string;
  max: number;
  value: (o: Outcome) => number;
}

const atMost = (x: number) => ({ target: `≤ ${x}`, ok: (r: number) => r <= x });
const below = (x: number) => ({ target: `< ${x}`, ok: (r: number) => r < x });
const atLeast = (x: number) => ({ target: `≥ ${x}`, ok: (r: number) => r >= x });
const above = (x: number) => ({ target: `> ${x}`, ok: (r: number) => r > x });
const goal = (
  text: string,
  c: string,
  a: string,
  b: string,
  t: Pick<Goal, "target" | "ok">,
  extra: Pick<Goal, "metric" | "startup"> = {},
): Goal => ({ text, case: c, a, b, ...t, ...extra });

const GOALS: Goal[] = [
  goal(
    "export → pipe within 1.15 × the bare Deno loop",
    "export-pipe",
    DISKSTREAM,
    "bare Deno loop",
    atMost(1.15),
  ),
  goal("export → pipe faster than `cat | cat`", "export-pipe", DISKSTREAM, "cat | cat", below(1)),
  goal(`export → pipe faster than ${XO}`, "export-pipe", DISKSTREAM, XO, below(1)),
  goal(
    "export → file faster than `qemu-img convert -O qcow2`",
    "export-file",
    DISKSTREAM,
    "qemu-img convert",
    below(1),
  ),
  goal(
    "(extra) export → file faster than `qemu-img convert -t writeback` (the same durability: " +
      "plain `convert` does not sync its output)",
    "export-file",
    DISKSTREAM,
    QEMU_WB,
    below(1),
  ),
  goal(`export → file faster than ${XO}`, "export-file", DISKSTREAM, XO, below(1)),
  goal(
    "sparse export at most 3 × its data as a dense file",
    "sparse",
    "sparse",
    "dense",
    atMost(3),
  ),
  goal(
    "import through a pipe within 1.3 × `cat > file`",
    "import",
    DISKSTREAM,
    "cat > file",
    atMost(1.3),
  ),
  goal(
    "(extra) import within 1.3 × `cat > file + fdatasync` (the same durability)",
    "import",
    DISKSTREAM,
    "cat > file + fdatasync",
    atMost(1.3),
  ),
  goal(`import faster than ${XO} (stream)`, "import", DISKSTREAM, `${XO} (stream)`, below(1)),
  goal(
    `import faster than ${XO} (file, random access)`,
    "import",
    DISKSTREAM,
    `${XO} (file, random access)`,
    below(1),
  ),
  goal(
    "import of a snapshotted+rewritten qcow2 through a pipe within 1.5 × the converted image",
    "import-snapshot",
    "pipe, snapshotted",
    "pipe, converted",
    atMost(1.5),
  ),
  goal(
    "import of a snapshotted+rewritten qcow2 from a file within 1.1 × the converted image",
    "import-snapshot",
    "file, snapshotted",
    "file, converted",
    atMost(1.1),
  ),
  goal(
    "headers ≥ 5 × faster than `qemu-img map --output=json` (ratio = map / headers)",
    "headers",
    "qemu-img map",
    DISKSTREAM,
    atLeast(5),
  ),
  goal(`headers faster than ${XO} (ratio = xo / headers)`, "headers", XO, DISKSTREAM, above(1)),
  // Issue 13: the floors.
  goal(
    "export → pipe ≤ 1.1 × `pv -q`, start-up not counted (diskstream − `--version`)",
    "export-pipe",
    DISKSTREAM,
    PV,
    atMost(1.1),
    { startup: { a: VERSION } },
  ),
  goal(
    "`export --diff` ≤ 1.5 × reading both disks (`cat base new`)",
    "hint-diff",
    "--diff",
    CAT_BOTH,
    atMost(1.5),
  ),
  goal(
    "(extra) `export --diff` ≤ 1.5 × `cat base new`, start-up not counted (diskstream − " +
      "`--version`): what the comparison itself costs",
    "hint-diff",
    "--diff",
    CAT_BOTH,
    atMost(1.5),
    { startup: { a: VERSION } },
  ),
  goal(
    "import CPU ≤ 1.5 × `qemu-img convert -t writeback` CPU (diskstream's own process)",
    "import",
    DISKSTREAM,
    QEMU_WB,
    atMost(1.5),
    { metric: "cpu" },
  ),
  goal(
    "compressed import (deflate) through a pipe ≤ 1.0 × `qemu-img convert -t writeback`",
    "compressed",
    `${DISKSTREAM} deflate`,
    `${QEMU_WB} deflate`,
    atMost(1),
  ),
  goal(
    "compressed import (zstd) through a pipe ≤ 1.0 × `qemu-img convert -t writeback`",
    "compressed",
    `${DISKSTREAM} zstd`,
    `${QEMU_WB} zstd`,
    atMost(1),
  ),
  goal(
    "cold export --direct ≤ 1.1 × buffered (loop device)",
    "direct",
    "export --direct",
    "export",
    atMost(1.1),
  ),
  goal(
    "cold import --direct ≤ 1.1 × buffered (loop device)",
    "direct",
    "import --direct",
    "import",
    atMost(1.1),
  ),
  goal(
    "8 concurrent exports → pipes ≤ 1.2 × 8 concurrent `pv -q`, start-up not counted",
    "streams",
    STREAMS_DS,
    STREAMS_PV,
    atMost(1.2),
    { startup: { a: STREAMS_VERSION } },
  ),
  goal(
    "(info) start-up: the bundled file's `--version` / the source entry's",
    "startup",
    "--version (bundle)",
    "--version (cli.ts)",
    { target: "—", ok: () => true },
  ),
  goal(
    "(info) 1 MiB export: the bundled file / the source entry",
    "startup",
    "export 1 MiB (bundle)",
    "export 1 MiB (cli.ts)",
    { target: "—", ok: () => true },
  ),
  goal(
    "export -f tar with a 5% hint within 1.2 × export -f qcow2 with the same hint",
    "tar-hint",
    "tar --allocation",
    "qcow2 --allocation",
    atMost(1.2),
  ),
  goal(
    "export -f tar with a 5% hint ≥ 10 × faster than without it (ratio = plain / hinted)",
    "tar-hint",
    "tar",
    "tar --allocation",
    atLeast(10),
  ),
  goal(
    "(cold) export -f tar with a 5% hint ≥ 10 × faster than without it, page cache dropped " +
      "(ratio = plain / hinted)",
    "tar-hint-cold",
    "tar",
    "tar --allocation",
    atLeast(10),
  ),
  goal(
    "import -f tar within 1.3 × import of the qcow2",
    "tar-import",
    "import -f tar",
    "import qcow2",
    atMost(1.3),
  ),
  goal(
    "server export (curl) within 1.3 × curl of the same bytes as a static file from nginx",
    "http-get",
    DISKSTREAM,
    "nginx static file",
    atMost(1.3),
  ),
  goal(
    "export -o http://nginx (PUT) within 1.2 × `curl -T` of the finished image",
    "http-put",
    DISKSTREAM,
    "curl -T",
    atMost(1.2),
  ),
  ...nbdGoals(goal),
];

const cacheGrowthMiB = (o: Outcome) => Math.max(...o.cacheGrowth);
const LIMITS: Limit[] = [
  {
    text: `page cache use while a cold ${gib(sizes.full)} disk is exported with --direct ` +
      "(worst run)",
    case: "direct",
    a: "export --direct",
    unit: "MiB",
    max: 64,
    value: cacheGrowthMiB,
  },
  {
    text: `page cache use while ${gib(sizes.full)} are imported with --direct (worst run)`,
    case: "direct",
    a: "import --direct",
    unit: "MiB",
    max: 64,
    value: cacheGrowthMiB,
  },
  {
    text: "peak RSS of each of 8 concurrent exports (worst process)",
    case: "streams",
    a: STREAMS_DS,
    unit: "MiB",
    max: 100,
    value: () => streamsRssMiB,
  },
];

function limitRow(l: Limit, results: Map<string, Outcome[]>): string {
  const o = results.get(l.case)?.find((x) => x.name === l.a);
  const text = cell(l.text);
  const why = o === undefined ? "not run" : o.problem ?? (o.samples.length ? null : "no runs");
  if (why !== null) return `| ${text} | < ${l.max} ${l.unit} | — | n/a (${cell(why)}) |`;
  const v = l.value(o!);
  if (Number.isNaN(v)) return `| ${text} | < ${l.max} ${l.unit} | — | n/a |`;
  return `| ${text} | < ${l.max} ${l.unit} | ${fmt(v, 0)} ${l.unit} | ${
    v < l.max ? "PASS" : "FAIL"
  } |`;
}

function goalRow(g: Goal, results: Map<string, Outcome[]>): string {
  const outcomes = results.get(g.case);
  const text = cell(g.text);
  if (outcomes === undefined) return `| ${text} | ${g.target} | not run | — |`;
  const names = [g.a, g.b, g.startup?.a, g.startup?.b].filter((n) => n !== undefined);
  const found = new Map(names.map((n) => [n, outcomes.find((o) => o.name === n)]));
  for (const [name, o] of found) {
    const why = o === undefined ? "not run" : o.problem ?? (o.samples.length ? null : "no runs");
    if (why !== null) return `| ${text} | ${g.target} | — | n/a (${cell(`${name}: ${why}`)}) |`;
  }
  const m = (n: string | undefined) =>
    n === undefined ? 0 : g.metric === "cpu" ? cpuMain(found.get(n)!) : seconds(found.get(n));
  const ratio = (m(g.a) - m(g.startup?.a)) / (m(g.b) - m(g.startup?.b));
  return `| ${text} | ${g.target} | ${fmt(ratio)} | ${g.ok(ratio) ? "PASS" : "FAIL"} |`;
}

function rssRow(results: Map<string, Outcome[]>): string {
  let worst: { mib: number; where: string } | null = null;
  for (const [name, outcomes] of results) {
    for (const o of outcomes) {
      const isDs = o.display.includes("cli.ts");
      if (!isDs || o.samples.length === 0) continue;
      const m = Math.max(...o.samples.map((s) => s.rssKiB[o.mainStage])) / 1024;
      if (worst === null || m > worst.mib) worst = { mib: m, where: `${name}/${o.name}` };
    }
  }
  const goal = `diskstream peak RSS under ${RSS_LIMIT_MIB} MiB in every case (worst run)`;
  if (!HAVE_GNU_TIME) return `| ${goal} | < ${RSS_LIMIT_MIB} | — | n/a (no GNU time) |`;
  if (worst === null || Number.isNaN(worst.mib)) return `| ${goal} | < 200 | — | n/a |`;
  return `| ${goal} | < ${RSS_LIMIT_MIB} MiB | ${fmt(worst.mib, 0)} MiB (${worst.where}) | ${
    worst.mib < RSS_LIMIT_MIB ? "PASS" : "FAIL"
  } |`;
}

async function machine(): Promise<string[]> {
  const cpu = (await Deno.readTextFile("/proc/cpuinfo").catch(() => ""))
    .match(/^model name\s*:\s*(.*)$/m)?.[1] ?? "unknown CPU";
  const mem = Deno.systemMemoryInfo().total / (1024 * MiB);
  const git = await commandOutput("git", ["-C", CLI_DIR, "describe", "--always", "--dirty"]);
  const qemuVersion = (await commandOutput("qemu-img", ["--version"]))?.split("\n")[0];
  const fs = (await commandOutput("df", ["--output=fstype", work]))?.split("\n").at(-1);
  const nodeVersion = await commandOutput("node", ["--version"]);
  return [
    `- date: ${new Date().toISOString()}`,
    `- machine: ${navigator.hardwareConcurrency} CPUs (${cpu}), ${fmt(mem, 1)} GiB RAM, ` +
    `Linux ${Deno.osRelease()}, work dir on ${fs ?? "?"}`,
    `- software: diskstream ${git ?? (opts.cli ? CLI : "?")}, deno ${Deno.version.deno}, ${
      qemuVersion ?? "no qemu-img"
    }, ` +
    `node ${nodeVersion ?? "missing"}, ${XO}@${XO_VERSION}`,
    `- command: \`deno task bench${Deno.args.length ? " " + Deno.args.join(" ") : ""}\``,
    `- ${runs} timed runs per command (medians), commands alternating in rotating order; ` +
    `a peer more than 2 × away from every goal's bound it is in, and nbd-latency's 1 ` +
    `connection (its time is the injected delay's), are timed once (\`(timed once)\` in ` +
    `the min–max column); the output of a command's first timed run is checked ` +
    `after it, untimed (XXH128 of a raw output against its source's, \`qemu-img compare\` ` +
    `of an image, checksums); the inputs are in the page cache (just made or read) ` +
    `unless the case drops it; times are ` +
    `wall-clock medians including process start-up; CPU s is user + system time of all ` +
    `the pipeline's processes; peak RSS is GNU time's %M of the process that matters ` +
    `(diskstream's own process in a pipeline), median of the runs.`,
    `- page cache: ${coldState}` +
    quiet.notes.map((n) => `; ${n}`).join(""),
  ];
}

// ---- main ----

if (opts.help) {
  console.log(
    `usage: deno task bench [--runs N] [--quick] [--case NAME]... [--dir DIR] [--cold] [--cli PATH]
  --runs N     timed runs per command (default 3)
  --quick      small inputs, for a smoke run
  --case NAME  run only this case (repeatable): ${caseNames().join(", ")}
  --dir DIR    build the inputs under DIR (default: the system temp dir)
  --cold       drop the page cache before every run (needs root)
  --cli PATH   the diskstream to measure: cli.ts of another checkout (default: this one)`,
  );
  Deno.exit(0);
}

// The cases that drop the page cache run last: the others find their inputs cached.
const selected = allCases().filter((c) => !opts.case || opts.case.includes(c.name))
  .sort((a, b) => Number(a.cold ?? false) - Number(b.cold ?? false));
const unknown = (opts.case ?? []).filter((n) => !caseNames().includes(n));
if (unknown.length) {
  console.error(`bench: unknown case ${unknown.join(", ")}; cases: ${caseNames().join(", ")}`);
  cleanupAndExit(2);
}

const results = new Map<string, Outcome[]>();
let exitCode = 0;
try {
  if (opts.cold) {
    coldState = await dropCaches()
      ? "cold: dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every run"
      : "warm: --cold was asked for but dropping the page cache is not permitted here";
  } else {
    coldState = "warm: inputs are in the page cache (just made, or read by an earlier run); " +
      ((await dropCaches())
        ? "run with --cold to drop the cache before every run (works here)"
        : "dropping the cache is not permitted here");
  }
  for (const c of selected) {
    const t = performance.now();
    try {
      results.set(c.name, await runCase(c));
    } finally {
      await c.cleanup?.();
      caseTime(c.name).total = (performance.now() - t) / 1000;
      log(`case ${c.name}: done in ${caseTimeText(c.name)}`);
    }
  }
  const minutes = (performance.now() - started) / 60000;
  const report = [
    `## Benchmark`,
    "",
    ...(await machine()),
    `- total bench time: ${fmt(minutes, 1)} min; per case: ` +
    selected.map((c) => `${c.name} ${caseTimeText(c.name)}`).join("; "),
    "",
    ...selected.map((c) => caseTable(c, results.get(c.name)!)),
    `### Goals`,
    "",
    "| goal | target | measured ratio | result |",
    "|---|--:|--:|---|",
    ...GOALS.filter((g) => results.has(g.case)).map((g) => goalRow(g, results)),
    ...LIMITS.filter((l) => results.has(l.case)).map((l) => limitRow(l, results)),
    rssRow(results),
    ...httpGoalRows(results),
    "",
  ];
  console.log(report.join("\n"));
} catch (err) {
  console.error(`bench: ${(err as Error).stack ?? err}`);
  exitCode = 1;
} finally {
  quiet.resume();
  await Deno.remove(work, { recursive: true }).catch(() => {});
  if (memoryWork) await Deno.remove(memoryWork, { recursive: true }).catch(() => {});
}
Deno.exit(exitCode);
