/**
 * Progress reporting for long work. Two forms:
 * - `machine`: vhd-tool's protocol for XAPI: each time the whole percentage changes,
 *   exactly three zero-padded digits on stdout, no newline (`000001…100`); nothing at
 *   all when there is no work.
 * - `bar`: a human bar with rate and ETA on stderr.
 *
 * @module
 */
import { formatBytes } from "./size.ts";

/** How progress is shown. */
export type ProgressMode = "none" | "bar" | "machine";

/** Receives progress: how many of `total` units of work are done. */
export interface ProgressSink {
  /** Sets the total amount of work (bytes); may be called again when it becomes known. */
  setTotal(total: number): void;
  /** Reports that `done` units of the total are done (monotonic). */
  update(done: number): void;
  /** Work is over: prints 100 / ends the bar line. */
  finish(): void;
}

const encoder = new TextEncoder();

/** True while a bar has drawn on a terminal a line it has not ended yet. */
let lineOpen = false;

/**
 * Ends the line a progress bar left open on a terminal, so that what is printed next
 * (an error) starts on a line of its own. Call it before writing to stderr when work
 * stops early.
 */
export function endProgressLine(): void {
  if (!lineOpen) return;
  lineOpen = false;
  try {
    Deno.stderr.writeSync(encoder.encode("\n"));
  } catch {
    // stderr is gone: nothing to tidy
  }
}

/** Creates a sink for `mode`; `label` names the work on the bar (e.g. "export"). */
export function createProgress(mode: ProgressMode, label = ""): ProgressSink {
  if (mode === "machine") return new MachineProgress();
  if (mode === "bar") return new BarProgress(label);
  return { setTotal() {}, update() {}, finish() {} };
}

class MachineProgress implements ProgressSink {
  #total = 0;
  #last = -1;
  #done = 0;
  setTotal(total: number) {
    this.#total = total;
    this.update(this.#done);
  }
  update(done: number) {
    this.#done = done;
    if (this.#total <= 0) return;
    const pct = Math.min(100, Math.floor((done * 100) / this.#total));
    while (this.#last < pct) {
      // XAPI reads three bytes at a time: print every step, not just the latest.
      this.#last++;
      Deno.stdout.writeSync(encoder.encode(String(this.#last).padStart(3, "0")));
    }
  }
  finish() {
    if (this.#total > 0) this.update(this.#total);
  }
}

class BarProgress implements ProgressSink {
  #total = 0;
  #done = 0;
  #start = performance.now();
  #lastDraw = 0;
  #tty = Deno.stderr.isTerminal();
  #label: string;
  constructor(label: string) {
    this.#label = label;
  }
  setTotal(total: number) {
    this.#total = total;
  }
  update(done: number) {
    this.#done = done;
    const now = performance.now();
    if (now - this.#lastDraw < (this.#tty ? 100 : 2000)) return;
    this.#lastDraw = now;
    this.#draw(now, false);
  }
  finish() {
    this.#draw(performance.now(), true);
  }
  #draw(now: number, final: boolean) {
    const secs = Math.max((now - this.#start) / 1000, 1e-6);
    const rate = this.#done / secs;
    const frac = this.#total > 0 ? Math.min(1, this.#done / this.#total) : final ? 1 : 0;
    const width = 30;
    const filled = Math.round(frac * width);
    const bar = "#".repeat(filled) + "-".repeat(width - filled);
    const eta = rate > 0 && this.#total > this.#done ? (this.#total - this.#done) / rate : 0;
    const line = `${this.#label ? this.#label + " " : ""}[${bar}] ${
      (frac * 100).toFixed(0).padStart(3)
    }% ${formatBytes(this.#done)} / ${formatBytes(this.#total)} ${formatBytes(rate)}/s ${
      final ? `in ${secs.toFixed(1)}s` : `ETA ${formatDuration(eta)}`
    }`;
    const out = this.#tty ? `\r\x1b[K${line}${final ? "\n" : ""}` : `${line}\n`;
    Deno.stderr.writeSync(encoder.encode(out));
    lineOpen = this.#tty && !final;
  }
}

function formatDuration(secs: number): string {
  const s = Math.round(secs);
  const m = Math.floor(s / 60);
  return `${m}:${String(s % 60).padStart(2, "0")}`;
}
