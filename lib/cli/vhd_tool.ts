/**
 * `diskstream vhd-tool stream|serve|read_headers|read_headers_interval`: vhd-tool's
 * command line as XAPI's `Vhd_tool_wrapper` calls it, mapped onto export and import,
 * so that a two-line `vhd-tool` shim (`exec diskstream vhd-tool "$@"`) can stand in
 * for it. Flags vhd-tool has and diskstream cannot honour (NBD, TLS, sockets) are
 * refused by name, never ignored.
 *
 * @module
 */
import { type Command, Option } from "commander";
import { escapeControls, UsageError } from "../errors.ts";
import type { Endpoint } from "../io/stream.ts";
import type { ProgressMode } from "../progress.ts";
import type { Allocation } from "../alloc/allocation.ts";
import type { DiskSource } from "../io/endpoint.ts";
import { runExport } from "./export.ts";
import { printHeaders } from "./headers.ts";
import { runImport } from "./import.ts";
import { fdOption, sizeOption } from "./options.ts";
import { inheritedFd } from "../io/descriptor.ts";

interface CommonFlags {
  verbose?: boolean;
  direct?: boolean;
  unbuffered?: boolean;
  path: string;
}

interface TransferFlags extends CommonFlags {
  progress?: boolean;
  machine?: boolean;
  prezeroed?: boolean;
  tarFilenamePrefix?: string;
}

interface StreamFlags extends TransferFlags {
  source: string;
  relativeTo?: string;
  sourceFormat: string;
  sourceProtocol?: string;
  destination: string;
  destinationFd?: number;
  destinationFormat: string;
  destinationProtocol?: string;
}

interface ServeFlags extends TransferFlags {
  source: string;
  sourceFd?: number;
  sourceFormat: string;
  sourceProtocol?: string;
  destination: string;
  destinationFd?: number;
  destinationFormat: string;
  destinationSize?: number;
  ignoreChecksums?: boolean;
}

/**
 * vhd-tool's flags that diskstream refuses by name, with why (bad usage, status 2, like
 * an unknown flag: the call cannot run as given).
 */
const REFUSED: [flag: string, takesValue: boolean, why: string][] = [
  ["--good-ciphersuites", true, "TLS destinations are not supported"],
  ["--verify-dest", false, "TLS destinations are not supported"],
  ["--sni", true, "TLS destinations are not supported"],
  ["--cert-bundle-path", true, "TLS destinations are not supported"],
];

/** vhd-tool's options common to every command (`Common.make`). */
function commonOptions(c: Command): Command {
  return c
    .option("-v, --verbose", "accepted (vhd-tool's verbose output)")
    .option("--direct", "keep the disk's data out of the page cache (as export/import --direct)")
    .option("--unbuffered", "the same as --direct")
    .option(
      "--path <DIRS>",
      "colon-separated directories where VHD parents are looked up when they are not " +
        "next to the child, as vhd-tool does",
      ".",
    );
}

/**
 * vhd-tool's options of `stream` and `serve` only: `read_headers` refuses them as
 * vhd-tool does (unknown options), rather than accepting and ignoring them.
 */
function transferOptions(c: Command): Command {
  return c
    .option("--progress", "report progress (a bar, or with --machine 3-digit percentages)")
    .option("--machine", "with --progress: vhd-tool's 000…100 on stdout, for XAPI")
    .option("--prezeroed", "the destination already reads as zeros")
    .option(
      "--tar-filename-prefix <PREFIX>",
      "tar protocol: the disk members' prefix: stream names them PREFIX%08d (as vhd-tool); " +
        "serve takes members whose names start with it",
    );
}

function refuseOptions(c: Command): Command {
  for (const [flag, takesValue, why] of REFUSED) {
    c.addOption(
      new Option(takesValue ? `${flag} <VALUE>` : flag, `refused: ${why}`).hideHelp().argParser(
        () => {
          throw new UsageError(`vhd-tool's ${flag} is not supported: ${why}`);
        },
      ),
    );
    if (!takesValue) {
      c.on(`option:${flag.slice(2)}`, () => {
        throw new UsageError(`vhd-tool's ${flag} is not supported: ${why}`);
      });
    }
  }
  return c;
}

/** vhd-tool's progress: only with --progress; --machine picks the 3-digit form. */
function progressOf(f: TransferFlags): ProgressMode {
  if (!f.progress) return "none";
  return f.machine ? "machine" : "bar";
}

/** vhd-tool's endpoint strings: `stdout:`, `stdin:`, `null:`, `fd://N`, `file://PATH`, a path. */
function endpointOf(text: string, role: "source" | "destination"): Endpoint {
  if (text === "stdout:" || text === "stdin:") return { kind: "std" };
  if (text === "null:") return { kind: "path", path: "/dev/null" };
  const fd = /^fd:(?:\/\/)?(\d+)$/.exec(text);
  if (fd) return { kind: "fd", fd: inheritedFd(Number(fd[1]), `--${role} ${text}`) };
  if (text.startsWith("file://")) return { kind: "path", path: fileUrlPath(text, role) };
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(text);
  if (scheme && scheme[1].length > 1) {
    throw new UsageError(
      `vhd-tool's ${scheme[1]}: ${role}s are not supported (${text}): use a file, a device, ` +
        `fd://N, stdin:/stdout: or null:`,
    );
  }
  return { kind: "path", path: text };
}

/**
 * The path of a `file://` URL, %-escapes decoded (vhd-tool's `Uri.path`). A host other
 * than `localhost` (`file://disk.raw` is not the relative path `disk.raw`), a query, a
 * fragment, a bad %-escape or a NUL byte is refused rather than guessed at.
 */
function fileUrlPath(text: string, role: "source" | "destination"): string {
  const refuse = (why: string) =>
    new UsageError(
      `--${role} ${escapeControls(text)}: ${why}: give file:///ABSOLUTE/PATH (three slashes; ` +
        `'%', '?' and '#' in the path written as %25, %3F and %23)`,
    );
  const rest = text.slice("file://".length);
  if (/[?#]/.test(rest)) throw refuse("a query or fragment names no file");
  const slash = rest.indexOf("/");
  const host = slash < 0 ? rest : rest.slice(0, slash);
  if (host !== "" && host.toLowerCase() !== "localhost") {
    throw refuse(`'${escapeControls(host)}' stands where a host name goes, not in the path`);
  }
  if (slash < 0) throw refuse("the URL holds no path");
  let path: string;
  try {
    path = decodeURIComponent(rest.slice(slash));
  } catch {
    throw refuse("a malformed %-escape");
  }
  if (path.includes("\0")) throw refuse("a path cannot hold a NUL byte (%00)");
  return path;
}

function protocolOf(p: string | undefined, flag: string, allowed: string[]): string {
  const v = p ?? "none";
  if (v === "nbd") {
    throw new UsageError(`vhd-tool's ${flag} nbd is not supported yet (NBD)`);
  }
  if (v === "human") {
    throw new UsageError(`vhd-tool's ${flag} human is not supported (a debugging dump)`);
  }
  if (!allowed.includes(v)) {
    throw new UsageError(`${flag} must be one of ${allowed.join(", ")}, got '${v}'`);
  }
  return v;
}

/** Registers `vhd-tool` and its commands on `program`. */
export function registerVhdTool(program: Command): void {
  const group = program
    .command("vhd-tool")
    .description(
      "vhd-tool's command line as XAPI calls it (stream, serve, read_headers, " +
        "read_headers_interval), so that a 'vhd-tool' shim running " +
        "'exec diskstream vhd-tool \"$@\"' can take its place.",
    );

  refuseOptions(transferOptions(commonOptions(
    group.command("stream")
      .description(
        "Export: vhd-tool stream. --source-format raw (SOURCE is a raw file or device), vhd " +
          "(SOURCE is a VHD read through its parent chain) or hybrid (SOURCE is RAWDEV:IMAGE: " +
          "bytes from RAWDEV, allocation from the VHD or qcow2 IMAGE's chain) or nbdhybrid " +
          "(SOURCE is RAWDEV:NBDSERVER:EXPORT:SIZE: bytes from RAWDEV, allocation from the " +
          "block status of EXPORT on the NBD server's Unix socket); --relative-to " +
          "BASE.vhd keeps what changed since BASE; " +
          "--destination-format raw|vhd|qcow2; --destination-protocol none|chunked|tar.",
      )
      .option(
        "--source <SOURCE>",
        "the disk: a path, RAWDEV:IMAGE for hybrid, RAWDEV:NBDSERVER:EXPORT:SIZE for nbdhybrid",
      )
      .option(
        "--source-format <FMT>",
        "raw, vhd (SOURCE is a VHD, read through its parent chain), hybrid or nbdhybrid",
        "raw",
      )
      .option("--source-protocol <P>", "none")
      .option(
        "--relative-to <BASE>",
        "hybrid or vhd: only what changed since this ancestor VHD (in the chain)",
      )
      .option("--destination <DEST>", "stdout:, null:, fd://N, file://PATH or a path", "stdout:")
      .addOption(
        new Option("--destination-fd <N>", "write to inherited descriptor N")
          .argParser(fdOption("--destination-fd"))
          .conflicts("destination"),
      )
      .option("--destination-format <FMT>", "raw, vhd or qcow2", "raw")
      .option("--destination-protocol <P>", "none, chunked or tar"),
  )))
    .action(async (f: StreamFlags) => await stream(f));

  refuseOptions(transferOptions(commonOptions(
    group.command("serve")
      .description(
        "Import: vhd-tool serve. Reads --source-fd N (or --source) in --source-format raw " +
          "or vhd, --source-protocol none, chunked or tar, and writes the raw disk to " +
          "--destination file://PATH (a file or block device).",
      )
      .option("--source <SOURCE>", "stdin:, fd://N, file://PATH or a path", "stdin:")
      .addOption(
        new Option("--source-fd <N>", "read inherited descriptor N")
          .argParser(fdOption("--source-fd"))
          .conflicts("source"),
      )
      .option("--source-format <FMT>", "raw or vhd", "raw")
      .option("--source-protocol <P>", "none, chunked or tar (required)")
      .option("--destination <DEST>", "file://PATH", "stdout:")
      .option("--destination-fd <N>", "refused: serve writes to a path")
      .option("--destination-format <FMT>", "raw", "raw")
      .option(
        "--destination-size <BYTES>",
        "the disk's size (default: the destination's size)",
        sizeOption("--destination-size"),
      )
      .option("--ignore-checksums", "tar: do not verify the checksum members"),
  )))
    .action(async (f: ServeFlags) => await serve(f));

  for (
    const [name, legacy] of [["read_headers", true], ["read_headers_interval", false]] as const
  ) {
    commonOptions(
      group.command(name)
        .description(`vhd-tool ${name} FILE: the allocation JSON of a VHD (or qcow2) image.`)
        .argument("<FILE>", "VHD or qcow2 image"),
    ).action(async (file: string, f: CommonFlags) =>
      // Parents are looked up in --path too, as stream does.
      await printHeaders(file, legacy, f.path.split(":").filter((d) => d !== ""))
    );
  }
}

async function stream(f: StreamFlags): Promise<void> {
  protocolOf(f.sourceProtocol, "--source-protocol", ["none"]);
  const protocol = protocolOf(f.destinationProtocol, "--destination-protocol", [
    "none",
    "chunked",
    "tar",
  ]);
  const dformat = f.destinationFormat;
  if (!["raw", "vhd", "qcow2"].includes(dformat)) {
    throw new UsageError(`--destination-format must be raw, vhd or qcow2, got '${dformat}'`);
  }
  if (protocol !== "none" && dformat !== "raw") {
    throw new UsageError(
      `--destination-protocol ${protocol} carries raw data: use --destination-format raw`,
    );
  }
  if (f.source === undefined) {
    throw new UsageError("vhd-tool stream needs --source (a raw file or device, or RAWDEV:IMAGE)");
  }
  const target = f.destinationFd !== undefined
    ? { kind: "fd" as const, fd: f.destinationFd }
    : endpointOf(f.destination, "destination");
  const format = protocol === "none"
    ? dformat as "raw" | "vhd" | "qcow2"
    : protocol as "chunked" | "tar";
  const cs = format === "vhd" ? 2 << 20 : format === "tar" ? 1 << 20 : 65536;
  let source: string | DiskSource = f.source;
  let allocation: ((size: number, signal?: AbortSignal) => Promise<Allocation>) | undefined;
  switch (f.sourceFormat) {
    case "raw":
      if (f.relativeTo !== undefined) {
        throw new UsageError("--relative-to needs --source-format hybrid (RAWDEV:IMAGE)");
      }
      break;
    case "hybrid": {
      const colon = f.source.indexOf(":");
      if (colon <= 0 || colon === f.source.length - 1) {
        throw new UsageError(
          `a hybrid --source is RAWDEV:IMAGE (raw device, then its VHD or qcow2), got '${f.source}'`,
        );
      }
      source = f.source.slice(0, colon);
      const image = f.source.slice(colon + 1);
      const base = f.relativeTo;
      const dirs = f.path.split(":").filter((d) => d !== "");
      allocation = async () => {
        const { readAllocationAbove, readImageAllocation } = await import(
          "../headers/image_allocation.ts"
        );
        const a = base === undefined
          ? await readImageAllocation(image, dirs)
          : await readAllocationAbove(image, base, dirs);
        const set = a.clusters;
        return set.clusterSize === cs ? a : { ...a, clusters: set.remap(cs, a.virtualSize) };
      };
      if (base !== undefined && format === "raw") {
        throw new UsageError(
          "--relative-to with a raw destination: a raw stream cannot say what is unchanged " +
            "(use --destination-protocol chunked, or --destination-format vhd)",
        );
      }
      break;
    }
    case "nbdhybrid": {
      // RAWDEV:NBDSERVER:EXPORT:SIZE: bytes from the device, allocation from the block
      // status of EXPORT on the NBD server's Unix socket (XAPI's own NBD server).
      const parts = f.source.split(":");
      const size = parts.at(-1) ?? "";
      if (parts.length < 4 || !parts[0] || !/^\d{1,16}$/.test(size) || !parts.at(-3)) {
        throw new UsageError(
          "an nbdhybrid --source is RAWDEV:NBDSERVER:EXPORT:SIZE (raw device, the NBD " +
            `server's Unix socket, the export's name, its size in bytes), got '${f.source}'`,
        );
      }
      if (f.relativeTo !== undefined) {
        throw new UsageError("--relative-to needs --source-format hybrid (RAWDEV:IMAGE)");
      }
      source = parts[0];
      const { nbdUnixUri } = await import("../nbd/uri.ts");
      const uri = nbdUnixUri(parts.slice(1, -2).join(":"), parts.at(-2)!);
      allocation = async (_size, signal) => {
        const { nbdAllocation } = await import("../nbd/allocation.ts");
        const a = await nbdAllocation(uri, cs, { signal });
        if (a.virtualSize !== Number(size)) {
          throw new UsageError(
            `the nbdhybrid --source says ${size} bytes, but ${uri} holds ${a.virtualSize}`,
          );
        }
        return a;
      };
      break;
    }
    case "vhd": {
      const dirs = f.path.split(":").filter((d) => d !== "");
      const { VhdChainSource } = await import("../headers/vhd_source.ts");
      source = await VhdChainSource.open(f.source, dirs);
      const base = f.relativeTo;
      if (base !== undefined) {
        if (format === "raw") {
          throw new UsageError(
            "--relative-to with a raw destination: a raw stream cannot say what is unchanged " +
              "(use --destination-protocol chunked, or --destination-format vhd)",
          );
        }
        allocation = async () => {
          const { readAllocationAbove } = await import("../headers/image_allocation.ts");
          const a = await readAllocationAbove(f.source, base, dirs);
          return { ...a, clusters: a.clusters.remap(cs, a.virtualSize) };
        };
      }
      break;
    }
    default:
      throw new UsageError(
        `--source-format must be raw, vhd, hybrid or nbdhybrid, got '${f.sourceFormat}'`,
      );
  }
  await runExport({
    source,
    target,
    format,
    clusterSize: cs,
    refcountBits: 16,
    allocation,
    progress: progressOf(f),
    tarPrefix: f.tarFilenamePrefix ?? "",
    gluePrefix: true, // vhd-tool names its members PREFIX%08d
    checksum: "sha1", // vhd-tool's tar protocol writes SHA-1 .checksum members
    // vhd-tool's chunked stream sets every byte unless --prezeroed; a diff keeps its gaps.
    fillGaps: format === "chunked" && !f.prezeroed && f.relativeTo === undefined,
    direct: f.direct || f.unbuffered,
  });
}

async function serve(f: ServeFlags): Promise<void> {
  const protocol = f.sourceProtocol;
  if (protocol === undefined) {
    throw new UsageError("vhd-tool serve needs --source-protocol (none, chunked or tar)");
  }
  protocolOf(protocol, "--source-protocol", ["none", "chunked", "tar"]);
  if (!["raw", "vhd"].includes(f.sourceFormat)) {
    throw new UsageError(`--source-format must be raw or vhd, got '${f.sourceFormat}'`);
  }
  if (f.sourceFormat === "vhd" && protocol !== "none") {
    throw new UsageError(`--source-format vhd goes with --source-protocol none`);
  }
  if (f.destinationFormat !== "raw") {
    throw new UsageError(`--destination-format must be raw, got '${f.destinationFormat}'`);
  }
  if (f.destinationFd !== undefined) {
    throw new UsageError(
      "vhd-tool serve --destination-fd is not supported: give --destination file://PATH",
    );
  }
  const dest = endpointOf(f.destination, "destination");
  if (dest.kind !== "path" || dest.path === "/dev/null") {
    throw new UsageError(
      `vhd-tool serve writes a file or block device: give --destination file://PATH, got '${f.destination}'`,
    );
  }
  const source = f.sourceFd !== undefined
    ? { kind: "fd" as const, fd: f.sourceFd }
    : endpointOf(f.source, "source");
  // vhd-tool sizes the disk by --destination-size, else by the destination itself.
  let size = f.destinationSize;
  if (size === undefined && f.sourceFormat === "raw") {
    const { openDiskSource } = await import("../io/disk_source.ts");
    try {
      const d = await openDiskSource(dest.path);
      d.close();
      size = d.size;
    } catch {
      // a new file: its size is the stream's (raw, tar) or must be given (chunked)
    }
    if (size === 0) size = undefined;
  }
  if (size === undefined && protocol === "chunked") {
    throw new UsageError(
      `${escapeControls(dest.path)} is new or empty and a chunked stream does not say the ` +
        `disk's size: give --destination-size`,
    );
  }
  await runImport({
    dest: dest.path,
    source,
    format: f.sourceFormat === "vhd" ? "vhd" : protocol === "none" ? "raw" : protocol as
      | "chunked"
      | "tar",
    size,
    sizeOrigin: f.destinationSize !== undefined
      ? "--destination-size"
      : `the size of ${escapeControls(dest.path)}`,
    prezeroed: f.prezeroed,
    progress: progressOf(f),
    // vhd-tool strips the prefix and takes the basename: an empty one accepts any.
    tarPrefix: f.tarFilenamePrefix === "" ? undefined : f.tarFilenamePrefix,
    ignoreChecksums: f.ignoreChecksums,
    direct: f.direct || f.unbuffered,
  });
}
