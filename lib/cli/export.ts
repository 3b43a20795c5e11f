/**
 * The `export` command family: `export SOURCE` (raw disk → qcow2 or VHD stream) and
 * `qcow2-to-stdout`, a drop-in for XAPI's `qcow2-to-stdout.py` with its flags.
 *
 * @module
 */
import type { Command } from "commander";
import type { Allocation, ImageInfoJson } from "../alloc/allocation.ts";
import { InterruptedError, UnsupportedError, UsageError } from "../errors.ts";
import type { DiskSource } from "../io/endpoint.ts";
import type { Endpoint } from "../io/stream.ts";
import type { ProgressMode } from "../progress.ts";
import { DEFAULT_CLUSTER_SIZE, DEFAULT_REFCOUNT_BITS } from "../qcow2/layout.ts";
import { DEFAULT_BLOCK_SIZE } from "../vhd/constants.ts";
import {
  addNbdOptions,
  DIRECT_HELP,
  endpointFrom,
  fdOption,
  type NbdFlags,
  nbdOptionsFrom,
  noteDirectWithoutFfi,
  powerOfTwoOption,
  progressMode,
} from "./options.ts";
import type { NbdOptions } from "../nbd/client.ts";
import { isNbdUri } from "../nbd/uri.ts";
import { addHttpOptions, checkHttpFlags, httpOptionsOf, noteRedirect } from "./http_options.ts";
import { type HttpFlags, isHttpUrl } from "../http/client.ts";

const clusterSizeOption = powerOfTwoOption("-c/--cluster-size", 512, 2 * 1024 * 1024);
const refcountBitsOption = powerOfTwoOption("-r/--refcount-bits", 1, 64);

interface ExportFlags extends HttpFlags, NbdFlags {
  output?: string;
  outputFd?: number;
  format: string;
  clusterSize: number;
  refcountBits: number;
  allocation?: string;
  zeroCheck?: boolean;
  diff?: string;
  baseAllocation?: string;
  progress?: boolean;
  direct?: boolean;
  machine?: boolean;
  tarPrefix: string;
  checksum: string;
  sync: boolean;
}

/** The output formats of `export`. */
export type ExportFormat = "qcow2" | "vhd" | "raw" | "chunked" | "tar";
const FORMATS: readonly ExportFormat[] = ["qcow2", "vhd", "raw", "chunked", "tar"];

/** What one export run needs, however the flags were spelled. */
export interface ExportRun {
  /** A path, or an opened source (vhd-tool's VHD chains). */
  source: string | DiskSource;
  target: Endpoint;
  format: ExportFormat;
  /** Cluster size of the plan (for VHD its 2 MiB blocks); hints are read at this size. */
  clusterSize: number;
  refcountBits: number;
  /** Reads the hint, checked against the size of the disk it is for (`signal` stops it). */
  allocation?: (diskSize: number, signal?: AbortSignal) => Promise<Allocation>;
  zeroCheck?: boolean;
  base?: string;
  baseAllocation?: (diskSize: number, signal?: AbortSignal) => Promise<Allocation>;
  progress: ProgressMode;
  nbd?: NbdOptions;
  /** tar: the members' prefix (default Ref:0). */
  tarPrefix?: string;
  /** tar: the checksum members' kind (default xxhash). */
  checksum?: "xxhash" | "sha1";
  /** tar: members PREFIX%08d (vhd-tool's naming) instead of PREFIX/%08d. */
  gluePrefix?: boolean;
  /** chunked: also send the left-out clusters as zeros (vhd-tool without --prezeroed). */
  fillGaps?: boolean;
  direct?: boolean;
  /** `-o http(s)://…`: upload with PUT, and the client's flags. */
  url?: { url: string; flags: HttpFlags };
  /** Sync a file or device output before success (default true). */
  sync?: boolean;
}

// The export machinery is loaded when a command runs, so that start-up only pays
// for the command that is used.
const resolveAllocationSpec: typeof import("../headers/allocation_spec.ts").resolveAllocationSpec =
  async (...args) => (await import("../headers/allocation_spec.ts")).resolveAllocationSpec(...args);

/** Registers the export commands on `program`. */
export function registerExport(program: Command): void {
  const exportCommand = program
    .command("export")
    .description(
      "Export a raw disk (file, block device or NBD export) as a qcow2 v3 stream (or with -f vhd a\n" +
        "dynamic VHD in vhd-tool's layout, 2 MiB blocks), without a temporary file and\n" +
        "without seeking the output. All-zero clusters are left out (the bytes are those\n" +
        "of QEMU's qcow2-to-stdout.py); with --allocation only the hinted clusters are\n" +
        "read; with --diff only the clusters that differ from BASE are written.",
    )
    .argument(
      "<SOURCE>",
      "raw disk image, block device (/dev/... needs --allow-all), or NBD URI\n" +
        "(nbd://HOST[:PORT]/EXPORT, nbds://…, nbd+unix:///EXPORT?socket=PATH)",
    )
    .option(
      "-o, --output <OUT>",
      "write the image to OUT ('-' = stdout, the default); an http(s):// URL is uploaded\n" +
        "with PUT and an exact Content-Length (credentials from user:password@)",
    )
    .option(
      "--output-fd <N>",
      "write the image to inherited file descriptor N",
      fdOption("--output-fd"),
    )
    .option(
      "-f, --format <FORMAT>",
      "output format: qcow2, vhd, raw (the whole disk), chunked (vhd-tool's protocol) or\n" +
        "tar (XVA disk members)",
      "qcow2",
    )
    .option(
      "-c, --cluster-size <SIZE>",
      "qcow2 cluster size, a power of two from 512 to 2M (refused with -f vhd)",
      clusterSizeOption,
      DEFAULT_CLUSTER_SIZE,
    )
    .option(
      "-r, --refcount-bits <BITS>",
      "qcow2 refcount width: 1, 2, 4, 8, 16, 32 or 64 (refused with -f vhd)",
      refcountBitsOption,
      DEFAULT_REFCOUNT_BITS,
    )
    .option(
      "--allocation <SPEC>",
      "clusters that may hold data: a path or fd:N with allocation JSON (legacy list,\n" +
        "intervals, or 'qemu-img map --output=json'), a qcow2/VHD image file, or an NBD\n" +
        "URI (the export's block status: its allocation for a local copy of its bytes)",
    )
    .option(
      "--zero-check",
      "with --allocation or an NBD source: also leave out the clusters the hint or the\n" +
        "server's block status calls data that are all zeros (they are read twice)",
    )
    .option(
      "--diff <BASE>",
      "export only the clusters that differ from BASE (raw file, device or NBD URI)",
    )
    .option("--base-allocation <SPEC>", "clusters of BASE that may hold data (like --allocation)")
    .option(
      "--tar-prefix <PREFIX>",
      "-f tar: members are named PREFIX/%08d (an XVA names them after the VDI's object id)",
      "Ref:0",
    )
    .option(
      "--checksum <KIND>",
      "-f tar: checksum members, xxhash (.xxhash, XXH64, XAPI's default) or sha1 (.checksum)",
      "xxhash",
    )
    .option("--direct", DIRECT_HELP)
    .option("--progress", "show a progress bar on stderr")
    .option("--machine", "vhd-tool's 3-digit percentages (000…100) on stdout instead of the bar")
    .option(
      "--no-sync",
      "do not wait for the output file or device to reach its disk (fdatasync) before " +
        "reporting success",
    )
    .addHelpText(
      "after",
      "\nA file or device output is synced before success. With -o FILE or URL, SIGINT,\n" +
        "SIGTERM and SIGHUP stop the export: a FILE it created is removed, an upload says how\n" +
        "far it got, and the exit status is 128 + the signal's number.\n" +
        "\nExamples:\n" +
        "  diskstream export disk.raw > disk.qcow2\n" +
        "  diskstream export /dev/vg/lv -f tar --allocation lv.vhd --tar-prefix Ref:3 > disk.tar\n" +
        "  diskstream export new.raw --diff old.raw -f chunked | diskstream import copy-of-old.raw -f chunked\n" +
        "  diskstream export /dev/vg/lv -c 2M --allocation lv.json -o out.qcow2\n" +
        "  diskstream export new.raw --diff old.raw -o delta.qcow2\n" +
        "    (rebuild: qemu-img rebase -u -b old.raw -F raw delta.qcow2)\n" +
        "  diskstream export /dev/vg/lv -f vhd --allocation lv.json --output-fd 3\n" +
        "  diskstream export new.raw -f vhd --diff old.raw | diskstream import copy-of-old.raw --delta\n" +
        "  diskstream export /dev/vg/lv -o 'https://host/import_raw_vdi?vdi=a&format=qcow2' \\\n" +
        "    --header 'Authorization: Bearer TOKEN' --cacert ca.pem\n" +
        "  diskstream export nbd://127.0.0.1/disk -o disk.qcow2 --connections 8\n" +
        "  diskstream export nbds://host/disk --cacert ca.pem -f vhd > disk.vhd\n" +
        "  diskstream export /dev/sm/vdi --allocation nbd+unix:///vdi?socket=/run/nbd.sock",
    );
  addNbdOptions(addHttpOptions(exportCommand))
    .action(async (source: string, flags: ExportFlags, command: Command) => {
      const format = flags.format as ExportFormat;
      if (!FORMATS.includes(format)) {
        throw new UsageError(
          `-f/--format must be one of ${FORMATS.join(", ")}, got '${flags.format}'`,
        );
      }
      if (format !== "qcow2") {
        for (const [key, flag] of [["clusterSize", "-c"], ["refcountBits", "-r"]]) {
          if (command.getOptionValueSource(key) === "cli") {
            throw new UsageError(
              `${flag} applies to qcow2 only, not to -f ${format} (drop ${flag}, or use -f qcow2)`,
            );
          }
        }
      }
      if (format !== "tar") {
        for (const [key, flag] of [["tarPrefix", "--tar-prefix"], ["checksum", "--checksum"]]) {
          if (command.getOptionValueSource(key) === "cli") {
            throw new UsageError(`${flag} applies to -f tar only`);
          }
        }
      }
      if (flags.checksum !== "xxhash" && flags.checksum !== "sha1") {
        throw new UsageError(`--checksum must be xxhash or sha1, got '${flags.checksum}'`);
      }
      const cs = format === "vhd"
        ? DEFAULT_BLOCK_SIZE
        : format === "tar"
        ? 1 << 20
        : format === "qcow2"
        ? flags.clusterSize
        : DEFAULT_CLUSTER_SIZE;
      const nbd = nbdOptionsFrom(flags);
      const url = flags.output !== undefined && isHttpUrl(flags.output) ? flags.output : undefined;
      // --cacert also serves nbds:// sources, bases and allocations.
      const usesNbd = [source, flags.diff, flags.allocation, flags.baseAllocation]
        .some((e) => e !== undefined && isNbdUri(e));
      checkHttpFlags(
        usesNbd ? { ...flags, cacert: undefined } : flags,
        url !== undefined,
        "-o/--output",
      );
      if (flags.connections !== undefined && !usesNbd) {
        throw new UsageError(
          "--connections applies to NBD URIs only (a source, --diff BASE or --allocation " +
            "given as nbd://, nbds:// or nbd+unix://)",
        );
      }
      await runExport({
        source,
        target: endpointFrom(
          url === undefined ? flags.output : "-",
          flags.outputFd,
          "-o/--output and --output-fd",
        ),
        url: url === undefined ? undefined : { url, flags },
        format,
        clusterSize: cs,
        refcountBits: flags.refcountBits,
        allocation: flags.allocation === undefined
          ? undefined
          : (size, signal) =>
            resolveAllocationSpec(flags.allocation!, cs, undefined, size, { ...nbd, signal }),
        zeroCheck: flags.zeroCheck,
        base: flags.diff,
        baseAllocation: flags.baseAllocation === undefined
          ? undefined
          : (size, signal) =>
            resolveAllocationSpec(flags.baseAllocation!, cs, undefined, size, { ...nbd, signal }),
        progress: progressMode(flags),
        nbd,
        tarPrefix: flags.tarPrefix,
        checksum: flags.checksum,
        direct: flags.direct,
        sync: flags.sync,
      });
    });

  program
    .command("qcow2-to-stdout")
    .description(
      "Drop-in for XAPI's qcow2-to-stdout.py: export input_file as qcow2 on stdout,\n" +
        "optionally only what differs from --diff BASE, with allocation from\n" +
        "'qemu-img map/info --output=json' on inherited file descriptors.",
    )
    .argument("<input_file>", "raw disk image or block device")
    .option("-f <input_format>", "format of the input file (only raw)", "raw")
    .option(
      "-c <cluster_size>",
      "qcow2 cluster size in bytes, a power of two from 512 to 2097152 (64K, 2M accepted too)",
      clusterSizeOption,
      DEFAULT_CLUSTER_SIZE,
    )
    .option(
      "-r <refcount_bits>",
      "refcount width in bits: 1, 2, 4, 8, 16, 32 or 64",
      refcountBitsOption,
      DEFAULT_REFCOUNT_BITS,
    )
    .option("--diff <diff_file_name>", "export only the clusters that differ from this file")
    .option(
      "--json-header-map <FD>",
      "qemu-img map --output=json of input_file",
      fdOption("--json-header-map"),
    )
    .option(
      "--json-header-info <FD>",
      "qemu-img info --output=json of input_file",
      fdOption("--json-header-info"),
    )
    .option(
      "--json-header-diff-map <FD>",
      "qemu-img map --output=json of the diff file",
      fdOption("--json-header-diff-map"),
    )
    .option(
      "--json-header-diff-info <FD>",
      "qemu-img info --output=json of the diff file",
      fdOption("--json-header-diff-info"),
    )
    .option("--json-header", "allocation JSON of input_file on stdin")
    .option(
      "--json-header-diff <FD>",
      "allocation JSON of the diff file",
      fdOption("--json-header-diff"),
    )
    .option("-d", "input_file as an external data file (not supported)")
    .option("-R", "data_file_raw (not supported)")
    .action(async (input: string, flags: XapiFlags) => {
      if (flags.d || flags.R) {
        throw new UnsupportedError("external data files (-d, -R) are not supported");
      }
      if (flags.f !== "raw") {
        throw new UnsupportedError(`input format '${flags.f}' is not supported: only raw`);
      }
      const cs = flags.c;
      const hint = (map: number | undefined, info: number | undefined, json?: string) => {
        if (map === undefined && info === undefined && json === undefined) return undefined;
        if (map === undefined && json === undefined) {
          throw new UsageError("a --json-header-*info descriptor needs its --json-header-*map");
        }
        return async (size: number) =>
          await resolveAllocationSpec(
            json ?? `fd:${map}`,
            cs,
            info === undefined ? undefined : await readInfo(`fd:${info}`),
            size,
          );
      };
      await runExport({
        source: input,
        target: { kind: "std" },
        format: "qcow2",
        clusterSize: cs,
        refcountBits: flags.r,
        allocation: hint(
          flags.jsonHeaderMap,
          flags.jsonHeaderInfo,
          flags.jsonHeader ? "fd:0" : undefined,
        ),
        base: flags.diff,
        baseAllocation: hint(
          flags.jsonHeaderDiffMap,
          flags.jsonHeaderDiffInfo,
          flags.jsonHeaderDiff === undefined ? undefined : `fd:${flags.jsonHeaderDiff}`,
        ),
        progress: "none",
      });
    });
}

interface XapiFlags {
  f: string;
  c: number;
  r: number;
  diff?: string;
  jsonHeaderMap?: number;
  jsonHeaderInfo?: number;
  jsonHeaderDiffMap?: number;
  jsonHeaderDiffInfo?: number;
  jsonHeader?: boolean;
  jsonHeaderDiff?: number;
  d?: boolean;
  R?: boolean;
}

async function readInfo(spec: string): Promise<ImageInfoJson> {
  const { parseImageInfo, readSpecText } = await import("../headers/allocation_spec.ts");
  return parseImageInfo(await readSpecText(spec), `image info ${spec}`);
}

/** The size of a raw disk, learned before a hint for it is read (hints are checked against it). */
async function diskSize(
  source: string | DiskSource,
  nbd?: NbdOptions,
  signal?: AbortSignal,
): Promise<number> {
  if (typeof source !== "string") return source.size;
  const { openSource } = await import("../export/plan.ts");
  // A file, a device or an NBD export (one connection, for its size).
  const src = await openSource(source, { nbd: { ...nbd, connections: 1 }, signal }, false);
  try {
    return src.size;
  } finally {
    src.close();
  }
}

/** Runs one export (also used by `vhd-tool stream`). */
export async function runExport(run: ExportRun): Promise<void> {
  noteDirectWithoutFfi(run.direct);
  if (run.progress === "machine" && run.target.kind === "std" && !run.url) {
    throw new UsageError(
      "--machine prints progress on stdout, so the image must go elsewhere: use -o FILE or --output-fd N",
    );
  }
  const nbdSource = typeof run.source === "string" && isNbdUri(run.source);
  if (run.zeroCheck && run.allocation === undefined && !nbdSource) {
    throw new UsageError(
      "--zero-check goes with --allocation or an NBD source (otherwise every cluster is checked)",
    );
  }
  if (run.base === undefined && run.baseAllocation !== undefined) {
    throw new UsageError("a base allocation (--base-allocation) needs --diff BASE");
  }
  const [{ openOutput }, { createProgress }] = await Promise.all([
    import("../io/stream.ts"),
    import("../progress.ts"),
  ]);
  // Refuse a terminal before any work.
  if (run.target.kind === "std" && !run.url) await openOutput(run.target);
  // Writing a file or uploading: a signal stops the export cleanly (the file it created
  // is removed; an upload says how far it got).
  if (run.target.kind === "path" || run.url) {
    const { stoppableBySignals } = await import("./signals.ts");
    return await stoppableBySignals((signal) => exportTo(run, createProgress, signal));
  }
  await exportTo(run, createProgress);
}

async function exportTo(
  run: ExportRun,
  createProgress: typeof import("../progress.ts").createProgress,
  signal?: AbortSignal,
): Promise<void> {
  const http = run.url && await httpOptionsOf(run.url.flags);
  const options = {
    signal,
    sync: run.sync,
    allocation: run.allocation &&
      await run.allocation(await diskSize(run.source, run.nbd, signal), signal),
    zeroCheck: run.zeroCheck,
    base: run.base,
    baseAllocation: run.baseAllocation &&
      await run.baseAllocation(await diskSize(run.base!, run.nbd, signal), signal),
    direct: run.direct,
    progress: createProgress(run.progress, "export"),
    nbd: run.nbd,
    // writeTo without FFI and an upload write each chunk before reading the next.
    reuseBuffers: true,
  };
  const planned = await plannedExportOf(run, options);
  if (run.url && http) {
    const [{ httpPut, redactUrl }, { contentTypeOf }, { formatBytes }] = await Promise.all([
      import("../http/client.ts"),
      import("../http/content_type.ts"),
      import("../size.ts"),
    ]);
    const total = planned.layout.fileSize;
    let sent = 0;
    try {
      return await httpPut(run.url.url, planned.stream, total, {
        ...http,
        signal,
        onRedirect: noteRedirect,
        contentType: contentTypeOf(run.format),
        onProgress: (n) => sent = n,
      });
    } catch (err) {
      if (!(err instanceof InterruptedError)) throw err;
      throw err.retell(
        `${err.message}: the upload to ${redactUrl(run.url.url)} stopped after ${sent} of ` +
          `${total} bytes (${formatBytes(sent)} of ${formatBytes(total)}); the server holds an ` +
          `incomplete image`,
      );
    }
  }
  await planned.writeTo(run.target);
}

/** The planned export of `run`'s format. */
async function plannedExportOf(
  run: ExportRun,
  options: import("../export/options.ts").StreamExportOptions,
): Promise<
  {
    stream: ReadableStream<Uint8Array>;
    layout: { fileSize: number };
    writeTo(target: Endpoint): Promise<void>;
  }
> {
  switch (run.format) {
    case "vhd":
      return (await import("../export/vhd.ts")).exportVhd(run.source, options);
    case "raw":
      return (await import("../export/wire.ts")).exportRaw(run.source, options);
    case "chunked":
      return (await import("../export/wire.ts")).exportChunked(run.source, {
        ...options,
        fillGaps: run.fillGaps,
      });
    case "tar": // the prefix is checked (a usage error) before anything is read
      return (await import("../export/wire.ts")).exportTar(run.source, {
        ...options,
        prefix: run.tarPrefix ?? "Ref:0",
        checksum: run.checksum,
        gluePrefix: run.gluePrefix,
      });
    default:
      return (await import("../export/export.ts")).exportQcow2(run.source, {
        ...options,
        clusterSize: run.clusterSize,
        refcountBits: run.refcountBits,
      });
  }
}
