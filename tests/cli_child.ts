/**
 * A CLI child process the test talks to: its stdin fed piece by piece, its stdout
 * watched, real signals sent to it (see signals_test.ts, block_device_test.ts).
 */
import { CLI } from "./helpers.ts";

/** A running CLI child whose stdin we feed and whose stdout we watch. */
export class CliChild {
  readonly child: Deno.ChildProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly #stdout: ReadableStreamDefaultReader<Uint8Array>;
  readonly #stderr: Promise<string>;
  #seen = "";

  constructor(args: string[]) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = this.child.stdin.getWriter();
    this.#stdout = this.child.stdout.getReader();
    this.#stderr = new Response(this.child.stderr).text();
  }

  /** Writes `bytes` to the child's stdin (and keeps it open). */
  async feed(bytes: Uint8Array): Promise<void> {
    await this.#stdin.write(bytes);
  }

  /** Waits until the child's stdout has printed something matching `re`. */
  async waitForOutput(re: RegExp): Promise<void> {
    while (!re.test(this.#seen)) {
      const r = await this.#stdout.read();
      if (r.done) throw new Error(`stdout ended before ${re}: '${this.#seen}'`);
      this.#seen += new TextDecoder().decode(r.value);
    }
  }

  /**
   * Waits until the child handles SIGHUP, SIGINT and SIGTERM itself (`SigCgt` in
   * /proc/PID/status), i.e. until the command is running.
   */
  async waitForHandlers(): Promise<void> {
    const mask = (1n << 0n) | (1n << 1n) | (1n << 14n); // bits signo - 1
    await until(async () => {
      const status = await Deno.readTextFile(`/proc/${this.child.pid}/status`);
      const m = /^SigCgt:\s+([0-9a-f]+)/m.exec(status);
      return m !== null && (BigInt(`0x${m[1]}`) & mask) === mask;
    }, "the child's signal handlers");
  }

  /** Sends `signal` and returns the exit code, stderr, and how long the exit took. */
  async stop(signal: Deno.Signal): Promise<{ code: number; stderr: string; ms: number }> {
    const t0 = performance.now();
    this.child.kill(signal);
    const [status, stderr] = await Promise.all([this.child.status, this.#stderr]);
    const ms = performance.now() - t0;
    await this.#stdin.close().catch(() => {});
    await this.#stdout.cancel().catch(() => {});
    return { code: status.code, stderr, ms };
  }
}

/** Waits until `test` holds (polling), failing after `ms`. */
export async function until(test: () => Promise<boolean>, what: string, ms = 30_000) {
  const end = Date.now() + ms;
  while (!(await test())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
