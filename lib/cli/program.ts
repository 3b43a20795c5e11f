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
import { registerVhdTool } from "./vhd_tool.ts";
import { registerXva } from "./xva.ts";
import { registerServer } from "./server.ts";

/** Builds the program with every command registered. */
export function buildProgram(): Command {
  const program = new Command("diskstream")
    .description(
      "Stream virtual disks: raw disk or block device → qcow2 or VHD stream, qcow2/VHD " +
        "stream → raw, diffs against a base disk, and header inspection that lists " +
        "allocated clusters.",
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
  registerVhdTool(program);
  registerXva(program);
  registerServer(program);
  for (const command of program.commands) {
    command.exitOverride();
    tidyHelp(command);
  }
  program.action((_options: unknown, command: Command) => {
    const [word] = command.args;
    throw new UsageError(
      word === undefined
        ? "no command given: run 'diskstream --help'"
        : `unknown command '${word}': run 'diskstream --help' for the list`,
    );
  });
  program.allowExcessArguments(true);
  return program;
}

/** One line per command in `diskstream --help`. */
const SUMMARIES: Record<string, string> = {
  export: "raw disk or block device → qcow2, VHD, raw, chunked or tar stream, optionally a diff",
  "qcow2-to-stdout": "drop-in for XAPI's qcow2-to-stdout.py (same flags)",
  import: "qcow2/VHD/raw/chunked/tar stream → raw file or block device, one pass, no seeking",
  stream_decode: "drop-in for qcow-stream-tool stream_decode (stdin → OUTPUT)",
  headers: "allocation JSON of a qcow2/VHD image, as vhd-tool prints it",
  read_headers: "drop-in for vhd-tool read_headers (flat list)",
  read_headers_interval: "drop-in for vhd-tool read_headers_interval (intervals)",
  info: "a human summary of a qcow2/VHD image (--json for scripts)",
  xva: "list or extract the disks of an XVA (XenServer/XCP-ng VM export)",
  "vhd-tool": "vhd-tool's stream/serve/read_headers command line, for XAPI's calls",
  server: "serve disks on XAPI's export_raw_vdi/import_raw_vdi HTTP(S) endpoints",
};

/**
 * Lets commander wrap descriptions to the terminal itself (joins the source's line
 * breaks) and gives each command its one-line summary.
 */
function tidyHelp(command: Command): void {
  const unwrap = (text: string) => text.replace(/\s*\n\s*/g, " ");
  command.description(unwrap(command.description()));
  const summary = SUMMARIES[command.name()];
  if (summary !== undefined) command.summary(summary);
  for (const option of command.options) option.description = unwrap(option.description);
}
