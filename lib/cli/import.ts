/**
 * The `import` command family: `import DEST` (qcow2/VHD stream → raw file or block
 * device) and `stream_decode OUTPUT`, a drop-in for XAPI's qcow-stream-tool.
 *
 * @module
 */
import { type Command, Option } from "commander";
import { InterruptedError, UsageError } from "../errors.ts";
import type { ImportFormat } from "../import/import.ts";
import type { Endpoint } from "../io/stream.ts";
import type { ProgressMode } from "../progress.ts";
import {
  addNbdOptions,
  DIRECT_HELP,
  endpointFrom,
  fdOption,
  type NbdFlags,
  nbdOptionsFrom,
  noteDirectWithoutFfi,
  progressMode,
  sizeOption,
} from "./options.ts";
import type { NbdOptions } from "../nbd/client.ts";
import { isNbdUri } from "../nbd/uri.ts";
import { addHttpOptions, checkHttpFlags, httpOptionsOf, noteRedirect } from "./http_options.ts";
import { type HttpFlags, isHttpUrl } from "../http/client.ts";

interface ImportFlags extends HttpFlags, NbdFlags {
  input?: string;
  inputFd?: number;
  format: string;
  size?: number;
  prezeroed?: boolean;
  delta?: boolean;
  maxBuffer?: number;
  spool: boolean;
  spoolDir?: string;
  progress?: boolean;
  direct?: boolean;
  machine?: boolean;
  tarPrefix?: string;
  ignoreChecksums?: boolean;
  sync: boolean;
}

/** The input formats of `import`. */
export type ImportRunFormat = ImportFormat | "raw" | "chunked" | "tar";
const FORMATS: readonly ImportRunFormat[] = ["auto", "qcow2", "vhd", "raw", "chunked", "tar"];

/** What one import run needs (also built by `vhd-tool serve`). */
export interface ImportRun {
  dest: string;
  source: Endpoint;
  format: ImportRunFormat;
  size?: number;
  /** Where `size` came from, for messages (default `--size`). */
  sizeOrigin?: string;
  prezeroed?: boolean;
  delta?: boolean;
  maxBuffer?: number;
  spool?: boolean;
  spoolDir?: string;
  progress: ProgressMode;
  nbd?: NbdOptions;
  /** tar: the members' prefix (default: the first member's). */
  tarPrefix?: string;
  /** tar: do not verify the checksums. */
  ignoreChecksums?: boolean;
  direct?: boolean;
  /** `-i http(s)://…`: download with GET, and the client's flags. */
  url?: { url: string; flags: HttpFlags };
  /** Sync DEST before success (default true). */
  sync?: boolean;
}

/** Registers the import commands on `program`. */
export function registerImport(program: Command): void {
  const importCommand = program
    .command("import")
    .description(
      "Import a qcow2 or VHD image arriving as a stream (stdin, a pipe, a socket) into a raw " +
        "file or block device, in one pass without seeking. A new file is created at the " +
        "virtual size and stays sparse; an existing file or device gets zeros where the image " +
        "has none (unless --prezeroed); --delta applies a diff onto DEST. From a file (-i FILE, " +
        "stdin redirected from a file, --input-fd of a file) the tables are read first and the " +
        "data in file order, so nothing is buffered; from a pipe, data that comes before its " +
        "tables is held in memory (--max-buffer), then in a spool file (--spool-dir).",
    )
    .argument(
      "<DEST>",
      "raw file, block device (/dev/... needs --allow-all) or NBD URI (nbd://HOST/EXPORT,\n" +
        "nbds://…, nbd+unix:///EXPORT?socket=PATH) to write",
    )
    .option(
      "-i, --input <IN>",
      "read the image from IN ('-' = stdin, the default); an http(s):// URL is downloaded\n" +
        "with GET, its Content-Type naming the format when -f is not given",
    )
    .option(
      "--input-fd <N>",
      "read the image from inherited file descriptor N",
      fdOption("--input-fd"),
    )
    .option(
      "-f, --format <FORMAT>",
      "auto, qcow2 or vhd (a fixed VHD from a pipe needs vhd; from a file it is recognised);\n" +
        "raw, chunked (vhd-tool's protocol) or tar (XVA disk members) must be given",
      "auto",
    )
    .option(
      "--size <BYTES>",
      "the size of DEST in bytes (K, M, G suffixes): a larger qcow2/VHD image is refused " +
        "before writing; -f raw: the exact length of the stream; -f chunked: the disk's " +
        "size (needed for a new file); -f tar: the disk's size, where the import stops",
      sizeOption("--size"),
    )
    .option("--prezeroed", "DEST already reads as zeros: write only the image's data")
    .option(
      "--delta",
      "apply a diff (qcow2 with a backing file, differencing VHD) onto DEST: unallocated " +
        "ranges are left untouched, zero ranges are written as zeros",
    )
    .addOption(
      new Option(
        "--max-buffer <SIZE>",
        "memory for data that arrives before the metadata mapping it; more goes to the " +
          "spool file (default: 16M)",
      ).argParser(sizeOption("--max-buffer")),
    )
    .option(
      "--spool-dir <DIR>",
      "folder of the spool file for what does not fit in --max-buffer (default: the system " +
        "temporary folder; the file is deleted at once and its space freed at the end)",
    )
    .option(
      "--no-spool",
      "refuse an image whose data before its tables exceeds --max-buffer (the message says " +
        "how much is needed) instead of spooling it",
    )
    .option(
      "--tar-prefix <PREFIX>",
      "-f tar: the members' prefix (PREFIX/%08d); default: the first member's",
    )
    .option("--ignore-checksums", "-f tar: do not verify the .xxhash/.checksum members")
    .option("--direct", DIRECT_HELP)
    .option("--progress", "show a progress bar on stderr")
    .option("--machine", "vhd-tool's 3-digit percentages (000…100) on stdout instead of the bar")
    .option(
      "--no-sync",
      "do not wait for DEST to reach its disk (fdatasync) before reporting success",
    )
    .addHelpText(
      "after",
      "\nDEST is synced before success. SIGINT, SIGTERM and SIGHUP stop the import: a DEST it\n" +
        "created is removed; for an existing file or device the message says from which byte\n" +
        "on it is partly written. The exit status is then 128 + the signal's number.\n" +
        "\nExamples:\n" +
        "  diskstream import disk.raw < disk.qcow2\n" +
        "  diskstream import disk.raw -f tar --size 10G < disk.tar\n" +
        "  diskstream import copy-of-old.raw -f chunked < diff.chunked\n" +
        "  curl -s http://host/disk.qcow2 | diskstream import /dev/vg/lv --progress\n" +
        "  diskstream import base-copy.raw --delta -i diff.qcow2\n" +
        "  diskstream import /dev/vg/lv -i 'https://user:TOKEN@host/export_raw_vdi?vdi=a&format=qcow2'\n" +
        "  diskstream import nbd+unix:///disk?socket=/run/nbd.sock -i disk.qcow2 --prezeroed",
    );
  addNbdOptions(addHttpOptions(importCommand))
    .action(async (dest: string, flags: ImportFlags) => {
      const format = flags.format as ImportRunFormat;
      if (!FORMATS.includes(format)) {
        throw new UsageError(
          `-f/--format must be one of ${FORMATS.join(", ")}, got '${flags.format}'`,
        );
      }
      if (format !== "tar" && (flags.tarPrefix !== undefined || flags.ignoreChecksums)) {
        throw new UsageError("--tar-prefix and --ignore-checksums apply to -f tar only");
      }
      const wire = format === "raw" || format === "chunked" || format === "tar";
      const imageOnly = [
        flags.delta && "--delta",
        flags.maxBuffer !== undefined && "--max-buffer",
        flags.spoolDir !== undefined && "--spool-dir",
        flags.spool === false && "--no-spool",
      ].filter((f): f is string => typeof f === "string");
      if (wire && imageOnly.length > 0) {
        throw new UsageError(
          `${imageOnly.join(", ")} ${imageOnly.length === 1 ? "applies" : "apply"} to qcow2 ` +
            `and VHD images only, not to -f ${format}` +
            (flags.delta && format === "chunked"
              ? " (a chunked stream always leaves what it does not carry untouched)"
              : ""),
        );
      }
      if (flags.connections !== undefined && !isNbdUri(dest)) {
        throw new UsageError(
          "--connections applies to an NBD destination (nbd://, nbds://, nbd+unix://) only",
        );
      }
      if (flags.delta && flags.prezeroed) {
        throw new UsageError("--delta and --prezeroed do not go together");
      }
      const url = flags.input !== undefined && isHttpUrl(flags.input) ? flags.input : undefined;
      // --cacert also serves an nbds:// destination.
      checkHttpFlags(
        isNbdUri(dest) ? { ...flags, cacert: undefined } : flags,
        url !== undefined,
        "-i/--input",
      );
      await runImport({
        dest,
        source: endpointFrom(
          url === undefined ? flags.input : "-",
          flags.inputFd,
          "-i/--input and --input-fd",
        ),
        url: url === undefined ? undefined : { url, flags },
        format,
        size: flags.size,
        prezeroed: flags.prezeroed,
        delta: flags.delta,
        maxBuffer: flags.maxBuffer,
        spool: flags.spool,
        spoolDir: flags.spoolDir,
        progress: progressMode(flags),
        nbd: nbdOptionsFrom(flags),
        tarPrefix: flags.tarPrefix,
        ignoreChecksums: flags.ignoreChecksums,
        direct: flags.direct,
        sync: flags.sync,
      });
    });

  program
    .command("stream_decode")
    .description(
      "Drop-in for XAPI's 'qcow-stream-tool stream_decode': read a qcow2 (or VHD) stream on " +
        "stdin and write the raw disk to OUTPUT (usually a block device).",
    )
    .argument("<OUTPUT>", "raw file or block device to write")
    .action(async (output: string) => {
      await runImport({
        dest: output,
        source: { kind: "std" },
        format: "auto",
        progress: "none",
      });
    });
}

/** Runs one import (also used by `vhd-tool serve`). */
export async function runImport(run: ImportRun): Promise<void> {
  noteDirectWithoutFfi(run.direct);
  if (run.url) return await importFromUrl(run, run.url);
  if (run.source.kind === "std" && Deno.stdin.isTerminal()) {
    throw new UsageError(
      "refusing to read a disk image from a terminal: pipe it in or use -i FILE",
    );
  }
  const { endpointPath, sameFile } = await import("../io/same_file.ts");
  if (await sameFile(endpointPath(run.source, "stdin"), run.dest)) {
    throw new UsageError(
      `the destination ${run.dest} is the input image itself: import into another file`,
    );
  }
  // The import machinery is loaded only when the command runs (faster start-up).
  const [
    { importFromFile, importFromPipe, importImage },
    { endpointName, openInput },
    { openPipeInput },
    { openFileInput },
    { createProgress },
    { formatBytes },
  ] = await Promise.all([
    import("../import/import.ts"),
    import("../io/stream.ts"),
    import("../io/pipe_input.ts"),
    import("../io/file_input.ts"),
    import("../progress.ts"),
    import("../size.ts"),
  ]);
  // A signal stops the import: DEST is removed if it was created, else the message
  // says from which byte on it is partly written.
  const { stoppableBySignals } = await import("./signals.ts");
  const result = await stoppableBySignals(async (signal) => {
    const progress = createProgress(run.progress, "import");
    const src = run.source;
    const where = src.kind === "std" ? { fd: 0 } : src.kind === "fd" ? { fd: src.fd } : {
      path: src.path,
    };
    const name = endpointName(src, "stdin");
    const format = run.format;
    if (isWire(format)) {
      const wirePipe = openPipeInput(where, name);
      try {
        const input = wirePipe ?? (await openInput(run.source, { blocking: true })).stream;
        await importWire(run, format, input, progress, signal);
        return null;
      } finally {
        wirePipe?.close();
      }
    }
    const options = { ...imageOptions(run, format, signal), direct: run.direct, progress };
    // A file or device is read by random access (tables first); a pipe through its
    // descriptor, so that the data can be spliced into DEST; anything else as a stream.
    const file = await openFileInput(where, name);
    if (file) {
      try {
        return await importFromFile(file, run.dest, options);
      } finally {
        file.close();
      }
    }
    const pipe = openPipeInput(where, name);
    if (pipe) {
      try {
        return await importFromPipe(pipe, run.dest, options);
      } finally {
        pipe.close();
      }
    }
    const input = await openInput(run.source, { blocking: true });
    return await importImage(input.stream, run.dest, options);
  });
  if (result !== null && result.spooledBytes > 0) {
    console.error(
      `import: ${formatBytes(result.spooledBytes)} (${result.spooledBytes} bytes) of the stream ` +
        `came before its tables and waited in a spool file in ${
          run.spoolDir ?? "the system temporary folder"
        }${
          result.releasedBytes > 0
            ? `; ${
              formatBytes(result.releasedBytes)
            } of it was let go as soon as it was known to be unneeded (a snapshot's own data, ` +
              "bitmaps)"
            : ""
        }`,
    );
  }
}

/** `import -i URL`: the body of a GET, its format from its Content-Type unless given. */
async function importFromUrl(run: ImportRun, url: { url: string; flags: HttpFlags }) {
  const opts = await httpOptionsOf(url.flags);
  const [{ httpGet, redactUrl }, { formatOfContentType }, { importImage }, { createProgress }, {
    stoppableBySignals,
  }] = await Promise.all([
    import("../http/client.ts"),
    import("../http/content_type.ts"),
    import("../import/import.ts"),
    import("../progress.ts"),
    import("./signals.ts"),
  ]);
  // A stop signal also ends a wait for a server that stalls (before or within the body).
  await stoppableBySignals(async (signal) => {
    const download = await httpGet(url.url, { ...opts, signal, onRedirect: noteRedirect })
      .catch((err) => {
        if (!(err instanceof InterruptedError)) throw err;
        throw err.retell(
          `${err.message} while waiting for ${redactUrl(url.url)}: nothing was written`,
        );
      });
    // Without -f, a Content-Type of ours names the format (an XVA disk's tar included).
    const named = formatOfContentType(download.contentType);
    const chosen =
      run.format === "auto" && (named === "tar" || named === "qcow2" || named === "vhd")
        ? named
        : run.format;
    try {
      if (isWire(chosen)) {
        await importWire(
          run,
          chosen,
          download.stream,
          createProgress(run.progress, "import"),
          signal,
        );
      } else {
        await importImage(download.stream, run.dest, {
          ...imageOptions(run, chosen, signal),
          progress: createProgress(run.progress, "import"),
          streamLength: download.length,
        });
      }
    } catch (err) {
      await download.stream.cancel().catch(() => {});
      throw err;
    }
  });
}

type WireFormat = "raw" | "chunked" | "tar";

function isWire(format: ImportRunFormat): format is WireFormat {
  return format === "raw" || format === "chunked" || format === "tar";
}

/** Imports a raw, chunked or tar stream (XAPI's wire formats) into `run.dest`. */
async function importWire(
  run: ImportRun,
  format: WireFormat,
  input: ReadableStream<Uint8Array> | import("../io/pipe_input.ts").PipeInput,
  progress: import("../progress.ts").ProgressSink,
  signal: AbortSignal,
): Promise<unknown> {
  const [wire, { ChunkStream }] = await Promise.all([
    import("../import/wire.ts"),
    import("../io/chunk_stream.ts"),
  ]);
  const stream = new ChunkStream(input, signal);
  const opts = {
    size: run.size,
    sizeOrigin: run.sizeOrigin,
    prezeroed: run.prezeroed,
    progress,
    sync: run.sync,
    direct: run.direct,
    signal,
  };
  if (format === "raw") return await wire.importRaw(stream, run.dest, opts);
  if (format === "chunked") return await wire.importChunked(stream, run.dest, opts);
  return await wire.importTar(stream, run.dest, {
    ...opts,
    prefix: run.tarPrefix,
    ignoreChecksums: run.ignoreChecksums,
  });
}

/** The options of an image import that come from the command line as they are. */
function imageOptions(
  run: ImportRun,
  format: import("../import/import.ts").ImportFormat,
  signal: AbortSignal,
) {
  return {
    format,
    size: run.size,
    prezeroed: run.prezeroed,
    delta: run.delta,
    maxBuffer: run.maxBuffer,
    spool: run.spool,
    spoolDir: run.spoolDir,
    sync: run.sync,
    signal,
    nbd: run.nbd,
  };
}
