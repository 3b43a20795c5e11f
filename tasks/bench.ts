/**
 * `deno task bench`: diskstream against its peers, in one run, alternating.
 *
 * Builds its inputs in a temp dir (sparse where possible; removed afterwards, also on
 * Ctrl-C or failure), runs every case for diskstream and the peers in rotating order
 * after one untimed warm-up (which also checks the outputs), and prints a Markdown
 * report: medians, ratios, peak RSS, and the goals of issue 5 with PASS/FAIL.
 *
 *   deno task bench [--runs N] [--quick] [--case NAME]... [--dir DIR] [--cold] [--cli PATH]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { FULL_SIZES, Inputs, type InputSizes, QUICK_SIZES } from "./bench_inputs.ts";
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
} from "./bench_measure.ts";
import { imagesEqual } from "../tests/helpers.ts";
import { httpCases, httpGoalRows } from "./bench_http.ts";

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

/** What happened to one contender of a case. */
interface Outcome {
  name: string;
  display: string;
  samples: Sample[];
  mainStage: number;
  problem?: string;
}

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    runs: { type: "string", default: "5" },
    quick: { type: "boolean", default: false },
    case: { type: "string", multiple: true },
    dir: { type: "string" },
    cli: { type: "string" },
    cold: { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
});

if (opts.help) {
  console.log(
    `usage: deno task bench [--runs N] [--quick] [--case NAME]... [--dir DIR] [--cold] [--cli PATH]
  --runs N     timed runs per command (default 5; --quick: 3)
  --quick      small inputs, for a smoke run
  --case NAME  run only this case (repeatable): ${caseNames().join(", ")}
  --dir DIR    build the inputs under DIR (default: the system temp dir)
  --cold       drop the page cache before every run (needs root)
  --cli PATH   the diskstream to measure: cli.ts of another checkout (default: this one)`,
  );
  Deno.exit(0);
}

const CLI = opts.cli ?? `${ROOT}/cli.ts`;
const CLI_DIR = CLI.replace(/\/[^/]*$/, "") || ".";
const DS = [DENO, "run", "-A", `--config=${CLI_DIR}/deno.json`, CLI];
const sizes: InputSizes = opts.quick ? QUICK_SIZES : FULL_SIZES;
const runs = Number(opts.quick && opts.runs === "5" ? "3" : opts.runs);
if (!Number.isInteger(runs) || runs < 1) {
  console.error(`bench: --runs needs a positive integer, got '${opts.runs}'`);
  Deno.exit(2);
}
const log = (s: string) => console.error(s);
const work = await Deno.makeTempDir({ prefix: "diskstream-bench-", dir: opts.dir });
const scratch = `${work}/scratch`;
await Deno.mkdir(scratch);
const inputs = new Inputs(work, sizes, log);

function cleanupAndExit(code: number): never {
  killCurrent();
  try {
    Deno.removeSync(work, { recursive: true });
  } catch {
    // best effort
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
const sameAs = (source: string, out: string, fOut?: string) => async () =>
  await imagesEqual(source, out, "raw", fOut) ? null : `${out} differs from ${source}`;

function allCases(): BenchCase[] {
  const toPipe = (...stages: string[][]): Pipeline => ({ stages: [...stages, ["cat"]] });
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
          { name: "bare Deno loop", pipeline: toPipe([...COPY_LOOP, raw]) },
          await xo((node) => toPipe([...node, "export", raw, "-"])),
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
        return [
          {
            name: DISKSTREAM,
            pipeline: { stages: [[...DS, "export", raw, "-o", out]] },
            unavailable: await dsMissing("export"),
            ...common,
          },
          {
            name: "qemu-img convert",
            pipeline: { stages: [["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out]] },
            ...common,
          },
          await xo((node) => ({ stages: [[...node, "export", raw, out]] }), common),
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
            { ...common, name: `${XO} (file, random access)` },
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
        const [snap, flat, want] = [
          await inputs.snapshotQcow2(),
          await inputs.snapshotFlat(),
          await inputs.diffBase(),
        ];
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
          await xo((node) => ({ stages: [[...node, "headers", image]] })),
        ];
      },
    },
    ...httpCases({ work, ds: DS, fullRaw: () => inputs.fullRaw(), sizes, log }),
  ];
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

async function runCase(c: BenchCase): Promise<Outcome[]> {
  log(`case ${c.name}: preparing`);
  const contenders = await c.contenders();
  // Let the writeback of freshly made inputs finish before anything is timed.
  await new Deno.Command("sync").output();
  const outcomes: Outcome[] = contenders.map((k) => ({
    name: k.name,
    display: displayPipeline(k.pipeline, shorten),
    samples: [],
    mainStage: k.pipeline.mainStage ?? 0,
    problem: k.unavailable,
  }));
  const once = async (i: number, check: boolean) => {
    const k = contenders[i], o = outcomes[i];
    if (o.problem !== undefined) return;
    if (opts.cold) await dropCaches();
    try {
      const s = await measure(k.pipeline, scratch);
      if (check && k.verify) {
        const wrong = await k.verify();
        if (wrong !== null) o.problem = `WRONG OUTPUT: ${wrong}`;
      }
      if (!check) o.samples.push(s);
    } catch (err) {
      if (!(err instanceof CommandFailed)) throw err;
      o.problem = `failed: ${err.message}`;
    } finally {
      await k.after?.();
      // Start every run with nothing dirty: no writeback of one run slows the next.
      await new Deno.Command("sync").output();
    }
  };
  log(`case ${c.name}: warm-up and output check`);
  for (let i = 0; i < contenders.length; i++) await once(i, true);
  for (let r = 0; r < runs; r++) {
    log(`case ${c.name}: round ${r + 1}/${runs}`);
    // Alternate, and rotate who goes first so that no one always follows the same peer.
    for (let j = 0; j < contenders.length; j++) await once((r + j) % contenders.length, false);
  }
  return outcomes;
}

// ---- the report ----

const seconds = (o: Outcome | undefined) => median(o?.samples.map((s) => s.seconds) ?? []);
const rssMiB = (o: Outcome) => median(o.samples.map((s) => s.rssKiB[o.mainStage])) / 1024;
/** CPU seconds of the whole pipeline (every stage), median of the runs. */
const cpu = (o: Outcome) => median(o.samples.map((s) => s.cpuSeconds.reduce((a, b) => a + b, 0)));
const fmt = (x: number, digits = 2) => Number.isNaN(x) ? "—" : x.toFixed(digits);
/** Text for a Markdown table cell: `|` must be escaped, even in code spans. */
const cell = (s: string) => s.replaceAll("|", "\\|");

function caseTable(c: BenchCase, outcomes: Outcome[]): string {
  const ref = seconds(outcomes.find((o) => o.name === c.reference));
  const rows = outcomes.map((o) => {
    if (o.problem !== undefined && o.samples.length === 0) {
      return `| ${cell(o.name)} | \`${cell(o.display)}\` | ${cell(o.problem)} | | | | |`;
    }
    const t = o.samples.map((s) => s.seconds);
    const range = `${fmt(Math.min(...t))}–${fmt(Math.max(...t))}`;
    const ratio = fmt(seconds(o) / ref);
    return `| ${cell(o.name)} | \`${cell(o.display)}\` | ${
      fmt(seconds(o))
    } | ${range} | ${ratio} | ${fmt(cpu(o))} | ${fmt(rssMiB(o), 0)} |`;
  });
  return [
    `### ${c.name}: ${c.title}`,
    "",
    `| command | pipeline | median s | min–max s | × ${c.reference} | CPU s | peak RSS MiB |`,
    "|---|---|--:|--:|--:|--:|--:|",
    ...rows,
    ...(c.notes ?? []).map((n) => `\n${n}`),
    "",
  ].join("\n");
}

/** A goal: `time(a) / time(b)` in case `case` must satisfy `ok`. */
interface Goal {
  text: string;
  case: string;
  a: string;
  b: string;
  target: string;
  ok: (ratio: number) => boolean;
}

const atMost = (x: number) => ({ target: `≤ ${x}`, ok: (r: number) => r <= x });
const below = (x: number) => ({ target: `< ${x}`, ok: (r: number) => r < x });
const atLeast = (x: number) => ({ target: `≥ ${x}`, ok: (r: number) => r >= x });
const above = (x: number) => ({ target: `> ${x}`, ok: (r: number) => r > x });
const goal = (text: string, c: string, a: string, b: string, t: Pick<Goal, "target" | "ok">) => ({
  text,
  case: c,
  a,
  b,
  ...t,
});

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
];

function goalRow(g: Goal, results: Map<string, Outcome[]>): string {
  const outcomes = results.get(g.case);
  const text = cell(g.text);
  if (outcomes === undefined) return `| ${text} | ${g.target} | not run | — |`;
  const [a, b] = [g.a, g.b].map((n) => outcomes.find((o) => o.name === n));
  for (const [name, o] of [[g.a, a], [g.b, b]] as const) {
    const why = o === undefined ? "not run" : o.problem ?? (o.samples.length ? null : "no runs");
    if (why !== null) return `| ${text} | ${g.target} | — | n/a (${cell(`${name}: ${why}`)}) |`;
  }
  const ratio = seconds(a) / seconds(b);
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
    `- ${runs} timed runs per command after one untimed warm-up (which also checks the ` +
    `output with \`qemu-img compare\`), commands alternating in rotating order; times are ` +
    `wall-clock medians including process start-up; CPU s is user + system time of all ` +
    `the pipeline's processes; peak RSS is GNU time's %M of the process that matters ` +
    `(diskstream's own process in a pipeline), median of the runs.`,
    `- page cache: ${coldState}`,
  ];
}

// ---- main ----

const selected = allCases().filter((c) => !opts.case || opts.case.includes(c.name));
const unknown = (opts.case ?? []).filter((n) => !caseNames().includes(n));
if (unknown.length) {
  console.error(`bench: unknown case ${unknown.join(", ")}; cases: ${caseNames().join(", ")}`);
  cleanupAndExit(2);
}

const started = performance.now();
const results = new Map<string, Outcome[]>();
let exitCode = 0;
try {
  if (opts.cold) {
    coldState = await dropCaches()
      ? "cold: dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every run"
      : "warm: --cold was asked for but dropping the page cache is not permitted here";
  } else {
    coldState = "warm: inputs are in the page cache (the warm-up run reads them); " +
      ((await dropCaches())
        ? "run with --cold to drop the cache before every run (works here)"
        : "dropping the cache is not permitted here");
  }
  for (const c of selected) {
    try {
      results.set(c.name, await runCase(c));
    } finally {
      await c.cleanup?.();
    }
  }
  const minutes = (performance.now() - started) / 60000;
  const report = [
    `## Benchmark`,
    "",
    ...(await machine()),
    `- total bench time: ${fmt(minutes, 1)} min`,
    "",
    ...selected.map((c) => caseTable(c, results.get(c.name)!)),
    `### Goals`,
    "",
    "| goal | target | measured ratio | result |",
    "|---|--:|--:|---|",
    ...GOALS.filter((g) => results.has(g.case)).map((g) => goalRow(g, results)),
    rssRow(results),
    ...httpGoalRows(results),
    "",
  ];
  console.log(report.join("\n"));
} catch (err) {
  console.error(`bench: ${(err as Error).stack ?? err}`);
  exitCode = 1;
} finally {
  await Deno.remove(work, { recursive: true }).catch(() => {});
}
Deno.exit(exitCode);
