/**
 * Benchmark measurement: runs a pipeline of commands through bash, times it, and
 * reads each stage's peak RSS and CPU time from GNU time (`/usr/bin/time -f '%M %U %S'`).
 *
 * @module
 */

/** A command line to measure: the stages of a shell pipeline and its redirections. */
export interface Pipeline {
  /** The stages, each an argv, joined with `|`. */
  stages: string[][];
  /** A file redirected to the first stage's stdin. */
  stdin?: string;
  /** A file the last stage's stdout is redirected to (default /dev/null). */
  stdout?: string;
  /** The stage whose peak RSS is reported (default 0). */
  mainStage?: number;
}

/** One command of a case. */
export interface Contender {
  name: string;
  pipeline: Pipeline;
  /** Why it cannot run here, if it cannot. */
  unavailable?: string;
  /** Removes what a run wrote (untimed). */
  after?: () => Promise<void>;
  /**
   * Checks the output of the first timed run (untimed, before `after`); returns what is
   * wrong, or null. A wrong output drops the contender's times: its row shows the problem.
   */
  verify?: () => Promise<string | null>;
  /**
   * Timed runs at most (default: the case's): for a slow peer whose time is far from
   * any goal's bound, or a command whose time an injected delay sets, so that one run
   * says enough.
   */
  runs?: number;
}

/** A benchmark case: its contenders and the one ratios are computed against. */
export interface BenchCase {
  name: string;
  title: string;
  reference: string;
  contenders: () => Promise<Contender[]>;
  /** Peers that do not take part, and why (and facts a case adds after its runs). */
  notes?: string[];
  /** Stops what `contenders` started (servers, loop devices), after the case. */
  cleanup?: () => Promise<void>;
  /** Timed runs (default: --runs), for the long cases. */
  runs?: number;
  /** At least this many timed runs when --runs is more than 1 (a noisy device). */
  minRuns?: number;
  /** Drop the page cache before every run of this case (needs root; else not run). */
  cold?: boolean;
  /** Record the peak page cache use of these files or devices during each run. */
  watchCache?: () => string[];
}

/**
 * One timed run: wall seconds, and per stage the peak RSS (KiB) and CPU seconds (user +
 * system), NaN when unknown.
 */
export interface Sample {
  seconds: number;
  rssKiB: number[];
  cpuSeconds: number[];
}

const GNU_TIME = "/usr/bin/time";

/** True when GNU time is there to measure peak RSS. */
export const HAVE_GNU_TIME = await (async () => {
  try {
    const r = await new Deno.Command(GNU_TIME, {
      args: ["-f", "%M %U %S", "true"],
      stdout: "null",
      stderr: "piped",
    }).output();
    return r.success && /^\d+ [\d.]+ [\d.]+\s*$/.test(new TextDecoder().decode(r.stderr));
  } catch {
    return false;
  }
})();

/** Quotes an argument for bash. */
export function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** The bash text of a pipeline, one GNU time per stage writing to `rssFile(i)`. */
export function pipelineScript(p: Pipeline, rssFile?: (stage: number) => string): string {
  const stages = p.stages.map((argv, i) => {
    const cmd = argv.map(shellQuote).join(" ");
    return rssFile ? `${GNU_TIME} -f '%M %U %S' -o ${shellQuote(rssFile(i))} ${cmd}` : cmd;
  });
  if (p.stdin !== undefined) stages[0] += ` < ${shellQuote(p.stdin)}`;
  stages[stages.length - 1] += ` > ${shellQuote(p.stdout ?? "/dev/null")}`;
  return stages.join(" | ");
}

/** The pipeline as a person would type it (no timing wrappers), for the report. */
export function displayPipeline(p: Pipeline, shorten: (script: string) => string): string {
  return shorten(pipelineScript(p));
}

/** The child being run, so that an interrupt can stop it. */
let current: Deno.ChildProcess | null = null;

/** True when util-linux's setsid can put each pipeline in a process group of its own. */
const HAVE_SETSID = await (async () => {
  try {
    return (await new Deno.Command("setsid", { args: ["true"] }).output()).success;
  } catch {
    return false;
  }
})();

/** Kills the pipeline being measured, all its processes, if any (for Ctrl-C). */
export function killCurrent(): void {
  if (current === null) return;
  try {
    if (HAVE_SETSID) Deno.kill(-current.pid, "SIGKILL");
    else current.kill("SIGKILL");
  } catch {
    // already gone
  }
}

/** Thrown when a measured command exits non-zero. */
export class CommandFailed extends Error {}

/**
 * Runs `p` once under bash with pipefail and returns its wall time and per-stage peak
 * RSS. `scratch` is a directory for GNU time's output files.
 */
export async function measure(p: Pipeline, scratch: string): Promise<Sample> {
  const rssFile = (i: number) => `${scratch}/rss.${i}`;
  const script = "set -o pipefail; " + pipelineScript(p, HAVE_GNU_TIME ? rssFile : undefined);
  const start = performance.now();
  const bash = ["bash", "-c", script];
  const argv = HAVE_SETSID ? ["setsid", ...bash] : bash;
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  current = child;
  const out = await child.output();
  const seconds = (performance.now() - start) / 1000;
  current = null;
  const stderr = new TextDecoder().decode(out.stderr);
  if (!out.success) {
    const lines = stderr.split("\n").filter((l) => l.trim() && !/^Command exited with/.test(l));
    // An error line ("Error: ...", "diskstream: ...") says more than a stack trace's tail.
    const said = lines.find((l) => /^(\w*Error\b|diskstream:)/.test(l.trim())) ?? lines.at(-1);
    throw new CommandFailed(`exit ${out.code}: ${said?.trim() ?? "(no message)"}`);
  }
  const stats = await Promise.all(p.stages.map(async (_, i) => {
    if (!HAVE_GNU_TIME) return [NaN, NaN];
    try {
      const last = (await Deno.readTextFile(rssFile(i))).trim().split("\n").at(-1)!;
      const [rss, user, sys] = last.split(" ").map(Number);
      return [rss, user + sys];
    } catch {
      return [NaN, NaN];
    }
  }));
  return { seconds, rssKiB: stats.map((s) => s[0]), cpuSeconds: stats.map((s) => s[1]) };
}

/** The median of `xs` (NaN for an empty list). */
export function median(xs: number[]): number {
  const s = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Runs a command and returns its trimmed stdout, or null if it cannot run or fails. */
export async function commandOutput(cmd: string, args: string[]): Promise<string | null> {
  try {
    const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
    return r.success ? new TextDecoder().decode(r.stdout).trim() : null;
  } catch {
    return null;
  }
}
