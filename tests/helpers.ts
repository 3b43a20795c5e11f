/**
 * Shared test helpers: qemu-img as the reference, temp dirs, sparse files,
 * deterministic data, hashes, and running the CLI as a subprocess.
 *
 * Tests that need qemu-img are declared with {@link qemuTest}: skipped on a
 * developer machine without it, but **failing** in CI (CI=true) when it is missing.
 */
import { createHash } from "node:crypto";
import { formatAllocation, parseAllocation } from "../lib/alloc/allocation.ts";
import { readImageAllocation } from "../lib/headers/image_allocation.ts";

/** True when running under CI. */
export const IN_CI = Deno.env.get("CI") === "true";

/** Path of the CLI entry point. */
export const CLI = new URL("../cli.ts", import.meta.url).pathname;

/** True when qemu-img is on PATH. */
export const HAVE_QEMU = await (async () => {
  try {
    const out = await new Deno.Command("qemu-img", { args: ["--version"], stdout: "null" })
      .output();
    return out.success;
  } catch {
    return false;
  }
})();

/** A test that needs qemu-img/qemu-io; fails in CI if they are missing. */
export function qemuTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name,
    ignore: !HAVE_QEMU && !IN_CI,
    fn: async (t) => {
      if (!HAVE_QEMU) throw new Error("qemu-img is missing: apt-get install -y qemu-utils");
      await fn(t);
    },
  });
}

/** Result of a finished subprocess. */
export interface RunResult {
  code: number;
  stdout: Uint8Array;
  stderr: string;
}

/** Runs a command, optionally feeding `stdin` bytes or a file. */
export async function run(
  cmd: string,
  args: string[],
  opts: { stdin?: Uint8Array | string; stdinFile?: string; env?: Record<string, string> } = {},
): Promise<RunResult> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: opts.stdin !== undefined || opts.stdinFile !== undefined ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    env: opts.env,
  }).spawn();
  const writing = (async () => {
    if (opts.stdinFile !== undefined) {
      const f = await Deno.open(opts.stdinFile);
      await f.readable.pipeTo(child.stdin).catch(() => {});
    } else if (opts.stdin !== undefined) {
      const w = child.stdin.getWriter();
      const data = typeof opts.stdin === "string"
        ? new TextEncoder().encode(opts.stdin)
        : opts.stdin;
      await w.write(data).catch(() => {});
      await w.close().catch(() => {});
    }
  })();
  const out = await child.output();
  await writing;
  return { code: out.code, stdout: out.stdout, stderr: new TextDecoder().decode(out.stderr) };
}

/** Runs the diskstream CLI (`deno run -A cli.ts ARGS`). */
export function runCli(
  args: string[],
  opts: { stdin?: Uint8Array | string; stdinFile?: string } = {},
): Promise<RunResult> {
  return run(Deno.execPath(), ["run", "-A", CLI, ...args], opts);
}

/** Runs qemu-img (or qemu-io with `tool`), throwing with its stderr on failure. */
export async function qemu(args: string[], tool = "qemu-img"): Promise<string> {
  const r = await run(tool, args);
  if (r.code !== 0) {
    throw new Error(`${tool} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  }
  return new TextDecoder().decode(r.stdout);
}

/** `qemu-img compare` of two images; true when identical. Formats auto-detected unless given. */
export async function imagesEqual(a: string, b: string, fa?: string, fb?: string) {
  const args = ["compare", ...(fa ? ["-f", fa] : []), ...(fb ? ["-F", fb] : []), a, b];
  const r = await run("qemu-img", args);
  if (r.code > 1) throw new Error(`qemu-img compare failed: ${r.stderr}`);
  return r.code === 0;
}

/** Runs `qemu-img check` and returns its JSON; throws unless the image is clean. */
export async function checkClean(path: string): Promise<Record<string, unknown>> {
  const r = await run("qemu-img", ["check", "--output=json", path]);
  const text = new TextDecoder().decode(r.stdout);
  if (r.code !== 0) throw new Error(`qemu-img check ${path} → ${r.code}: ${text} ${r.stderr}`);
  return JSON.parse(text);
}

/** Makes a temp dir, runs `fn` in it, removes it afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "diskstream-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Deterministic pseudo-random bytes (xorshift32) — never all-zero clusters. */
export function pseudoRandom(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  const words = new Uint32Array(out.buffer, 0, length >>> 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  for (let i = words.length * 4; i < length; i++) out[i] = (i * 131 + seed) | 1;
  return out;
}

/** Creates a sparse file of `size` bytes with `writes` ([offset, bytes]) in it. */
export async function writeSparse(
  path: string,
  size: number,
  writes: [number, Uint8Array][] = [],
): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await f.truncate(size);
    for (const [offset, bytes] of writes) {
      await f.seek(offset, Deno.SeekMode.Start);
      let done = 0;
      while (done < bytes.length) done += await f.write(bytes.subarray(done));
    }
  } finally {
    f.close();
  }
}

/** sha256 (hex) of a file's contents, streamed. */
export async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  const f = await Deno.open(path);
  for await (const chunk of f.readable) h.update(chunk);
  return h.digest("hex");
}

/** sha256 (hex) of bytes. */
export function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** True when every command in `tools` runs (`cmd args…` exits 0). */
async function toolsWork(tools: string[][]): Promise<boolean> {
  for (const [cmd, ...args] of tools) {
    try {
      const out = await new Deno.Command(cmd, { args, stdout: "null", stderr: "null" }).output();
      if (!out.success) return false;
    } catch {
      return false;
    }
  }
  return true;
}

/**
 * A test that needs external tools, each given as a command that must succeed
 * (`["xxhsum", "--version"]`): skipped on a developer machine without them, failing in
 * CI (CI=true) with what to install.
 */
export function toolTest(
  name: string,
  tools: string[][],
  install: string,
  fn: (t: Deno.TestContext) => Promise<void>,
): void {
  const have = toolsWork(tools);
  Deno.test({
    name,
    fn: async (t) => {
      if (!(await have)) {
        if (IN_CI) throw new Error(`${tools.map((c) => c[0]).join(", ")} missing: ${install}`);
        console.warn(`skipped (${install})`);
        return;
      }
      await fn(t);
    },
  });
}

/** The bytes of `parts`, one after another. */
export function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The CLI as a shell command, for pipelines run with {@link sh}. */
export const CLI_SH = `${Deno.execPath()} run -A ${CLI}`;

/** Runs a bash pipeline (with pipefail), failing with its stderr; returns its stdout. */
export async function sh(script: string): Promise<string> {
  const r = await run("bash", ["-o", "pipefail", "-c", script]);
  if (r.code !== 0) throw new Error(`${script}\n→ ${r.code}: ${r.stderr}`);
  return new TextDecoder().decode(r.stdout);
}

/** The allocation JSON of the image at `path`, straight from the library (`headers`). */
export async function ourAllocation(path: string, legacy = false): Promise<string> {
  return formatAllocation(await readImageAllocation(path), legacy);
}

/**
 * What `qemu-img map` says of the image at `path` (format `fmt`, probed if not given),
 * as allocation JSON at the image's cluster size (or `clusterSize`), ends rounded up.
 */
export async function qemuAllocation(
  path: string,
  clusterSize?: number,
  fmt?: string,
): Promise<string> {
  const f = fmt ? ["-f", fmt] : [];
  const info = JSON.parse(await qemu(["info", ...f, "--output=json", path]));
  const cs = clusterSize ?? info["cluster-size"];
  return formatAllocation(
    parseAllocation(await qemu(["map", ...f, "--output=json", path]), cs, "qemu-img map", info),
  );
}
