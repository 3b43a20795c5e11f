/**
 * Tar, as XVA files and XAPI's disk streams use it: 512-byte member headers (encoded
 * and decoded by the `tar-mini` package: ustar, octal or base-256 numbers, header
 * checksums), each member's bytes padded to 512, and two zero blocks at the end.
 * {@link TarReader} walks the members of a stream in one pass, never holding more than
 * one input chunk, and understands the GNU long-name and pax `path` records that other
 * tar writers may put in front of a member.
 *
 * @module
 */
import { decode, decodePax, encode } from "tar-mini";
import { CorruptImageError, LimitError } from "../errors.ts";
import type { ChunkStream } from "../io/chunk_stream.ts";
import type { ImageFile } from "../io/image_file.ts";

/** Bytes of a tar block (headers and padding). */
export const TAR_BLOCK = 512;

/** The end of a tar archive: two zero blocks. */
export const TAR_END: Uint8Array = new Uint8Array(2 * TAR_BLOCK);

/** Zero bytes that pad a member of `size` bytes to a whole block. */
export function tarPadding(size: number): number {
  return (TAR_BLOCK - (size % TAR_BLOCK)) % TAR_BLOCK;
}

/** Fields of a member header that {@link tarHeader} lets callers set. */
export interface TarHeaderFields {
  /** Permission bits (default 0o400, as XAPI's XVA members). */
  mode?: number;
  /** Modification time in seconds since 1970 (default 0, as XAPI's disk members). */
  mtime?: number;
}

/**
 * The 512-byte ustar header of a regular file `name` holding `size` bytes.
 *
 * @example
 * ```ts
 * import { tarHeader } from "./tar.ts";
 * import assert from "node:assert/strict";
 *
 * const h = tarHeader("Ref:0/00000000", 1 << 20);
 * assert.equal(h.length, 512);
 * assert.equal(new TextDecoder().decode(h.subarray(0, 14)), "Ref:0/00000000");
 * assert.equal(new TextDecoder().decode(h.subarray(257, 262)), "ustar");
 * ```
 */
export function tarHeader(name: string, size: number, fields: TarHeaderFields = {}): Uint8Array {
  const unfit = () =>
    new RangeError(
      `the tar member name ${JSON.stringify(name)} does not fit a ustar header (at most 100 ` +
        `bytes of UTF-8, or 155 + 100 split at a '/')`,
    );
  let header: Uint8Array;
  try {
    header = encodeHeader(name, size, fields);
  } catch {
    throw unfit();
  }
  // tar-mini measures names in characters, not bytes: a long UTF-8 name would spill
  // into the next fields. Read the header back to be sure it says what was meant.
  if (decode(header).name !== name) throw unfit();
  return header;
}

/**
 * {@link tarHeader} without reading the header back: for names already known to fit,
 * such as a disk's member names once one name of each kind and of the largest number
 * was checked through {@link tarHeader} (the writer frames thousands of members; the
 * check costs about a third of each header).
 *
 * @example
 * ```ts
 * import { encodeHeader, tarHeader } from "./tar.ts";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(encodeHeader("Ref:0/00000001", 4096, {}), tarHeader("Ref:0/00000001", 4096));
 * ```
 */
export function encodeHeader(name: string, size: number, fields: TarHeaderFields): Uint8Array {
  return encode({
    name,
    size,
    mode: fields.mode ?? 0o400,
    mtime: fields.mtime ?? 0,
    uid: 0,
    gid: 0,
    typeflag: "0",
    devmajor: 0,
    devminor: 0,
  });
}

/** A member of a tar stream, as {@link TarReader.next} returns it. */
export interface TarMember {
  /** Its name (a GNU long name or pax `path` applied). */
  readonly name: string;
  /** Bytes of data. */
  readonly size: number;
  /** The header's type flag ("0" for a regular file, "5" a directory, ...). */
  readonly type: string;
  /** Stream offset of its header. */
  readonly headerOffset: number;
  /** Stream offset of its first data byte. */
  readonly dataOffset: number;
}

/** Largest GNU long-name or pax record accepted (bytes). */
const MAX_META = 1024 * 1024;
const decoder = new TextDecoder();

function isZeroBlock(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** A decoded header block: a member's, or a metadata record's (`meta`) that precedes one. */
export interface TarHeaderBlock {
  name: string;
  size: number;
  type: string;
  /** A GNU long-name ("L") or pax ("x", "g") record: its body applies to the next member. */
  meta: boolean;
}

/**
 * Decodes the header block at stream offset `offset`: null for a zero block (the end
 * of the archive). Refuses a bad header checksum, an impossible size, and metadata
 * records larger than 1 MiB, naming `label` and the offset.
 */
export function parseTarHeader(
  block: Uint8Array,
  offset: number,
  label = "the tar stream",
): TarHeaderBlock | null {
  if (isZeroBlock(block)) return null;
  let h: ReturnType<typeof decode>;
  try {
    h = decode(block);
  } catch (err) {
    throw new CorruptImageError(
      `${label} holds no valid tar header here (${(err as Error).message})`,
      offset,
    );
  }
  if (!Number.isSafeInteger(h.size) || h.size < 0) {
    throw new CorruptImageError(`a tar header in ${label} gives an impossible size`, offset);
  }
  const type = String(h.typeflag) === "\0" ? "0" : String(h.typeflag);
  const meta = type === "L" || type === "x" || type === "g";
  if (meta && h.size > MAX_META) {
    throw new LimitError(
      `a tar metadata record of ${h.size} bytes in ${label} is larger than the ${MAX_META} ` +
        `bytes accepted`,
    );
  }
  return { name: h.name, size: h.size, type, meta };
}

/** The name a metadata record gives the next member (GNU long name, pax `path`), if any. */
export function metaName(type: string, body: Uint8Array): string | null {
  if (type === "L") return decoder.decode(body).replace(/\0+$/, "");
  if (type === "x") return decodePax(body).path ?? null;
  return null;
}

/**
 * The members of a tar stream in order, read in one pass. Call {@link TarReader.next}
 * for each member, then at most one of the body methods; what a member's body has
 * not been read of is skipped by the next {@link TarReader.next}.
 */
export class TarReader {
  readonly #input: ChunkStream;
  #pos = 0;
  /** Body bytes (plus padding) of the current member not consumed yet. */
  #left = 0;
  #pad = 0;
  #current: TarMember | null = null;
  /** Input chunks handed out by streamBody and not released yet. */
  #held: Uint8Array[] = [];
  #ended = false;

  /** `input` is the stream; `name` names it in messages. */
  constructor(input: ChunkStream, readonly label = "the tar stream") {
    this.#input = input;
  }

  /** Stream bytes consumed so far. */
  get position(): number {
    return this.#pos;
  }

  /** Whether {@link TarReader.next} met the archive's end blocks (not just the input's end). */
  get ended(): boolean {
    return this.#ended;
  }

  async #readExact(n: number, what: string): Promise<Uint8Array> {
    const b = await this.#input.readCopy(n);
    if (b.length < n) {
      throw new CorruptImageError(
        `${this.label} ended inside ${what} (${b.length} of ${n} bytes)`,
        this.#pos + b.length,
      );
    }
    this.#pos += n;
    return b;
  }

  async #skip(n: number, what: string): Promise<void> {
    while (n > 0) {
      const c = await this.#input.next();
      if (c === null) {
        throw new CorruptImageError(`${this.label} ended inside ${what}`, this.#pos);
      }
      const take = Math.min(n, c.length);
      this.#input.unshift(c.subarray(take));
      this.#input.release(c);
      this.#pos += take;
      n -= take;
    }
  }

  async #finishCurrent(): Promise<void> {
    const cur = this.#current;
    if (cur === null) return;
    await this.#skip(this.#left + this.#pad, `member ${cur.name}`);
    this.#left = this.#pad = 0;
    this.#current = null;
  }

  /**
   * The next member, or null at the end of the archive (a zero block, or the end of
   * the stream between members). Skips what the previous member's body had left.
   */
  async next(): Promise<TarMember | null> {
    await this.#finishCurrent();
    let longName: string | null = null;
    for (;;) {
      const headerOffset = this.#pos;
      const block = await this.#input.readCopy(TAR_BLOCK);
      if (block.length === 0) return null; // ended between members, no end blocks
      if (block.length < TAR_BLOCK) {
        throw new CorruptImageError(
          `${this.label} ended inside a member header (${block.length} of 512 bytes)`,
          headerOffset,
        );
      }
      this.#pos += TAR_BLOCK;
      const h = parseTarHeader(block, headerOffset, this.label);
      if (h === null) {
        this.#ended = true;
        return null;
      }
      if (h.meta) {
        const body = await this.#readExact(h.size, "a tar metadata record");
        await this.#skip(tarPadding(h.size), "a tar metadata record");
        longName = metaName(h.type, body) ?? longName;
        continue;
      }
      const member: TarMember = {
        name: longName ?? h.name,
        size: h.size,
        type: h.type,
        headerOffset,
        dataOffset: this.#pos,
      };
      this.#current = member;
      this.#left = h.size;
      this.#pad = tarPadding(h.size);
      return member;
    }
  }

  /**
   * The whole body of the current member, refusing one larger than `max` bytes (the
   * body is held in memory).
   */
  async readBody(max: number): Promise<Uint8Array> {
    const cur = this.#need();
    if (cur.size > max) {
      throw new LimitError(
        `member ${cur.name} holds ${cur.size} bytes, more than the ${max} expected for it`,
      );
    }
    const body = await this.#readExact(this.#left, `member ${cur.name}`);
    this.#left = 0;
    return body;
  }

  /**
   * Hands the current member's body to `onPiece` in the input's chunks, without
   * copying: `chunk[from, to)` are the body's bytes at `at`. The views stay valid until
   * {@link TarReader.releaseHeld} (call it once nothing refers to them any more, e.g.
   * after the writes queued from them were flushed).
   */
  async streamBody(
    onPiece: (chunk: Uint8Array, from: number, to: number, at: number) => void | Promise<void>,
  ): Promise<void> {
    const cur = this.#need();
    let at = cur.size - this.#left;
    while (this.#left > 0) {
      const c = await this.#input.next();
      if (c === null) {
        throw new CorruptImageError(
          `${this.label} ended inside member ${cur.name} (${at} of its ${cur.size} bytes)`,
          this.#pos,
        );
      }
      const take = Math.min(this.#left, c.length);
      this.#input.unshift(c.subarray(take));
      this.#held.push(c);
      await onPiece(c, 0, take, at);
      at += take;
      this.#pos += take;
      this.#left -= take;
    }
  }

  /** Lets the input reuse the buffers of the bodies handed out so far. */
  releaseHeld(): void {
    this.takeHeld()();
  }

  /**
   * Takes over the buffers of the bodies handed out so far: the function returned lets
   * the input reuse them (for writes of those bodies that run while reading goes on).
   */
  takeHeld(): () => void {
    const held = this.#held;
    this.#held = [];
    return () => {
      for (const c of held) this.#input.release(c);
    };
  }

  #need(): TarMember {
    if (this.#current === null) throw new Error("no current tar member");
    return this.#current;
  }
}

/**
 * The members of the tar file `file`, read by seeking from header to header: only the
 * 512-byte headers (and long-name records) are read, so listing a large archive costs a
 * few reads per member.
 */
export function* tarFileMembers(file: ImageFile): Generator<TarMember> {
  const block = new Uint8Array(TAR_BLOCK);
  const size = file.size;
  let pos = 0;
  let longName: string | null = null;
  while (pos + TAR_BLOCK <= size) {
    file.readInto(pos, block, "a tar member header");
    const h = parseTarHeader(block, pos, file.path);
    if (h === null) return;
    const dataOffset = pos + TAR_BLOCK;
    if (h.meta) {
      longName = metaName(h.type, file.readAtSync(dataOffset, h.size, "a tar metadata record")) ??
        longName;
    } else {
      if (dataOffset + h.size > size) {
        throw new CorruptImageError(
          `${file.path} ends inside member ${longName ?? h.name} (${h.size} bytes announced)`,
          dataOffset,
        );
      }
      yield { name: longName ?? h.name, size: h.size, type: h.type, headerOffset: pos, dataOffset };
      longName = null;
    }
    pos = dataOffset + h.size + tarPadding(h.size);
  }
  if (pos < size) throw new CorruptImageError(`${file.path} ends inside a member header`, pos);
}
