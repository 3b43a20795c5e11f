/**
 * The `diskstream` command tree: each command lives in its own file here and only
 * turns flags into a call of the library in `lib/`.
 *
 * @module
 */
import { Command } from "commander";
import { UsageError } from "../errors.ts";
import { registerExport } from "./export.ts";
import { registerHeaders } from "./headers.ts";
import { registerImport } from "./import.ts";

/** Builds the program with every command registered. */
export function buildProgram(): Command {
  const program = new Command("diskstream")
    .description(
      "Stream virtual disks: raw disk or block device → qcow2 stream, qcow2/VHD stream → raw,\n" +
        "diffs against a base disk, and header inspection that lists allocated clusters.",
    )
    .version("0.1.0")
    .showHelpAfterError("(run 'diskstream help' or 'diskstream COMMAND --help' for usage)")
    .addHelpText(
      "after",
      "\nExit status: 0 success, 1 failure (one line on stderr; --debug adds a stack trace), 2 bad usage.",
    )
    .exitOverride()
    .configureOutput({
      outputError: (str, write) => write(str.replace(/^error: /, "diskstream: ")),
    });
  registerExport(program);
  registerImport(program);
  registerHeaders(program);
  program.commands.forEach((c) => c.exitOverride());
  program.action(() => {
    throw new UsageError("no command given: run 'diskstream --help'");
  });
  return program;
}
