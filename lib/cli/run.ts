/**
 * Runs the command line: builds the program, parses, dispatches, and maps errors to
 * exit statuses (0 success, 1 failure, 2 usage) with one line on stderr.
 *
 * @module
 */
import { CommanderError } from "commander";
import { BrokenPipeError, DiskstreamError } from "../errors.ts";
import { buildProgram } from "./program.ts";

/** Parses `args`, runs the command and returns the exit status. */
export async function runCli(args: string[]): Promise<number> {
  const debug = args.includes("--debug");
  const program = buildProgram();
  try {
    await program.parseAsync(args.filter((a) => a !== "--debug"), { from: "user" });
    return 0;
  } catch (err) {
    // A progress bar cut short keeps its line; the message starts on the next one.
    const { endProgressLine } = await import("../progress.ts");
    endProgressLine();
    return report(err, debug);
  }
}

function report(err: unknown, debug: boolean): number {
  if (err instanceof CommanderError) {
    // commander has already printed its message (or the help text).
    return err.exitCode === 0 ? 0 : 2;
  }
  if (debug && err instanceof Error) console.error(err.stack);
  if (err instanceof BrokenPipeError) return 1;
  if (err instanceof DiskstreamError) {
    console.error(`diskstream: ${err.message}`);
    return err.exitCode;
  }
  if (err instanceof Deno.errors.BrokenPipe) return 1;
  const msg = err instanceof Error ? err.message : String(err);
  console.error(
    `diskstream: internal error: ${msg}${debug ? "" : " (run with --debug for details)"}`,
  );
  return 1;
}
