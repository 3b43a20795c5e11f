/**
 * `xva list XVA|-` and `xva extract XVA|- -o DIR`: the disks of an XVA (a
 * XenServer/XCP-ng VM export) without a running XAPI.
 *
 * @module
 */
import type { Command } from "commander";
import { escapeControls, UnsupportedError, UsageError } from "../errors.ts";
import { formatBytes } from "../size.ts";
import { progressMode } from "./options.ts";
import type { XvaListing } from "../xva/xva.ts";

/** Registers `xva list` and `xva extract` on `program`. */
export function registerXva(program: Command): void {
  const group = program
    .command("xva")
    .description("The disks of an XVA (XenServer/XCP-ng VM export): list them, extract them.");

  group.command("list")
    .description(
      "Print the VM and its disks from ova.xml: each disk's ref (the prefix of its members), " +
        "uuid, name, virtual size and which members are present. A file is listed from its " +
        "headers alone; '-' reads the whole stream.",
    )
    .argument("<XVA>", "the XVA file, or '-' for stdin")
    .option("--json", "print JSON for scripts")
    .action(async (xva: string, opts: { json?: boolean }) => {
      const listing = await list(xva);
      console.log(opts.json ? JSON.stringify(listing) : formatListing(listing));
    });

  group.command("extract")
    .description(
      "Write each disk of the XVA to DIR as a raw file named after its ref (Ref:3 → " +
        "DIR/Ref_3.raw), sparse, in one pass over the stream; every .xxhash/.checksum " +
        "member is verified.",
    )
    .argument("<XVA>", "the XVA file, or '-' for stdin")
    .requiredOption("-o, --output <DIR>", "directory for the disks (created if missing)")
    .option(
      "--disk <REF>",
      "extract only this disk (repeatable; refs as 'xva list' prints them)",
      (v: string, acc: string[] = []) => [...acc, v],
    )
    .option(
      "-f, --format <FORMAT>",
      "raw (from a file or a pipe), qcow2 or vhd (from a file: its checksums are verified " +
        "in a first pass, then each disk streams from its members in place)",
      "raw",
    )
    .option("--ignore-checksums", "do not verify the checksum members")
    .option("--progress", "show a progress bar on stderr")
    .addHelpText(
      "after",
      "\nExamples:\n" +
        "  diskstream xva list vm.xva\n" +
        "  diskstream xva extract vm.xva -o disks/ --disk Ref:3\n" +
        "  ssh host cat /srv/vm.xva | diskstream xva extract - -o disks/",
    )
    .action(async (xva: string, opts: ExtractFlags) => await extract(xva, opts));
}

interface ExtractFlags {
  output: string;
  disk?: string[];
  format: string;
  ignoreChecksums?: boolean;
  progress?: boolean;
}

async function list(xva: string): Promise<XvaListing> {
  const mod = await import("../xva/xva.ts");
  if (xva !== "-") return await mod.listXvaFile(xva);
  refuseTerminal();
  const { ChunkStream } = await import("../io/chunk_stream.ts");
  const { openInput } = await import("../io/stream.ts");
  const input = await openInput({ kind: "std" }, { blocking: true });
  return await mod.listXvaStream(new ChunkStream(input.stream), "stdin");
}

function refuseTerminal(): void {
  if (Deno.stdin.isTerminal()) {
    throw new UsageError("refusing to read an XVA from a terminal: pipe it in or give a file");
  }
}

function ranges(present: [number, number][]): string {
  if (present.length === 0) return "none";
  const shown = present.slice(0, 8).map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`));
  return shown.join(",") + (present.length > 8 ? `,… (${present.length} runs)` : "");
}

/** The human listing of `xva list` (control characters from the XVA escaped). */
export function formatListing(l: XvaListing): string {
  return listingLines(l).map(escapeControls).join("\n");
}

function listingLines(l: XvaListing): string[] {
  const lines: string[] = [];
  const v = l.version;
  if (v.product_brand || v.product_version || v.hostname) {
    lines.push(
      `exported by ${[v.product_brand, v.product_version].filter(Boolean).join(" ") || "XAPI"}` +
        (v.hostname ? ` on ${v.hostname}` : "") +
        (v.export_vsn ? ` (export_vsn ${v.export_vsn})` : ""),
    );
  }
  for (const vm of l.vms) {
    lines.push(
      `VM ${JSON.stringify(vm.name ?? "")} ${vm.uuid ?? ""}${vm.isSnapshot ? " (snapshot)" : ""}`,
    );
  }
  for (const d of l.disks) {
    lines.push(
      `disk ${d.ref}  ${d.uuid ?? "-"}  ${JSON.stringify(d.name ?? "")}  ` +
        `${d.virtualSize} bytes (${formatBytes(d.virtualSize)})` +
        (d.devices.length ? `  device ${d.devices.join(",")}` : ""),
    );
    lines.push(
      `  members ${ranges(d.present)}: ${d.members} of ${d.expectedMembers}, ` +
        `${formatBytes(d.dataBytes)} of data` +
        (d.checksums.length ? `, checksums ${d.checksums.join("+")}` : ", no checksums") +
        (d.members === 0 ? " (not in this XVA)" : ""),
    );
  }
  if (l.strayPrefixes.length) {
    lines.push(`members that belong to no disk of ova.xml: ${l.strayPrefixes.join(", ")}`);
  }
  return lines;
}

async function extract(xva: string, f: ExtractFlags): Promise<void> {
  if (!["raw", "qcow2", "vhd"].includes(f.format)) {
    throw new UsageError(`-f/--format must be raw, qcow2 or vhd, got '${f.format}'`);
  }
  if (f.format !== "raw") {
    if (xva === "-") {
      throw new UnsupportedError(
        `xva extract -f ${f.format} needs the XVA as a file (its members are read twice); ` +
          `from a pipe, extract raw`,
      );
    }
    const [{ extractXvaFileAs }, { createProgress }, { stoppableBySignals }] = await Promise.all([
      import("../export/xva.ts"),
      import("../progress.ts"),
      import("./signals.ts"),
    ]);
    report(
      await stoppableBySignals((signal) =>
        extractXvaFileAs(xva, f.output, f.format as "qcow2" | "vhd", {
          disks: f.disk,
          ignoreChecksums: f.ignoreChecksums,
          progress: createProgress(progressMode(f), "extract"),
          signal,
        })
      ),
    );
    return;
  }
  if (xva === "-") refuseTerminal();
  const [
    { extractXva },
    { openInput },
    { openPipeInput },
    { ChunkStream },
    { createProgress },
    { stoppableBySignals },
  ] = await Promise.all([
    import("../import/xva.ts"),
    import("../io/stream.ts"),
    import("../io/pipe_input.ts"),
    import("../io/chunk_stream.ts"),
    import("../progress.ts"),
    import("./signals.ts"),
  ]);
  // A pipe is waited on with poll (with FFI), so that a signal is handled while it is
  // silent; blocking reads would hold the signal until the next bytes arrive.
  const pipe = xva === "-" ? openPipeInput({ fd: 0 }, "stdin") : null;
  // SIGINT, SIGTERM, SIGHUP: the disk files made so far (sparse, at their full size,
  // so they would look complete) are removed and the error says so.
  try {
    const input = pipe ??
      (await openInput(xva === "-" ? { kind: "std" } : { kind: "path", path: xva }, {
        blocking: true,
      })).stream;
    const r = await stoppableBySignals((signal) =>
      extractXva(new ChunkStream(input, signal), f.output, {
        disks: f.disk,
        ignoreChecksums: f.ignoreChecksums,
        progress: createProgress(progressMode(f), "extract"),
        label: xva === "-" ? "stdin" : xva,
        signal,
      })
    );
    report(r);
  } finally {
    pipe?.close();
  }
}

function report(r: import("../import/xva.ts").XvaExtractResult): void {
  for (const d of r.extracted) {
    const sums = Object.entries(d.verified).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`);
    console.error(
      `${escapeControls(d.ref)} → ${d.path} (${formatBytes(d.virtualSize)}, ` +
        `${formatBytes(d.dataBytes)} of data` +
        `${sums.length ? `, checksums verified: ${sums.join(", ")}` : ""})`,
    );
  }
  for (const ref of r.absent) {
    console.error(`${escapeControls(ref)}: no member in this XVA (not extracted)`);
  }
}
