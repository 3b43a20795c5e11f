/**
 * A whole XVA (XenServer/XCP-ng VM export): `ova.xml`, then each disk's members in the
 * string order of their prefixes (the VDI object ids), then the tar end. This module
 * lists what an XVA holds, from a file (headers only, by seeking) or a stream.
 *
 * @module
 */
import { CorruptImageError, LimitError } from "../errors.ts";
import { withImageFile } from "../io/image_file.ts";
import type { ChunkStream } from "../io/chunk_stream.ts";
import type { ChecksumKind } from "./checksum.ts";
import { decodeXvaDisk, parseMemberName, XVA_CHUNK } from "./disk.ts";
import type { XvaMemberRange } from "./disk_source.ts";
import { type OvaManifest, parseOvaXml, type XvaDisk } from "./ova.ts";
import { shownName, tarFileMembers, type TarMember, TarReader } from "./tar.ts";

/** Where an XVA disk's size comes from, as messages name it. */
export const OVA_SIZE = "ova.xml's virtual_size";

/**
 * The largest `ova.xml` read (bytes): a bound on the memory its parsing takes (~30 ×
 * its size). XAPI's are kilobytes to a few megabytes.
 */
export const MAX_OVA_XML = 16 * 1024 * 1024;

/** Refuses an `ova.xml` of `size` bytes past {@link MAX_OVA_XML}, naming `where`. */
function checkOvaSize(size: number, where: string): void {
  if (size <= MAX_OVA_XML) return;
  throw new LimitError(
    `${where}: its ova.xml holds ${size} bytes, more than the ${MAX_OVA_XML} bytes ` +
      `(16 MiB) diskstream reads (a bound on the memory its parsing takes; XAPI's ova.xml ` +
      `files hold kilobytes to a few megabytes)`,
  );
}

/** A disk of an XVA with what its members say. */
export interface XvaDiskListing extends XvaDisk {
  /** Data members present (keep-alives included). */
  members: number;
  /** Bytes in its data members. */
  dataBytes: number;
  /** The member numbers present, as inclusive runs. */
  present: [first: number, last: number][];
  /** Member numbers a whole disk has (1 MiB each, the last one shorter). */
  expectedMembers: number;
  /** The kinds of its checksum members. */
  checksums: ChecksumKind[];
}

/** What an XVA holds. */
export interface XvaListing extends Omit<OvaManifest, "disks"> {
  disks: XvaDiskListing[];
  /** Member prefixes that name no VDI of ova.xml. */
  strayPrefixes: string[];
}

/** Collects the members of an XVA into a listing. */
class Inventory {
  readonly #disks: Map<string, XvaDiskListing>;
  readonly #stray = new Set<string>();

  constructor(readonly manifest: OvaManifest) {
    this.#disks = new Map(manifest.disks.map((d) => [d.ref, {
      ...d,
      members: 0,
      dataBytes: 0,
      present: [],
      expectedMembers: Math.ceil(d.virtualSize / XVA_CHUNK),
      checksums: [],
    }]));
  }

  add(m: TarMember): void {
    if (m.type === "5") return;
    if (m.name === "ova.xml") throw secondOva(m);
    const p = parseMemberName(m.name);
    const disk = p && this.#disks.get(p.prefix);
    if (!p || !disk) {
      this.#stray.add(p ? p.prefix : m.name);
      return;
    }
    if (p.checksum) {
      if (!disk.checksums.includes(p.checksum)) disk.checksums.push(p.checksum);
      return;
    }
    disk.members++;
    disk.dataBytes += m.size;
    const last = disk.present.at(-1);
    if (last && last[1] + 1 === p.number) last[1] = p.number;
    else disk.present.push([p.number, p.number]);
  }

  listing(): XvaListing {
    return {
      version: this.manifest.version,
      vms: this.manifest.vms,
      disks: [...this.#disks.values()],
      strayPrefixes: [...this.#stray],
    };
  }
}

function parseOva(body: Uint8Array): OvaManifest {
  return parseOvaXml(new TextDecoder().decode(body));
}

function notOva(m: TarMember | null, label: string): CorruptImageError {
  return new CorruptImageError(
    `${label} is not an XVA: its first member should be ova.xml, ` +
      (m ? `found ${shownName(JSON.stringify(m.name))}` : "it holds no member"),
    m?.headerOffset ?? 0,
  );
}

function secondOva(m: TarMember): CorruptImageError {
  return new CorruptImageError(
    "the XVA holds a second ova.xml: an XVA holds one, its first member (which one holds " +
      "the truth cannot be told)",
    m.headerOffset,
  );
}

/** Runs `read` (of the first member), saying "not an XVA" when it finds no tar header. */
function notTar<T>(label: string, read: () => T): T {
  const refuse = (err: unknown): never => {
    if (err instanceof CorruptImageError && /no valid tar header/.test(err.message)) {
      throw new CorruptImageError(
        `${label} is not an XVA: it does not start with a tar header (an XVA is a tar ` +
          `archive, ova.xml first)`,
        0,
      );
    }
    throw err;
  };
  try {
    const r = read();
    return r instanceof Promise ? r.catch(refuse) as T : r;
  } catch (err) {
    return refuse(err);
  }
}

/**
 * Reads `ova.xml`, the first member of the XVA on `reader` (a stream), and returns
 * the manifest; the reader is then at the first disk member.
 */
export async function readOvaMember(reader: TarReader): Promise<OvaManifest> {
  const m = await notTar(reader.label, () => reader.next());
  if (m === null || m.name !== "ova.xml") throw notOva(m, reader.label);
  checkOvaSize(m.size, reader.label);
  return parseOva(await reader.readBody(MAX_OVA_XML));
}

/**
 * Lists the XVA arriving on `input` (a pipe: every byte is read, the bodies are
 * skipped). `label` names it in messages.
 *
 * @example
 * ```ts
 * import { listXvaStream } from "@diskstream/diskstream";
 * import { tarHeader, TAR_END } from "./tar.ts";
 * import assert from "node:assert/strict";
 *
 * const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
 * const vm = `<value><struct>${m("class", "VM")}${m("id", "Ref:0")}` +
 *   `${m("snapshot", `<struct>${m("name_label", "web")}</struct>`)}</struct></value>`;
 * const xml = new TextEncoder().encode(
 *   `<value><struct>${m("objects", `<array><data>${vm}</data></array>`)}</struct></value>`,
 * );
 * const pad = new Uint8Array((512 - (xml.length % 512)) % 512);
 * const xva = ReadableStream.from([tarHeader("ova.xml", xml.length), xml, pad, TAR_END]);
 * const listing = await listXvaStream(xva);
 * assert.equal(listing.vms[0].name, "web");
 * assert.deepEqual(listing.disks, []);
 * ```
 */
export async function listXvaStream(
  input: ReadableStream<Uint8Array> | ChunkStream,
  label = "the XVA",
): Promise<XvaListing> {
  const { ChunkStream } = await import("../io/chunk_stream.ts");
  const reader = new TarReader(
    input instanceof ChunkStream ? input : new ChunkStream(input),
    label,
  );
  const inv = new Inventory(await readOvaMember(reader));
  for (let m = await reader.next(); m !== null; m = await reader.next()) inv.add(m);
  return inv.listing();
}

/**
 * Lists the XVA file at `path` from its headers alone (seeking over the members).
 *
 * @example
 * ```ts
 * import { listXvaFile } from "./xva.ts";
 * import { tarHeader, TAR_END } from "./tar.ts";
 * import assert from "node:assert/strict";
 *
 * const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
 * const vdi = `<value><struct>${m("class", "VDI")}${m("id", "Ref:1")}` +
 *   `${m("snapshot", `<struct>${m("virtual_size", "3145728")}</struct>`)}</struct></value>`;
 * const xml = new TextEncoder().encode(
 *   `<value><struct>${m("objects", `<array><data>${vdi}</data></array>`)}</struct></value>`,
 * );
 * const pad = (n: number) => new Uint8Array((512 - (n % 512)) % 512);
 * const dir = await Deno.makeTempDir();
 * const parts = [tarHeader("ova.xml", xml.length), xml, pad(xml.length)];
 * for (const n of ["00000000", "00000002"]) {
 *   parts.push(tarHeader(`Ref:1/${n}`, 1 << 20), new Uint8Array(1 << 20));
 * }
 * parts.push(TAR_END);
 * await Deno.writeFile(`${dir}/vm.xva`, ReadableStream.from(parts));
 * const listing = await listXvaFile(`${dir}/vm.xva`);
 * assert.deepEqual(listing.disks[0].present, [[0, 0], [2, 2]]);
 * assert.equal(listing.disks[0].expectedMembers, 3);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function listXvaFile(path: string): Promise<XvaListing> {
  return withImageFile(path, (file) => {
    const members = tarFileMembers(file);
    const first = notTar(path, () => members.next());
    const ova = first.done ? null : first.value;
    if (ova === null || ova.name !== "ova.xml") throw notOva(ova, path);
    checkOvaSize(ova.size, path);
    const inv = new Inventory(parseOva(file.readAtSync(ova.dataOffset, ova.size, "ova.xml")));
    for (const m of members) inv.add(m);
    return Promise.resolve(inv.listing());
  });
}

/** The file name a disk is extracted to: its ref with unsafe characters as `_`. */
export function diskFileName(ref: string, extension: string): string {
  return `${ref.replace(/[^A-Za-z0-9._-]/g, "_")}.${extension}`;
}

/** What {@link walkXvaDisks} calls for each wanted disk, with its first member. */
export type XvaDiskHandler = (disk: XvaDisk, first: TarMember) => Promise<void>;

/**
 * Walks the disks of the XVA on `reader` (after its ova.xml): for each disk of
 * `wanted` whose members come, calls `handle` with its first member (the handler
 * decodes the disk, e.g. with `decodeXvaDisk`); members of other disks are skipped.
 * Refuses a disk whose members come in two separate stretches. Returns the refs seen.
 */
export async function walkXvaDisks(
  reader: TarReader,
  manifest: OvaManifest,
  wanted: ReadonlySet<string>,
  handle: XvaDiskHandler,
): Promise<Set<string>> {
  const byRef = new Map(manifest.disks.map((d) => [d.ref, d]));
  const seen = new Set<string>();
  for (let m = await reader.next(); m !== null; m = await reader.next()) {
    if (m.name === "ova.xml") throw secondOva(m);
    const p = parseMemberName(m.name);
    const disk = p && byRef.get(p.prefix);
    if (!p || !disk || !wanted.has(disk.ref)) continue;
    if (seen.has(disk.ref)) {
      // The disk was read up to its size: this member lies past it.
      throw new CorruptImageError(
        `member ${shownName(m.name)} of disk ${shownName(disk.ref)} lies past the disk's ` +
          `${disk.virtualSize} bytes ` +
          `(${OVA_SIZE}): the XVA is out of order, or ova.xml gives the wrong size`,
        m.headerOffset,
      );
    }
    seen.add(disk.ref);
    await handle(disk, m);
  }
  return seen;
}

/** The data members of a disk of an XVA file: where its bytes are in the file. */
export interface XvaDiskIndex {
  disk: XvaDisk;
  members: XvaMemberRange[];
  /** Checksums verified, by kind. */
  verified: Record<ChecksumKind, number>;
}

/**
 * Reads the XVA file at `path` once from start to end, verifying every checksum of
 * the disks in `wanted` (all when undefined), and returns where each of their data
 * members lies in the file: the plan of an extraction to qcow2 or VHD (see
 * {@link XvaDiskSource}).
 */
export async function indexXvaFile(
  path: string,
  wanted?: ReadonlySet<string>,
  options: {
    ignoreChecksums?: boolean;
    /** Called with the manifest once `ova.xml` is read, before any disk member. */
    onManifest?: (manifest: OvaManifest) => void;
    /** Called with the bytes of the file read and verified so far. */
    onProgress?: (fileBytes: number) => void;
  } = {},
): Promise<{ manifest: OvaManifest; disks: XvaDiskIndex[] }> {
  const { ChunkStream } = await import("../io/chunk_stream.ts");
  const { openInput } = await import("../io/stream.ts");
  const input = new ChunkStream((await openInput({ kind: "path", path })).stream);
  try {
    const reader = new TarReader(input, path);
    const manifest = await readOvaMember(reader);
    options.onManifest?.(manifest);
    const disks: XvaDiskIndex[] = [];
    const target = { queued: 0, write() {}, zero() {}, flush: () => Promise.resolve() };
    await walkXvaDisks(
      reader,
      manifest,
      wanted ?? new Set(manifest.disks.map((d) => d.ref)),
      async (disk, first) => {
        const members: XvaMemberRange[] = [];
        const r = await decodeXvaDisk(reader, first, target, {
          prefix: disk.ref,
          size: disk.virtualSize,
          origin: OVA_SIZE,
          ignoreChecksums: options.ignoreChecksums,
          onMember: (m, at) => {
            members.push({ at, length: m.size, fileOffset: m.dataOffset });
            options.onProgress?.(m.dataOffset + m.size);
          },
        });
        disks.push({ disk, members, verified: r.verified });
      },
    );
    return { manifest, disks };
  } finally {
    await input.cancel().catch(() => {});
  }
}
