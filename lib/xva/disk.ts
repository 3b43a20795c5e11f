/**
 * A disk inside a tar stream, the way XAPI encodes it (`stream_vdi.ml`, vhd-tool's
 * `tar.md`): members of 1 MiB named `PREFIX/%08d` (the last one may be shorter), each
 * followed by its checksum member (`.xxhash` or `.checksum`, see checksum.ts). The
 * number is a counter, not an offset: members that hold no data are left out except
 * the first and the last (a gap of N numbers is N × the first member's length of
 * zeros), and a zero-length member (a keep-alive, sent when nothing was written for a
 * while) takes a number without moving the offset.
 *
 * @module
 */
import { CorruptImageError, UsageError } from "../errors.ts";
import type { ChunkStream } from "../io/chunk_stream.ts";
import type { ImageTarget } from "../io/endpoint.ts";
import {
  type Checksum,
  CHECKSUM_EXTENSIONS,
  type ChecksumKind,
  checksumKindOf,
} from "./checksum.ts";
import { loadChecksum, loadThreadedXxh64 } from "./checksum.ts";
import {
  encodeHeader,
  shownName,
  TAR_BLOCK,
  tarHeader,
  type TarMember,
  tarPadding,
  TarReader,
} from "./tar.ts";

/** The size of XAPI's disk members: 1 MiB. */
export const XVA_CHUNK = 1024 * 1024;

/** The prefix XAPI gives the first disk of an XVA, and our default. */
export const DEFAULT_TAR_PREFIX = "Ref:0";

/**
 * The name of member `n` of the disk with `prefix`: `PREFIX/%08d`, or the number
 * right after the prefix when it is empty or ends with `/`, or with `glue` (as
 * vhd-tool glues its `--tar-filename-prefix` on: `PREFIX%08d`).
 *
 * @example
 * ```ts
 * import { diskMemberName } from "./disk.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(diskMemberName("Ref:175", 3), "Ref:175/00000003");
 * assert.equal(diskMemberName("", 12), "00000012");
 * assert.equal(diskMemberName("disk-", 12, true), "disk-00000012");
 * ```
 */
export function diskMemberName(prefix: string, n: number, glue = false): string {
  const num = String(n).padStart(8, "0");
  return glue || prefix === "" || prefix.endsWith("/") ? prefix + num : `${prefix}/${num}`;
}

/**
 * Splits a disk member's name into its prefix (without a trailing `/`), number and
 * checksum kind; null if not one. With `prefix` (the one expected), a name that
 * starts with it is split right after it, so that a prefix glued onto the number
 * (vhd-tool's `PREFIX%08d`) may end with digits.
 *
 * @example
 * ```ts
 * import { parseMemberName } from "./disk.ts";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(parseMemberName("Ref:3/00000007.xxhash"), {
 *   prefix: "Ref:3", number: 7, checksum: "xxhash",
 * });
 * assert.equal(parseMemberName("disk100000002")?.number, 100000002); // ambiguous alone
 * assert.equal(parseMemberName("disk100000002", "disk1")?.number, 2);
 * ```
 */
export function parseMemberName(
  name: string,
  prefix?: string,
): { prefix: string; number: number; checksum: ChecksumKind | null } | null {
  const checksum = checksumKindOf(name);
  const stem = checksum ? name.slice(0, -CHECKSUM_EXTENSIONS[checksum].length) : name;
  if (prefix !== undefined && stem.startsWith(prefix)) {
    const n = /^\/*(\d{1,15})$/.exec(stem.slice(prefix.length));
    if (n) return { prefix: prefix.replace(/\/+$/, ""), number: Number(n[1]), checksum };
  }
  const m = /^(.*?)\/?(\d{1,15})$/.exec(stem);
  if (!m) return null;
  return { prefix: m[1], number: Number(m[2]), checksum };
}

/** Bytes a member of `size` bytes occupies in the stream with its checksum member. */
export function memberStreamBytes(size: number, kind: ChecksumKind): number {
  const sum = kind === "xxhash" ? 16 : 40;
  return TAR_BLOCK + size + tarPadding(size) + TAR_BLOCK + sum + tarPadding(sum);
}

/** Frames disk members for a tar stream (the writing side). */
export class DiskMemberWriter {
  readonly #encoder = new TextEncoder();

  private constructor(
    readonly prefix: string,
    readonly kind: ChecksumKind,
    readonly checksum: Checksum,
    readonly glue: boolean,
  ) {}

  /**
   * A writer for the disk with `prefix` and checksums of `kind`; `glue` names members
   * `PREFIX%08d` (see {@link diskMemberName}).
   */
  static async create(
    prefix: string,
    kind: ChecksumKind,
    glue = false,
  ): Promise<DiskMemberWriter> {
    // Every name fits once the longest does (names differ only in their digits).
    checkTarPrefix(prefix, glue);
    return new DiskMemberWriter(prefix, kind, await loadChecksum(kind), glue);
  }

  /**
   * Frames member `n` in `out` at `at`: its data of `size` bytes must already be at
   * `at + 512`; writes the header in front, the padding and the checksum member after.
   * Returns the end (`at + memberStreamBytes(size)`).
   */
  frame(out: Uint8Array, at: number, n: number, size: number): number {
    const name = diskMemberName(this.prefix, n, this.glue);
    out.set(encodeHeader(name, size, {}), at);
    let end = at + TAR_BLOCK + size;
    const data = out.subarray(at + TAR_BLOCK, end);
    const pad = tarPadding(size);
    out.fill(0, end, end + pad);
    end += pad;
    const sum = this.#encoder.encode(this.checksum(data));
    out.set(encodeHeader(name + CHECKSUM_EXTENSIONS[this.kind], sum.length, {}), end);
    end += TAR_BLOCK;
    out.set(sum, end);
    out.fill(0, end + sum.length, end + sum.length + tarPadding(sum.length));
    return end + sum.length + tarPadding(sum.length);
  }
}

/** Options of {@link decodeXvaDisk}. */
export interface XvaDiskOptions {
  /**
   * The members' prefix; undefined: the prefix of the first member (then a member
   * with another prefix ends the disk instead of being refused, when `size` is not
   * known).
   */
  prefix?: string;
  /** The disk's size: decoding stops when it is reached. Null: at the archive's end. */
  size: number | null;
  /**
   * Where `size` and `prefix` come from, named in messages (an XVA: "ova.xml's
   * virtual_size"); by default the command line's `--size` and `--tar-prefix`.
   */
  origin?: string;
  /** Do not verify checksums (their members may then be missing). */
  ignoreChecksums?: boolean;
  /** Called with the disk bytes done so far. */
  onProgress?: (done: number) => void;
  /**
   * Called for each data member (keep-alives too) once its checksum is verified, with
   * the disk offset its bytes belong at (to index an XVA file: `member.dataOffset` is
   * then the file offset of those bytes).
   */
  onMember?: (member: TarMember, diskOffset: number) => void;
}

/** What {@link decodeXvaDisk} found. */
export interface XvaDiskResult {
  /** The members' prefix. */
  prefix: string;
  /** The disk's size: where its last member ended, or the size given. */
  size: number;
  /** Bytes of data members written. */
  dataBytes: number;
  /** Data members read (keep-alives included). */
  members: number;
  /** Checksums verified, by kind. */
  verified: Record<ChecksumKind, number>;
  /** The member after the disk's last, already read (a next disk's), or null. */
  next: TarMember | null;
}

/**
 * Bytes of verified members whose writes are started together (a few input chunks, so
 * that the input's recycled buffers suffice for what is read meanwhile).
 */
const WRITE_BATCH = 4 * 1024 * 1024;

/** The longest checksum member accepted. */
const MAX_CHECKSUM_BYTES = 128;

/**
 * Reads one disk's members from `reader` (starting with `first` when its header was
 * already read) into `target`: data at the offsets the member numbers give, zeros for
 * the gaps ({@link ImageTarget.zero}), every checksum verified before the data is
 * flushed. Refuses, naming the member: a checksum that does not match, a checksum
 * member missing or of an unknown kind, numbers that do not increase, a gap when the
 * first member is empty, a member longer than the first (gaps could not be sized), a
 * data member after a short one, data past `size`, and a stream that ends before
 * `size`.
 *
 * @example
 * ```ts
 * import { decodeXvaDisk, DiskMemberWriter, memberStreamBytes } from "./disk.ts";
 * import { TarReader } from "./tar.ts";
 * import { ChunkStream } from "../io/chunk_stream.ts";
 * import assert from "node:assert/strict";
 *
 * // Members 0 and 2 of 4 bytes each: member 1 (bytes 4-7) is a gap of zeros.
 * const w = await DiskMemberWriter.create("Ref:0", "xxhash");
 * const out = new Uint8Array(2 * memberStreamBytes(4, "xxhash"));
 * out.set([1, 2, 3, 4], 512);
 * const mid = w.frame(out, 0, 0, 4);
 * out.set([5, 6, 7, 8], mid + 512);
 * w.frame(out, mid, 2, 4);
 *
 * const disk = new Uint8Array(12).fill(9);
 * const target = {
 *   queued: 0,
 *   write: (at: number, b: Uint8Array, from: number, to: number) =>
 *     disk.set(b.subarray(from, to), at),
 *   zero: (at: number, n: number) => disk.fill(0, at, at + n),
 *   flush: () => Promise.resolve(),
 * };
 * const reader = new TarReader(new ChunkStream(ReadableStream.from([out])));
 * const r = await decodeXvaDisk(reader, null, target, { size: null });
 * assert.equal(r.size, 12);
 * assert.deepEqual([...disk], [1, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 8]);
 * ```
 */
export async function decodeXvaDisk(
  reader: TarReader,
  first: TarMember | null,
  target: ImageTarget,
  options: XvaDiskOptions,
): Promise<XvaDiskResult> {
  const size = options.size;
  let prefix = options.prefix?.replace(/\/+$/, "");
  let pending = first;
  let offset = 0;
  let last = -1;
  let chunk = -1; // the first member's length
  let short: string | null = null; // a member shorter than the first was read
  let dataBytes = 0;
  let members = 0;
  const verified = { xxhash: 0, sha1: 0 };
  const checksums: Partial<Record<ChecksumKind, Checksum>> = {};
  const nextMember = async () => {
    const m = pending ?? await reader.next();
    pending = null;
    return m;
  };
  // The verified members' writes run while the next members are read and hashed (one
  // flush at a time); the input's buffers they refer to are reused once they are done.
  let writing: Promise<void> = Promise.resolve();
  // Each member's checksum is computed as soon as its data is read (XXH64 on another
  // thread where it can be, see checksum.ts) and checked in member order before any of
  // its data is flushed: a mismatch stops the import with the member's data unwritten.
  let checks: Promise<void> = Promise.resolve();
  const threaded = options.ignoreChecksums ? null : loadThreadedXxh64();
  const startFlush = async () => {
    await checks;
    await writing;
    const release = reader.takeHeld();
    writing = target.flush().then(release);
    writing.catch(() => {}); // thrown where it is awaited
  };
  const flush = async () => {
    await startFlush();
    await writing;
  };
  const result = (next: TarMember | null): XvaDiskResult => ({
    prefix: prefix ?? "",
    size: size ?? offset,
    dataBytes,
    members,
    verified,
    next,
  });
  // Refused: the writes already running (of verified members) finish before the
  // caller aborts the target, so that no member is left half written.
  try {
    for (;;) {
      if (size !== null && offset >= size && (members > 0 || size === 0)) break;
      const m = await nextMember();
      if (m === null) {
        if (size !== null && offset < size) {
          throw new CorruptImageError(
            `${reader.label} ended after ${offset} of the disk's ${size} bytes` +
              (last >= 0 ? ` (last member ${shownName(diskMemberName(prefix ?? "", last))})` : "") +
              `: it was cut short, or ${options.origin ?? "--size"} is wrong`,
            reader.position,
          );
        }
        if (members === 0 && !(size === null && reader.ended)) {
          throw new CorruptImageError(`${reader.label} holds no disk member`, reader.position);
        }
        await flush();
        return result(null);
      }
      if (m.type === "5") continue; // a directory entry some tar writers add
      refuseIrregular(m);
      const parsed = parseMemberName(m.name, options.prefix);
      if (parsed && prefix === undefined) prefix = parsed.prefix;
      if (!parsed || parsed.prefix !== prefix) {
        if (options.prefix === undefined && size === null && members > 0) {
          await flush();
          return result(m);
        }
        throw new CorruptImageError(
          `expected a disk member named ${diskMemberName(prefix ?? "PREFIX", last + 1)}` +
            ` or later, found ${shownName(JSON.stringify(m.name))}` +
            (m.name === "ova.xml"
              ? options.origin === undefined
                ? ": this is a whole XVA (use 'diskstream xva extract')"
                : ": an XVA holds one ova.xml, its first member"
              : options.prefix === undefined
              ? ""
              : options.origin === undefined
              ? " (is --tar-prefix right?)"
              : ` before the disk's ${size} bytes (${options.origin}) were complete: the ` +
                `stream is out of order, or ${options.origin} is wrong`),
          m.headerOffset,
        );
      }
      if (parsed.checksum) {
        throw new CorruptImageError(
          `checksum member ${shownName(m.name)} comes without the data member before it`,
          m.headerOffset,
        );
      }
      if (parsed.number <= last) {
        throw new CorruptImageError(
          `member ${shownName(m.name)} comes after ${
            shownName(diskMemberName(prefix!, last))
          }: member numbers must ` +
            `increase`,
          m.headerOffset,
        );
      }
      if (chunk < 0) chunk = m.size;
      const gap = parsed.number - last - 1;
      if (gap > 0 && m.size > 0 && short !== null) {
        throw afterShort(m, short);
      }
      if (gap > 0) {
        if (chunk === 0) {
          throw new CorruptImageError(
            `member ${
              shownName(m.name)
            } follows a gap, but the disk's first member is empty: the gap ` +
              `cannot be sized`,
            m.headerOffset,
          );
        }
        const gapBytes = gap * chunk;
        checkFits(m, offset, gapBytes, size, "the gap before", options.origin);
        target.zero(offset, gapBytes);
        offset += gapBytes;
      }
      if (m.size > chunk) {
        throw new CorruptImageError(
          `member ${
            shownName(m.name)
          } holds ${m.size} bytes, more than the disk's first member (${chunk}): ` +
            `the gaps could not be sized`,
          m.headerOffset,
        );
      }
      if (m.size > 0 && short !== null) throw afterShort(m, short);
      checkFits(m, offset, m.size, size, "", options.origin);
      const pieces: [Uint8Array, number, number][] = [];
      const at0 = offset;
      await reader.streamBody((c, from, to, at) => {
        target.write(at0 + at, c, from, to);
        pieces.push([c, from, to]);
      });
      offset += m.size;
      dataBytes += m.size;
      members++;
      last = parsed.number;
      if (m.size > 0 && m.size < chunk) short = m.name;
      // Its checksum member.
      const c = await nextMember();
      const ck = c && parseMemberName(c.name, options.prefix);
      const isItsSum = c !== null && ck !== null && ck.checksum !== null &&
        ck.prefix === prefix && ck.number === parsed.number &&
        c.name === m.name + CHECKSUM_EXTENSIONS[ck.checksum];
      if (!isItsSum) {
        if (!options.ignoreChecksums) {
          throw new CorruptImageError(
            `member ${shownName(m.name)} is not followed by its checksum member (` +
              `${shownName(m.name)}.xxhash or ${shownName(m.name)}.checksum)` +
              (c ? `, but by ${shownName(JSON.stringify(c.name))}` : "") +
              ` (--ignore-checksums imports without them)`,
            c?.headerOffset ?? reader.position,
          );
        }
        pending = c;
      } else if (!options.ignoreChecksums) {
        refuseIrregular(c);
        const kind = ck!.checksum!;
        const body = await reader.readBody(MAX_CHECKSUM_BYTES);
        // The whole body (blanks and a line end around it allowed), nothing after it.
        const said = new TextDecoder().decode(body).trim().toLowerCase();
        const views = pieces.map(([c, from, to]) => c.subarray(from, to));
        const hashing = kind === "xxhash" && threaded !== null
          ? threaded(...views)
          : Promise.resolve((checksums[kind] ??= await loadChecksum(kind))(...views));
        hashing.catch(() => {}); // awaited in turn below
        checks = checks.then(async () => {
          const got = (await hashing).toLowerCase();
          if (said !== got) {
            throw new CorruptImageError(
              `checksum mismatch in member ${shownName(m.name)}: its ${
                CHECKSUM_EXTENSIONS[kind]
              } member ` +
                `says ${
                  said ? shownName(said) : "(nothing)"
                }, the data hashes to ${got}; the stream is corrupt ` +
                `(--ignore-checksums imports it anyway)`,
              m.headerOffset,
            );
          }
          verified[kind]++;
        });
      }
      checks = checks.then(() => options.onMember?.(m, at0));
      checks.catch(() => {}); // thrown where it is awaited
      options.onProgress?.(offset);
      if (target.queued >= WRITE_BATCH) await startFlush();
    }
    await flush();
    return result(null);
  } catch (err) {
    // No hash may still be reading the input's buffers; a mismatch found there came
    // earlier in the stream than what stopped the reading.
    const mismatch = await checks.then(() => null, (e) => e);
    await writing.catch(() => {});
    throw mismatch ?? err;
  }
}

/** Tar types of what is not a regular file, as messages name them. */
const TAR_TYPES: Record<string, string> = {
  "1": "a hard link",
  "2": "a symbolic link",
  "3": "a character device",
  "4": "a block device",
  "6": "a FIFO",
  "K": "a GNU long link name",
  "S": "a GNU sparse file",
  "V": "a volume header",
  "M": "a multi-volume continuation",
};

/** Refuses a member that is not a regular file: its body is not the disk's bytes. */
function refuseIrregular(m: TarMember): void {
  if (m.type === "0" || m.type === "7") return; // regular, contiguous
  throw new CorruptImageError(
    `member ${shownName(m.name)} is ${TAR_TYPES[m.type] ?? "no regular file"} (tar type ` +
      `${shownName(JSON.stringify(m.type))}): disk members are regular files`,
    m.headerOffset,
  );
}

function afterShort(m: TarMember, short: string): CorruptImageError {
  return new CorruptImageError(
    `member ${shownName(m.name)} comes after ${
      shownName(short)
    }, which is shorter than the first member: only ` +
      `the last member of a disk may be short`,
    m.headerOffset,
  );
}

function checkFits(
  m: TarMember,
  offset: number,
  n: number,
  size: number | null,
  what: string,
  origin: string | undefined,
) {
  if (!Number.isSafeInteger(offset + n) || (size !== null && offset + n > size)) {
    const name = `${what ? what + " member" : "member"} ${shownName(m.name)}`;
    throw new CorruptImageError(
      size === null
        ? `${name} reaches byte ${offset + n}, past 2^53: no disk is that large (its number ` +
          `is corrupt)`
        : `${name} reaches byte ${offset + n}, past the disk's size of ${size} bytes ` +
          `(${origin ?? "is --size right?"})`,
      m.headerOffset,
    );
  }
}

/**
 * Refuses a prefix that cannot name members (used by the command line): a NUL, or a
 * name too long for a ustar header once the number and `.checksum` are added (`glue`:
 * as {@link diskMemberName}).
 *
 * @example
 * ```ts
 * import { checkTarPrefix } from "./disk.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(checkTarPrefix("Ref:3"), "Ref:3");
 * assert.throws(() => checkTarPrefix("é".repeat(60)), /too long/);
 * ```
 */
export function checkTarPrefix(prefix: string, glue = false): string {
  const bad = (why: string) => new UsageError(`bad tar prefix ${JSON.stringify(prefix)}: ${why}`);
  if (prefix.includes("\0")) throw bad("it holds a NUL");
  try {
    tarHeader(diskMemberName(prefix, 99_999_999, glue) + CHECKSUM_EXTENSIONS.sha1, 40);
  } catch {
    throw bad(
      "too long for a member name (ustar's name fields hold 155 + 100 bytes of UTF-8, " +
        "split at a '/')",
    );
  }
  return prefix;
}

/** Re-exported so callers need one import for a disk's stream. */
export { TarReader };
export type { ChunkStream };
