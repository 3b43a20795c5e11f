/**
 * The values of the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md) that the
 * client uses: handshake magics and flags, options and their replies, commands,
 * structured reply chunks, the `base:allocation` flags and the error numbers.
 *
 * @module
 */
import { escapeControls } from "../errors.ts";

/** "NBDMAGIC", the first 8 bytes a server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": a newstyle server; also the magic of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The magic of an oldstyle server's greeting (not supported). */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
/** The magic of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

/** Handshake flags (server). */
export const FLAG_FIXED_NEWSTYLE = 1;
export const FLAG_NO_ZEROES = 2;

/** Options. */
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_STARTTLS = 5;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_SET_META_CONTEXT = 10;

/** Option replies; errors have bit 31 set. */
export const REP_ACK = 1;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_ERR_BIT = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR_BIT + 1;
export const REP_ERR_POLICY = REP_ERR_BIT + 2;
export const REP_ERR_INVALID = REP_ERR_BIT + 3;
export const REP_ERR_TLS_REQD = REP_ERR_BIT + 5;
export const REP_ERR_UNKNOWN = REP_ERR_BIT + 6;
export const REP_ERR_SHUTDOWN = REP_ERR_BIT + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT + 8;

/** Information types of `NBD_OPT_GO`. */
export const INFO_EXPORT = 0;
export const INFO_BLOCK_SIZE = 3;

/** Transmission flags. */
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
export const TFLAG_CAN_MULTI_CONN = 1 << 8;

/** Request magic and commands. */
export const REQUEST_MAGIC = 0x25609513;
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

/** Reply magics. */
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Structured reply flag and chunk types. */
export const REPLY_FLAG_DONE = 1;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR_BIT = 0x8000;
export const REPLY_TYPE_ERROR_OFFSET = 0x8002;

/** `base:allocation` flags. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

/** The metadata context that says where data is. */
export const BASE_ALLOCATION = "base:allocation";

/** The IANA port of NBD. */
export const NBD_PORT = 10809;

/** Longest string the protocol allows (names, messages). */
export const MAX_STRING = 4096;

/** Characters of a server's message quoted in an error (the spec's advised length). */
const MAX_QUOTED = 256;

/**
 * A message the server sent, fit for one line of an error: control, format and line
 * separator characters (newlines, terminal escapes) shown escaped
 * ({@link escapeControls}), and cut to 256 characters.
 */
export function serverText(bytes: Uint8Array): string {
  const text = escapeControls(new TextDecoder().decode(bytes.subarray(0, MAX_STRING)).trim());
  const chars = [...text];
  return chars.length <= MAX_QUOTED ? text : `${chars.slice(0, MAX_QUOTED).join("")}…`;
}

/** The error numbers of the protocol, by name, with what they mean. */
const ERRORS: Record<number, string> = {
  1: "EPERM (operation not permitted)",
  5: "EIO (input/output error)",
  12: "ENOMEM (the server is out of memory)",
  22: "EINVAL (invalid argument)",
  28: "ENOSPC (no space left on the export)",
  75: "EOVERFLOW (value too large)",
  95: "ENOTSUP (operation not supported)",
  108: "ESHUTDOWN (the server is shutting down)",
};

/** The name of an NBD error number ("EIO (input/output error)"). */
export function errorName(code: number): string {
  return ERRORS[code] ?? `error ${code}`;
}

/** The name of an option, for messages. */
export function optionName(option: number): string {
  return {
    [OPT_EXPORT_NAME]: "NBD_OPT_EXPORT_NAME",
    [OPT_STARTTLS]: "NBD_OPT_STARTTLS",
    [OPT_GO]: "NBD_OPT_GO",
    [OPT_STRUCTURED_REPLY]: "NBD_OPT_STRUCTURED_REPLY",
    [OPT_SET_META_CONTEXT]: "NBD_OPT_SET_META_CONTEXT",
  }[option] ?? `option ${option}`;
}

/** The name of a command, for messages. */
export function commandName(command: number): string {
  return {
    [CMD_READ]: "read",
    [CMD_WRITE]: "write",
    [CMD_FLUSH]: "flush",
    [CMD_WRITE_ZEROES]: "write of zeroes",
    [CMD_BLOCK_STATUS]: "block status query",
    [CMD_DISC]: "disconnect",
  }[command] ?? `command ${command}`;
}
