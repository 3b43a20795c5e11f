/**
 * NBD URIs (NetworkBlockDevice/nbd, doc/uri.md): `nbd://HOST[:PORT]/EXPORT`,
 * `nbds://…` (TLS required), `nbd+unix:///EXPORT?socket=PATH` and `nbds+unix://…`.
 * The export name is the path without its first `/`, percent-decoded; the port
 * defaults to 10809. Query parameters other than `socket`, `tls-hostname`,
 * `tls-type=x509` and `tls-verify-peer=1` are refused (the spec asks that unknown
 * ones be diagnosed).
 *
 * @module
 */
import { UsageError } from "../errors.ts";
import { MAX_STRING, NBD_PORT } from "./constants.ts";

/** Where an NBD export is and how to reach it. */
export interface NbdAddress {
  /** The URI as given (for messages). */
  readonly uri: string;
  /** The export name sent to the server (may be empty). */
  readonly exportName: string;
  /** TCP: host and port; Unix: the socket path. */
  readonly transport:
    | { readonly kind: "tcp"; readonly host: string; readonly port: number }
    | { readonly kind: "unix"; readonly socket: string };
  /** True for `nbds` / `nbds+unix`: TLS is negotiated or the connection fails. */
  readonly tls: boolean;
  /** The name the server's certificate must hold (host, or `tls-hostname`). */
  readonly tlsHostname: string;
}

const SCHEMES: Record<string, { unix: boolean; tls: boolean }> = {
  "nbd:": { unix: false, tls: false },
  "nbds:": { unix: false, tls: true },
  "nbd+unix:": { unix: true, tls: false },
  "nbds+unix:": { unix: true, tls: true },
};

/**
 * True when `text` names an NBD export (its scheme is nbd, nbds, nbd+unix or nbds+unix).
 *
 * @example
 * ```ts
 * import { isNbdUri } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * assert.ok(isNbdUri("nbd+unix:///disk?socket=/run/nbd.sock"));
 * assert.ok(!isNbdUri("/dev/sda"));
 * ```
 */
export function isNbdUri(text: string): boolean {
  const m = /^([a-z+]+):/i.exec(text);
  return m !== null && `${m[1].toLowerCase()}:` in SCHEMES;
}

/**
 * Parses an NBD URI. Throws a {@link UsageError} naming what is wrong: an unknown
 * scheme, a Unix URI without `socket`, a TCP URI without a host, a bad port, an
 * unknown query parameter, or a TLS setting diskstream does not offer.
 *
 * @example
 * ```ts
 * import { parseNbdUri } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const a = parseNbdUri("nbds://xcp-host/0f3b?tls-hostname=pool.lan");
 * assert.deepEqual(a.transport, { kind: "tcp", host: "xcp-host", port: 10809 });
 * assert.equal(a.exportName, "0f3b");
 * assert.equal(a.tls, true);
 * assert.equal(a.tlsHostname, "pool.lan");
 * ```
 */
export function parseNbdUri(text: string): NbdAddress {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new UsageError(`${text} is not a valid NBD URI (nbd://HOST[:PORT]/EXPORT)`);
  }
  const scheme = SCHEMES[url.protocol];
  if (scheme === undefined) {
    throw new UsageError(`${text}: not an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)`);
  }
  if (url.username !== "" || url.password !== "") {
    throw new UsageError(`${text}: user names in NBD URIs (TLS PSK) are not supported`);
  }
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  } catch {
    throw new UsageError(`${text}: the export name is not valid percent-encoded UTF-8`);
  }
  if (exportName.includes("\0") || new TextEncoder().encode(exportName).length > MAX_STRING) {
    throw new UsageError(`${text}: the export name holds NUL or is over ${MAX_STRING} bytes`);
  }
  let socket: string | undefined;
  let tlsHostname: string | undefined;
  for (const [key, value] of url.searchParams) {
    if (key === "socket") socket = value;
    else if (key === "tls-hostname") tlsHostname = value;
    else if (key === "tls-type" && value !== "x509") {
      throw new UsageError(`${text}: only tls-type=x509 (certificates) is supported`);
    } else if (key === "tls-verify-peer" && value !== "1") {
      throw new UsageError(
        `${text}: the server's certificate is always verified (give its CA with --cacert)`,
      );
    } else if (key !== "tls-type" && key !== "tls-verify-peer") {
      throw new UsageError(`${text}: unknown NBD URI parameter '${key}'`);
    }
  }
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  if (scheme.unix) {
    if (socket === undefined || socket === "") {
      throw new UsageError(`${text}: a Unix socket URI needs ?socket=PATH`);
    }
    if (host !== "") throw new UsageError(`${text}: a Unix socket URI has no host (nbd+unix:///…)`);
    return {
      uri: text,
      exportName,
      transport: { kind: "unix", socket },
      tls: scheme.tls,
      tlsHostname: tlsHostname ?? "localhost",
    };
  }
  if (socket !== undefined) {
    throw new UsageError(`${text}: ?socket= belongs to nbd+unix:// URIs`);
  }
  if (host === "") throw new UsageError(`${text}: the URI names no host`);
  const port = url.port === "" ? NBD_PORT : Number(url.port);
  return {
    uri: text,
    exportName,
    transport: { kind: "tcp", host, port },
    tls: scheme.tls,
    tlsHostname: tlsHostname ?? host,
  };
}

/**
 * The `nbd+unix://` URI of export `exportName` on the Unix socket `socket`, both
 * percent-encoded (for callers given the two apart, as vhd-tool's `nbdhybrid` is).
 *
 * @example
 * ```ts
 * import { nbdUnixUri } from "./uri.ts";
 * import assert from "node:assert/strict";
 *
 * const uri = nbdUnixUri("/var/run/nbd sock", "vdi 1");
 * assert.equal(uri, "nbd+unix:///vdi%201?socket=%2Fvar%2Frun%2Fnbd%20sock");
 * ```
 */
export function nbdUnixUri(socket: string, exportName: string): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(socket)}`;
}
