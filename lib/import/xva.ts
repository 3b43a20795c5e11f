/**
 * `xva extract`: the disks of an XVA written as raw files, in one pass over the
 * stream (a pipe or a file), every checksum verified.
 *
 * @module
 */
import { join } from "node:path";
import {
  describeIoError,
  DiskstreamError,
  escapeControls,
  InterruptedError,
  UsageError,
} from "../errors.ts";
import { ChunkStream } from "../io/chunk_stream.ts";
import type { ProgressSink } from "../progress.ts";
import type { ChecksumKind } from "../xva/checksum.ts";
import { decodeXvaDisk } from "../xva/disk.ts";
import type { OvaManifest } from "../xva/ova.ts";
import { TarReader } from "../xva/tar.ts";
import { diskFileName, OVA_SIZE, readOvaMember, walkXvaDisks } from "../xva/xva.ts";
import { RawDestination } from "./raw_destination.ts";

/** Options of {@link extractXva}. */
export interface XvaExtractOptions {
  /** The refs of the disks to extract (default: every disk in the stream). */
  disks?: string[];
  /** Do not verify the checksums. */
  ignoreChecksums?: boolean;
  /** Receives progress in bytes of the disks. */
  progress?: ProgressSink;
  /** Names the input in messages. */
  label?: string;
  /**
   * Stops the extraction when aborted (with an `InterruptedError` as its reason): the
   * files it created are removed and the error says so.
   */
  signal?: AbortSignal;
}

/** A disk written by {@link extractXva}. */
export interface XvaExtracted {
  ref: string;
  name: string | null;
  path: string;
  virtualSize: number;
  dataBytes: number;
  verified: Record<ChecksumKind, number>;
}

/** What {@link extractXva} did. */
export interface XvaExtractResult {
  manifest: OvaManifest;
  extracted: XvaExtracted[];
  /** Disks of ova.xml that had no member in the stream. */
  absent: string[];
}

/**
 * Writes the disks of the XVA arriving on `stream` into `dir` as raw files named
 * after their refs (`Ref:3` → `Ref_3.raw`; see `diskFileName`), sparse, in one pass.
 * Refuses an existing output file (before writing anything), two disks whose refs make
 * the same file name, a `--disk` that ova.xml does not name or that has no member, and
 * everything {@link decodeXvaDisk} refuses (checksums, order, sizes); a refusal removes
 * the files this extraction created.
 *
 * @example
 * ```ts
 * import { exportTar, parseOvaXml } from "@diskstream/diskstream";
 * import { extractXva } from "./xva.ts";
 * import { tarHeader } from "../xva/tar.ts";
 * import assert from "node:assert/strict";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(2 << 20).fill(3);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
 * const xml = new TextEncoder().encode(`<value><struct>${m("objects", "<array><data>" +
 *   `<value><struct>${m("class", "VDI")}${m("id", "Ref:5")}` +
 *   `${m("snapshot", `<struct>${m("virtual_size", String(2 << 20))}</struct>`)}</struct></value>` +
 *   "</data></array>")}</struct></value>`);
 * const ova = [tarHeader("ova.xml", xml.length), xml, new Uint8Array(512 - (xml.length % 512))];
 * const members = (await exportTar(`${dir}/disk.raw`, { prefix: "Ref:5" })).stream;
 * const xva = ReadableStream.from((async function* () {
 *   yield* ova;
 *   yield* members;
 * })());
 * const r = await extractXva(xva, `${dir}/out`);
 * assert.equal(r.extracted[0].path, `${dir}/out/Ref_5.raw`);
 * assert.deepEqual(await Deno.readFile(`${dir}/out/Ref_5.raw`), disk);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function extractXva(
  stream: ReadableStream<Uint8Array> | ChunkStream,
  dir: string,
  options: XvaExtractOptions = {},
): Promise<XvaExtractResult> {
  const input = stream instanceof ChunkStream ? stream : new ChunkStream(stream, options.signal);
  const reader = new TarReader(input, options.label ?? "the XVA");
  const created: string[] = []; // the files this extraction made, removed if it fails
  let writing: string | null = null; // the file being written (removed if it fails)
  try {
    const manifest = await readOvaMember(reader);
    const byRef = new Map(manifest.disks.map((d) => [d.ref, d]));
    for (const ref of options.disks ?? []) {
      if (!byRef.has(ref)) {
        throw new UsageError(
          `--disk ${ref}: ova.xml names no such disk (its disks: ${
            manifest.disks.map((d) => escapeControls(d.ref)).join(", ") || "none"
          })`,
        );
      }
    }
    const wanted = new Set(options.disks ?? manifest.disks.map((d) => d.ref));
    const total = [...wanted].reduce((n, r) => n + byRef.get(r)!.virtualSize, 0);
    options.progress?.setTotal(total);
    await makeOutputDir(dir);
    const paths = await outputPaths(dir, wanted, "raw");
    const extracted: XvaExtracted[] = [];
    let before = 0;
    const seen = await walkXvaDisks(reader, manifest, wanted, async (disk, first) => {
      const path = paths.get(disk.ref)!;
      await refuseExisting(path);
      const target = await RawDestination.open(path, disk.virtualSize, 1 << 20, {
        signal: options.signal,
      });
      created.push(path);
      writing = path;
      try {
        const r = await decodeXvaDisk(reader, first, target, {
          prefix: disk.ref,
          size: disk.virtualSize,
          origin: OVA_SIZE,
          ignoreChecksums: options.ignoreChecksums,
          onProgress: (done) => options.progress?.update(before + done),
        });
        await target.finish();
        extracted.push({
          ref: disk.ref,
          name: disk.name,
          path,
          virtualSize: disk.virtualSize,
          dataBytes: r.dataBytes,
          verified: r.verified,
        });
      } catch (err) {
        created.pop();
        await target.abort();
        throw err;
      }
      writing = null;
      before += disk.virtualSize;
    });
    // A disk of 0 bytes has no member (XAPI writes none): it is an empty file.
    for (const ref of wanted) {
      const disk = byRef.get(ref)!;
      if (seen.has(ref) || disk.virtualSize !== 0) continue;
      const path = paths.get(ref)!;
      await refuseExisting(path);
      await Deno.writeFile(path, new Uint8Array(0), { createNew: true });
      created.push(path);
      extracted.push({
        ref,
        name: disk.name,
        path,
        virtualSize: 0,
        dataBytes: 0,
        verified: { xxhash: 0, sha1: 0 },
      });
      seen.add(ref);
    }
    const absent = [...wanted].filter((r) => !seen.has(r));
    const missing = (options.disks ?? []).filter((r) => absent.includes(r));
    if (missing.length > 0) {
      throw new DiskstreamError(`the XVA holds no member of ${missing.join(", ")}`);
    }
    options.progress?.finish();
    return { manifest, extracted, absent };
  } catch (err) {
    await input.cancel().catch(() => {});
    const e = err instanceof InterruptedError
      ? err.retell(
        `extraction of ${options.label ?? "the XVA"} into ${dir} interrupted by ${err.signal}` +
          (writing !== null
            ? `: ${writing} (being written) was removed`
            : created.length === 0
            ? ": no disk file was created"
            : ""),
      )
      : err;
    await removeCreated(created, e);
    throw e;
  }
}

/**
 * The output file of each disk of `refs` in `dir` (see `diskFileName`), checked before
 * anything is written: refuses two refs that map to the same file name (`Ref:1` and
 * `Ref_1`) and a file (or symbolic link) already there.
 */
export async function outputPaths(
  dir: string,
  refs: Iterable<string>,
  extension: string,
): Promise<Map<string, string>> {
  const paths = new Map<string, string>();
  const byPath = new Map<string, string>();
  for (const ref of refs) {
    const path = join(dir, diskFileName(ref, extension));
    const other = byPath.get(path);
    if (other !== undefined) {
      throw new DiskstreamError(
        `disks ${escapeControls(other)} and ${escapeControls(ref)} would both be written to ` +
          `${path} (refs are made file names by replacing unsafe characters with '_'): ` +
          `extract one of them at a time with --disk, into different directories`,
      );
    }
    byPath.set(path, ref);
    paths.set(ref, path);
    await refuseExisting(path);
  }
  return paths;
}

/**
 * Removes the files a failed extraction created (complete ones too: it failed), and
 * says so at the end of `err`'s message.
 */
export async function removeCreated(paths: string[], err: unknown): Promise<void> {
  for (const path of paths) await Deno.remove(path).catch(() => {});
  if (err instanceof DiskstreamError && paths.length > 0) {
    err.message += `; the files this extraction had written were removed (${
      paths.map((p) => escapeControls(p)).join(", ")
    })`;
  }
}

/** Creates the output directory `dir` (and its parents), refusing a file in the way. */
export async function makeOutputDir(dir: string): Promise<void> {
  try {
    await Deno.mkdir(dir, { recursive: true });
  } catch (err) {
    if (!(err instanceof Deno.errors.AlreadyExists)) throw describeIoError(err, dir, "create");
    throw new UsageError(`cannot extract into ${dir}: it exists and is not a directory`);
  }
}

/** Refuses to write over an existing file (extraction never overwrites). */
export async function refuseExisting(path: string): Promise<void> {
  try {
    await Deno.lstat(path);
  } catch {
    return;
  }
  throw new UsageError(`${path} exists already: remove it or extract into another directory`);
}
