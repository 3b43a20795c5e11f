/**
 * The fuzzer's smoke run (issue 8, item 8): about a minute of `deno task fuzz` with a
 * fixed seed (override with FUZZ_SEED), every family, no failure allowed. A failing
 * case is saved under fuzz-failures/ with the command that replays it.
 */
import assert from "node:assert/strict";
import { qemuTest } from "./helpers.ts";

const FUZZ = new URL("../tasks/fuzz.ts", import.meta.url).pathname;
const SECONDS = Number(Deno.env.get("FUZZ_SECONDS") ?? 50);
const SEED = Deno.env.get("FUZZ_SEED") ?? "20261129";

qemuTest("fuzz: a short smoke run of every family finds no failure", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", FUZZ, "--seconds", String(SECONDS), "--seed", SEED, "--quiet"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  // Every family ran cases.
  for (const family of ["import", "headers", "info", "alloc"]) {
    const m = new RegExp(`^${family}\\s+(\\d+)`, "m").exec(text);
    assert.ok(m && Number(m[1]) > 0, `no ${family} cases:\n${text}`);
  }
  assert.match(text, /, 0 failures/);
});
