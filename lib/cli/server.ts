/**
 * `diskstream server`: serve named disks on XAPI's `export_raw_vdi` /
 * `import_raw_vdi` endpoints (see `lib/server/server.ts`).
 *
 * @module
 */
import type { Command } from "commander";
import { DiskstreamError, UsageError } from "../errors.ts";

interface ServerFlags {
  listen: string;
  disk?: string[];
  readOnly?: boolean;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  maxStreams: number;
  headerTimeout: number;
  idleTimeout: number;
  grace: number;
}

const positive = (flag: string) => (v: string) => {
  if (!/^\d+$/.test(v) || Number(v) < 1) {
    throw new UsageError(`${flag} needs a whole number from 1, got '${v}'`);
  }
  return Number(v);
};

/** `HOST:PORT` (`[::1]:8080` for IPv6) → its parts. */
export function parseListen(v: string): { hostname: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})$/.exec(v);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new UsageError(
      `--listen needs HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got '${v}'`,
    );
  }
  return { hostname: m[1] ?? m[2], port };
}

/** Registers `server` on `program`. */
export function registerServer(program: Command): void {
  program
    .command("server")
    .description(
      "Serve disks over HTTP(S) on XAPI's endpoints: GET /export_raw_vdi?vdi=NAME&format=F\n" +
        "[&base=NAME] streams a disk as F = qcow2, vhd, raw, chunked or tar (HEAD gives its\n" +
        "length), PUT\n" +
        "/import_raw_vdi?vdi=NAME&format=F writes an image into a disk, GET /disks lists\n" +
        "them. Only the disks named with --disk are reachable. A token is required unless\n" +
        "the server listens on a loopback address. SIGTERM or SIGINT stop it gracefully.",
    )
    .option("--listen <HOST:PORT>", "address and port to listen on", "127.0.0.1:8080")
    .option(
      "--disk <NAME=PATH>",
      "serve the raw file or block device PATH as NAME (repeatable)",
      (v: string, all: string[] = []) => [...all, v],
    )
    .option("--read-only", "refuse imports")
    .option(
      "--token-file <FILE>",
      "clients must send the token in FILE (Authorization: Bearer TOKEN, or as the basic-auth\n" +
        "password); FILE must not be world-readable",
    )
    .option("--tls-cert <FILE>", "serve HTTPS with this certificate chain (PEM)")
    .option("--tls-key <FILE>", "the private key of --tls-cert (PEM)")
    .option(
      "--max-streams <N>",
      "exports and imports at once (more: 503)",
      positive("--max-streams"),
      8,
    )
    .option(
      "--header-timeout <SECONDS>",
      "close a connection whose request headers take longer",
      positive("--header-timeout"),
      30,
    )
    .option(
      "--idle-timeout <SECONDS>",
      "close a connection where no byte moved for this long",
      positive("--idle-timeout"),
      120,
    )
    .option(
      "--grace <SECONDS>",
      "on SIGTERM, how long running streams may go on before they are aborted",
      positive("--grace"),
      30,
    )
    .addHelpText(
      "after",
      "\nExamples:\n" +
        "  diskstream server --disk vm1=/dev/vg/vm1 --disk vm2=/srv/vm2.raw\n" +
        "  curl -o vm1.qcow2 'http://127.0.0.1:8080/export_raw_vdi?vdi=vm1&format=qcow2'\n" +
        "  diskstream server --listen 0.0.0.0:8443 --disk vm1=/dev/vg/vm1 \\\n" +
        "    --token-file /etc/diskstream/token --tls-cert cert.pem --tls-key key.pem\n" +
        "  diskstream export disk.raw -o 'https://host:8443/import_raw_vdi?vdi=vm1&format=qcow2' \\\n" +
        '    --header "Authorization: Bearer $(cat token)" --cacert ca.pem',
    )
    .action(async (flags: ServerFlags) => {
      const { hostname, port } = parseListen(flags.listen);
      const disks: Record<string, string> = {};
      for (const spec of flags.disk ?? []) {
        const eq = spec.indexOf("=");
        if (eq <= 0 || eq === spec.length - 1) {
          throw new UsageError(`--disk needs NAME=PATH, got '${spec}'`);
        }
        const name = spec.slice(0, eq);
        if (Object.hasOwn(disks, name)) throw new UsageError(`--disk ${name} is given twice`);
        disks[name] = await checkDisk(spec.slice(eq + 1));
      }
      if ((flags.tlsCert === undefined) !== (flags.tlsKey === undefined)) {
        throw new UsageError("--tls-cert and --tls-key go together");
      }
      const tls = flags.tlsCert !== undefined
        ? {
          cert: await readPem(flags.tlsCert, "--tls-cert"),
          key: await readPem(flags.tlsKey!, "--tls-key"),
        }
        : undefined;
      const token = flags.tokenFile === undefined ? undefined : await readToken(flags.tokenFile);
      const { startDiskServer } = await import("../server/server.ts");
      const server = await startDiskServer({
        hostname,
        port,
        disks,
        readOnly: flags.readOnly,
        token,
        tls,
        maxStreams: flags.maxStreams,
        headerTimeoutMs: flags.headerTimeout * 1000,
        idleTimeoutMs: flags.idleTimeout * 1000,
      });
      console.error(
        `diskstream: serving ${Object.keys(disks).join(", ")} on ${server.url}` +
          `${token ? "" : " (no token: loopback only)"}${flags.readOnly ? " read-only" : ""}`,
      );
      await new Promise<void>((resolve) => {
        const stop = (signal: Deno.Signal) => {
          console.error(
            `diskstream: ${signal}: no new requests; running streams have ${flags.grace} s to finish`,
          );
          Deno.removeSignalListener("SIGTERM", onTerm);
          Deno.removeSignalListener("SIGINT", onInt);
          server.close(flags.grace * 1000).then(resolve);
        };
        const onTerm = () => stop("SIGTERM");
        const onInt = () => stop("SIGINT");
        Deno.addSignalListener("SIGTERM", onTerm);
        Deno.addSignalListener("SIGINT", onInt);
      });
      console.error("diskstream: stopped");
    });
}

/** A disk path must exist and be a regular file or a block device. */
async function checkDisk(path: string): Promise<string> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (err) {
    const { describeIoError } = await import("../errors.ts");
    throw describeIoError(err, path, "serve");
  }
  if (!info.isFile && !info.isBlockDevice) {
    throw new UsageError(`--disk ${path} is neither a regular file nor a block device`);
  }
  return path;
}

async function readPem(path: string, flag: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    throw new UsageError(`${flag} ${path}: ${(err as Error).message}`);
  }
}

/** Reads the token, refusing a file anyone may read and an empty token. */
async function readToken(path: string): Promise<string> {
  let text: string;
  let mode: number | null;
  try {
    mode = (await Deno.stat(path)).mode;
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new UsageError(`--token-file ${path}: ${(err as Error).message}`);
  }
  if (mode !== null && (mode & 0o004) !== 0) {
    throw new DiskstreamError(
      `--token-file ${path} is world-readable: chmod o-r ${path} (0600 is best), then start again`,
    );
  }
  const token = text.trim();
  if (token.length < 16 || /\s/.test(token)) {
    throw new UsageError(
      `--token-file ${path} must hold one token of at least 16 characters without spaces ` +
        `(e.g. from: head -c 24 /dev/urandom | base64)`,
    );
  }
  return token;
}
