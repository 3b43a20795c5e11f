/**
 * Running a command under bounds, for the fuzzer and the tests of bounded work: its
 * stdin fed through a pipe, its wall time and peak RSS measured (VmHWM from
 * `/proc/PID/status`, polled), and the process killed when it passes a bound.
 *
 * @module
 */

/** What a bounded run gave. */
export interface Outcome {
  code: number;
  stdout: Uint8Array;
  stderr: string;
  /** Wall time in milliseconds. */
  ms: number;
  /** Peak resident set size in bytes (as last polled). */
  peakRss: number;
  /** Why the process was killed, when it was. */
  killed?: string;
}

/** Bounds and input of {@link runMeasured}. */
export interface RunBounds {
  /** Bytes written to the command's stdin through a pipe (stdin is /dev/null without). */
  stdin?: Uint8Array;
  /** Kill the command after this many milliseconds. */
  timeLimitMs?: number;
  /** Kill the command when its peak RSS passes this many bytes. */
  rssLimit?: number;
}

/** Runs `cmd` with `args` within `bounds`; see the module comment. */
export async function runMeasured(
  cmd: string,
  args: string[],
  bounds: RunBounds = {},
): Promise<Outcome> {
  const { stdin, timeLimitMs = Infinity, rssLimit = Infinity } = bounds;
  const t0 = performance.now();
  const child = new Deno.Command(cmd, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  let peakRss = 0;
  let killed: string | undefined;
  const kill = (why: string) => {
    if (killed) return;
    killed = why;
    try {
      child.kill("SIGKILL");
    } catch { /* gone already */ }
  };
  const timer = Number.isFinite(timeLimitMs)
    ? setTimeout(() => kill(`took longer than ${timeLimitMs / 1000} s`), timeLimitMs)
    : undefined;
  const poll = setInterval(() => {
    try {
      const status = Deno.readTextFileSync(`/proc/${child.pid}/status`);
      const m = /VmHWM:\s+(\d+) kB/.exec(status);
      if (m) peakRss = Math.max(peakRss, Number(m[1]) * 1024);
      if (peakRss > rssLimit) kill(`peak RSS above ${Math.round(rssLimit / 2 ** 20)} MiB`);
    } catch { /* exited */ }
  }, 20);
  const writing = (async () => {
    if (!stdin) return;
    const w = child.stdin.getWriter();
    for (let at = 0; at < stdin.length; at += 1 << 20) {
      await w.write(stdin.subarray(at, at + (1 << 20))).catch(() => {});
    }
    await w.close().catch(() => {});
  })();
  const out = await child.output();
  await writing;
  clearTimeout(timer);
  clearInterval(poll);
  return {
    code: out.code,
    stdout: out.stdout,
    stderr: new TextDecoder().decode(out.stderr),
    ms: performance.now() - t0,
    peakRss,
    killed,
  };
}
