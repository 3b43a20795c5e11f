/**
 * The `headers` command family: `headers IMAGE [--legacy]`, vhd-tool's drop-in names
 * `read_headers FILE` and `read_headers_interval FILE`, and `info IMAGE [--json]`.
 *
 * @module
 */
import type { Command } from "commander";
import { BrokenPipeError, describeIoError, escapeControls, UsageError } from "../errors.ts";
import { isHttpUrl, redactUrl } from "../http/client.ts";
import { isNbdUri } from "../nbd/uri.ts";

// The readers are loaded when a command runs, so that start-up only pays for the
// command that is used.

/** Registers the headers commands on `program`. */
export function registerHeaders(program: Command): void {
  program
    .command("headers")
    .description(
      "Print the allocation JSON of a qcow2 or VHD image (and its backing/parent chain),\n" +
        "byte-compatible with vhd-tool: inclusive [first,last] intervals, or the flat\n" +
        "list with --legacy. Only the image's tables are read.",
    )
    .argument("<IMAGE>", "qcow2 (v2/v3) or VHD (dynamic, differencing, fixed) image")
    .option("--legacy", "flat list of cluster numbers (vhd-tool read_headers)")
    .action(async (image: string, opts: { legacy?: boolean }) => {
      await printHeaders(image, opts.legacy === true);
    });
  program
    .command("read_headers")
    .description("Drop-in for 'vhd-tool read_headers FILE': 'headers FILE --legacy'.")
    .argument("<FILE>", "qcow2 or VHD image")
    .action(async (file: string) => await printHeaders(file, true));
  program
    .command("read_headers_interval")
    .description("Drop-in for 'vhd-tool read_headers_interval FILE': 'headers FILE'.")
    .argument("<FILE>", "qcow2 or VHD image")
    .action(async (file: string) => await printHeaders(file, false));
  program
    .command("info")
    .description(
      "A summary of a qcow2 or VHD image: format and version, virtual size, cluster or\n" +
        "block size, allocated bytes, backing/parent chain and features.",
    )
    .argument("<IMAGE>", "qcow2 or VHD image")
    .option("--json", "print JSON for scripts (fields in the README)")
    .action(async (image: string, opts: { json?: boolean }) => {
      refuseRemote(image, "info");
      const { formatImageInfo, readImageInfo } = await import("../headers/info.ts");
      const info = await readImageInfo(image);
      await writeStdout(
        opts.json ? JSON.stringify(info, null, 2) + "\n" : formatImageInfo(info),
      );
    });
}

/** Prints the allocation JSON of the image at `path` (vhd-tool's read_headers family). */
export async function printHeaders(
  path: string,
  legacy: boolean,
  searchDirs: string[] = [],
): Promise<void> {
  refuseRemote(path, legacy ? "read_headers" : "headers");
  const [{ formatAllocation }, { readImageAllocation }] = await Promise.all([
    import("../alloc/allocation.ts"),
    import("../headers/image_allocation.ts"),
  ]);
  await writeStdout(formatAllocation(await readImageAllocation(path, searchDirs), legacy));
}

/** Writes all of `text` to stdout; a closed pipe ends quietly. */
async function writeStdout(text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  let done = 0;
  try {
    while (done < bytes.length) done += await Deno.stdout.write(bytes.subarray(done));
  } catch (err) {
    if (err instanceof Deno.errors.BrokenPipe) {
      throw new BrokenPipeError("stdout: the reader closed the pipe", { cause: err });
    }
    throw describeIoError(err, "stdout", "write to");
  }
}

/**
 * Refuses an NBD URI or an HTTP(S) URL where an image file is read (they would be
 * looked up as file names), saying what to use instead.
 */
function refuseRemote(image: string, command: string): void {
  if (!isNbdUri(image) && !isHttpUrl(image)) return;
  let shown = image;
  try {
    shown = redactUrl(image);
  } catch {
    // not a valid URL: shown as given
  }
  shown = escapeControls(shown);
  if (isNbdUri(image)) {
    throw new UsageError(
      `${command} reads qcow2 or VHD image files, not NBD exports: ${shown} is a raw ` +
        `disk (its allocation: 'nbdinfo --map ${shown}'; 'diskstream export ${shown}' ` +
        `exports only its allocated clusters)`,
    );
  }
  if (isHttpUrl(image)) {
    throw new UsageError(
      `${command} reads qcow2 or VHD image files, not URLs: download ${shown} first ` +
        `('diskstream import -i URL' takes a qcow2 or VHD stream over HTTP)`,
    );
  }
}
