/**
 * Tar, as XVA files and XAPI's disk streams use it: 512-byte member headers (encoded
 * and decoded by the `tar-mini` package: ustar, octal or base-256 numbers, header
 * checksums), each member's bytes padded to 512, and two zero blocks at the end.
 * {@link TarReader} walks the members of a stream in one pass, never holding more than
 * one input chunk, and understands the GNU long-name and pax (`path`, `size`) records
 * that other tar writers may put in front of a member. The size field is read as
 * Python's `tarfile` reads it (octal, or GNU base-256), strictly: tar-mini's own
 * reading takes `0000001z` for 1 and an all-0xff field for 0.
 *
 * @module
 */
import { decode, encode } from "tar-mini";
import { CorruptImageError, escapeControls, LimitError } from "../errors.ts";
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
/** Longest member name accepted (bytes; PATH_MAX). */
const MAX_NAME = 4096;
const decoder = new TextDecoder();
const latin1 = new TextDecoder("latin1");

/**
 * A member name (or any text from a tar stream) fit for one line of a message: control
 * and format characters escaped, and cut after 200 characters.
 *
 * @example
 * ```ts
 * import { shownName } from "./tar.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(shownName("Ref:0/\x1b[31m"), "Ref:0/\\x1b[31m");
 * ```
 */
export function shownName(name: string): string {
  const cut = name.length > 200 ? `${name.slice(0, 200)}… (${name.length} characters)` : name;
  return escapeControls(cut);
}

/** Bytes of a header field as text, those that are not printable ASCII as `\xNN`. */
function shownBytes(field: Uint8Array): string {
  return Array.from(
    field,
    (b) => b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, "0")}`,
  ).join("");
}

function isZeroBlock(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** The NUL-terminated text of a header field (UTF-8), as every tar reader cuts it. */
function fieldText(block: Uint8Array, from: number, length: number): string {
  const field = block.subarray(from, from + length);
  const nul = field.indexOf(0);
  return decoder.decode(nul < 0 ? field : field.subarray(0, nul));
}

/**
 * The number in a header's numeric field as Python's `tarfile` reads it: GNU base-256
 * (first byte 0x80), else octal digits up to the first NUL, blanks around them
 * ignored (none: 0). Null for anything else: a negative base-256 number (first byte
 * 0xff), other characters, a number past 2^53.
 */
function tarNumber(field: Uint8Array): number | null {
  if (field[0] === 0x80) {
    let n = 0n;
    for (const b of field.subarray(1)) n = n * 256n + BigInt(b);
    return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : null;
  }
  if (field[0] & 0x80) return null;
  const nul = field.indexOf(0);
  const text = latin1.decode(nul < 0 ? field : field.subarray(0, nul)).trim();
  if (!/^[0-7]*$/.test(text)) return null;
  return text === "" ? 0 : parseInt(text, 8);
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
 * of the archive). Refuses a bad header checksum, a size field that is no number (or a
 * negative one, or past 2^53), and metadata records larger than 1 MiB, naming `label`
 * and the offset.
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
  const size = tarNumber(block.subarray(124, 136));
  if (size === null) {
    throw new CorruptImageError(
      `a tar header in ${label} gives an impossible size (its size field holds ` +
        `${shownBytes(block.subarray(124, 136))}: octal digits or a positive ` +
        `GNU base-256 number below 2^53 are expected); the stream is corrupt`,
      offset,
    );
  }
  // The raw type flag (tar-mini turns the ones it does not know into numbers); "5" also
  // for a regular file whose name ends with '/' (a directory, as tar-mini and tar see it).
  const type = block[156] === 0
    ? "0"
    : String(h.typeflag) === "5"
    ? "5"
    : String.fromCharCode(block[156]);
  let name = fieldText(block, 0, 100);
  const ustar = latin1.decode(block.subarray(257, 263)) === "ustar\0";
  if (ustar && block[345] !== 0) name = `${fieldText(block, 345, 155)}/${name}`;
  const meta = type === "L" || type === "x" || type === "g";
  if (meta && size > MAX_META) {
    throw new LimitError(
      `a tar metadata record of ${size} bytes in ${label} is larger than the ${MAX_META} ` +
        `bytes accepted (at byte offset ${offset})`,
    );
  }
  return { name, size, type, meta };
}

/**
 * The records of a pax header body (`LENGTH KEY=VALUE\n` each), refusing one that is
 * not framed so, as Python's `tarfile` does.
 */
function parsePax(body: Uint8Array, offset: number, label: string): Map<string, string> {
  const out = new Map<string, string>();
  const bad = (why: string) =>
    new CorruptImageError(
      `a pax header in ${label} is malformed (${why}): the stream is corrupt`,
      offset,
    );
  let at = 0;
  while (at < body.length && body[at] !== 0) {
    const m = /^([0-9]{1,8}) /.exec(latin1.decode(body.subarray(at, at + 9)));
    if (!m) throw bad(`no record length at byte ${at} of its body`);
    const length = Number(m[1]);
    const end = at + length;
    if (length < 5 || end > body.length || body[end - 1] !== 0x0a) {
      throw bad(`the record at byte ${at} of its body is not framed by its length`);
    }
    const record = decoder.decode(body.subarray(at + m[0].length, end - 1));
    const eq = record.indexOf("=");
    if (eq <= 0) throw bad(`the record at byte ${at} of its body has no KEY=VALUE`);
    out.set(record.slice(0, eq), record.slice(eq + 1));
    at = end;
  }
  return out;
}

/**
 * What the metadata records met since the last member say about the next one (a GNU
 * long name, a pax `path` or `size`); {@link TarMeta.take} hands it to that member.
 */
export class TarMeta {
  #name: string | null = null;
  #size: number | null = null;
  /** Stream offset of the first record not applied yet, or -1. */
  #at = -1;

  constructor(readonly label: string) {}

  /** Takes the metadata record `h` at `offset` with its body. */
  add(h: TarHeaderBlock, body: Uint8Array, offset: number): void {
    if (this.#at < 0) this.#at = offset;
    if (h.type === "L") {
      const nul = body.indexOf(0);
      this.#setName(decoder.decode(nul < 0 ? body : body.subarray(0, nul)), offset);
      return;
    }
    const pax = parsePax(body, offset, this.label);
    for (const key of pax.keys()) {
      if (key.startsWith("GNU.sparse.")) {
        throw new CorruptImageError(
          `a pax header in ${this.label} describes a GNU sparse file (${shownName(key)}): ` +
            `disk members are regular files`,
          offset,
        );
      }
    }
    const path = pax.get("path");
    const size = pax.get("size");
    if (h.type === "g") {
      // A global header would apply to every member: not what a disk stream holds.
      if (path !== undefined || size !== undefined) {
        throw new CorruptImageError(
          `a global pax header in ${this.label} sets the ${
            path !== undefined ? "path" : "size"
          } of every member after it: not supported in a disk stream`,
          offset,
        );
      }
      return;
    }
    if (path !== undefined) this.#setName(path, offset);
    if (size !== undefined) {
      const n = /^[0-9]{1,16}$/.test(size) ? Number(size) : NaN;
      if (!Number.isSafeInteger(n)) {
        throw new CorruptImageError(
          `a pax header in ${this.label} gives an impossible size (${
            shownName(JSON.stringify(size))
          }): the stream is corrupt`,
          offset,
        );
      }
      this.#size = n;
    }
  }

  #setName(name: string, offset: number): void {
    if (name.length > MAX_NAME) {
      throw new LimitError(
        `a member name of ${name.length} characters in ${this.label} is longer than the ` +
          `${MAX_NAME} accepted (at byte offset ${offset})`,
      );
    }
    this.#name = name;
  }

  /** The member header `h` with what the records before it say; resets. */
  take(h: TarHeaderBlock): { name: string; size: number } {
    const out = { name: this.#name ?? h.name, size: this.#size ?? h.size };
    this.#name = this.#size = null;
    this.#at = -1;
    return out;
  }

  /** Refuses metadata records that no member follows (at the archive's end, `offset`). */
  checkNonePending(offset: number): void {
    if (this.#at < 0) return;
    throw new CorruptImageError(
      `${this.label} ends (at byte offset ${offset}) after a GNU long-name or pax record ` +
        `that no member follows: the stream is cut or corrupt`,
      this.#at,
    );
  }
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
    await this.#skip(this.#left + this.#pad, `member ${shownName(cur.name)}`);
    this.#left = this.#pad = 0;
    this.#current = null;
  }

  /**
   * The next member, or null at the end of the archive (a zero block, or the end of
   * the stream between members). Skips what the previous member's body had left.
   */
  async next(): Promise<TarMember | null> {
    await this.#finishCurrent();
    const meta = new TarMeta(this.label);
    for (;;) {
      const headerOffset = this.#pos;
      const block = await this.#input.readCopy(TAR_BLOCK);
      if (block.length === 0) {
        meta.checkNonePending(headerOffset);
        return null; // ended between members, no end blocks
      }
      if (block.length < TAR_BLOCK) {
        throw new CorruptImageError(
          `${this.label} ended inside a member header (${block.length} of 512 bytes)`,
          headerOffset,
        );
      }
      this.#pos += TAR_BLOCK;
      const h = parseTarHeader(block, headerOffset, this.label);
      if (h === null) {
        meta.checkNonePending(headerOffset);
        this.#ended = true;
        return null;
      }
      if (h.meta) {
        const body = await this.#readExact(h.size, "a tar metadata record");
        await this.#skip(tarPadding(h.size), "a tar metadata record");
        meta.add(h, body, headerOffset);
        continue;
      }
      const { name, size } = meta.take(h);
      const member: TarMember = {
        name,
        size,
        type: h.type,
        headerOffset,
        dataOffset: this.#pos,
      };
      this.#current = member;
      this.#left = size;
      this.#pad = tarPadding(size);
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
        `member ${shownName(cur.name)} holds ${cur.size} bytes, more than the ${max} expected ` +
          `for it`,
      );
    }
    const body = await this.#readExact(this.#left, `member ${shownName(cur.name)}`);
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
          `${this.label} ended inside member ${shownName(cur.name)} (${at} of its ${cur.size} ` +
            `bytes)`,
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
  const meta = new TarMeta(file.path);
  while (pos + TAR_BLOCK <= size) {
    file.readInto(pos, block, "a tar member header");
    const h = parseTarHeader(block, pos, file.path);
    if (h === null) {
      meta.checkNonePending(pos);
      return;
    }
    const dataOffset = pos + TAR_BLOCK;
    let length = h.size;
    if (h.meta) {
      if (dataOffset + h.size > size) {
        throw new CorruptImageError(`${file.path} ends inside a tar metadata record`, dataOffset);
      }
      meta.add(h, file.readAtSync(dataOffset, h.size, "a tar metadata record"), pos);
    } else {
      const m = meta.take(h);
      length = m.size;
      if (dataOffset + length > size) {
        throw new CorruptImageError(
          `${file.path} ends inside member ${shownName(m.name)} (${length} bytes announced)`,
          dataOffset,
        );
      }
      yield { name: m.name, size: length, type: h.type, headerOffset: pos, dataOffset };
    }
    pos = dataOffset + length + tarPadding(length);
  }
  if (pos < size) throw new CorruptImageError(`${file.path} ends inside a member header`, pos);
  meta.checkNonePending(pos);
}
