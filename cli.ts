#!/usr/bin/env -S deno run --allow-all
/**
 * The `diskstream` command line. Parsing and dispatch only: the work is in `lib/`.
 *
 * @module
 */
import { runCli } from "./lib/cli/run.ts";

if (import.meta.main) {
  Deno.exit(await runCli(Deno.args));
}
