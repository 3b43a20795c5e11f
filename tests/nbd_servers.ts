/**
 * Real NBD servers for the tests and the bench: `nbdkit` and `qemu-nbd` started on a
 * Unix socket (or a loopback port), TLS certificates made with `certtool`, and the
 * libnbd tools (`nbdcopy`, `nbdinfo`) as oracles. A test that needs them is declared
 * with {@link nbdTest}: skipped on a machine without them, failing in CI.
 */
import { IN_CI, run } from "./helpers.ts";

/** The tools the NBD tests use, with the Debian package of each. */
const TOOLS: [string, string][] = [
  ["nbdkit", "nbdkit"],
  ["qemu-nbd", "qemu-utils"],
  ["nbdcopy", "libnbd-bin"],
  ["nbdinfo", "libnbd-bin"],
  ["certtool", "gnutls-bin"],
];

async function have(tool: string): Promise<boolean> {
  try {
    const r = await new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
    return r.success;
  } catch {
    return false;
  }
}

/** The missing tools, as "tool (package)". */
export const MISSING_NBD_TOOLS: string[] = (await Promise.all(
  TOOLS.map(async ([tool, pkg]) => (await have(tool)) ? null : `${tool} (${pkg})`),
)).filter((t): t is string => t !== null);

/** A test that needs the NBD servers and tools; fails in CI if they are missing. */
export function nbdTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name,
    ignore: MISSING_NBD_TOOLS.length > 0 && !IN_CI,
    fn: async (t) => {
      if (MISSING_NBD_TOOLS.length > 0) {
        throw new Error(`missing: ${MISSING_NBD_TOOLS.join(", ")}: apt-get install -y them`);
      }
      await fn(t);
    },
  });
}

/** A running server; `stop()` ends it. */
export interface Server {
  /** The NBD URI of its export. */
  uri: string;
  stop(): Promise<void>;
}

async function waitFor(path: string, child: Deno.ChildProcess, what: string): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  for (let i = 0; i < 400; i++) {
    try {
      await Deno.stat(path);
      return;
    } catch {
      if (exited) throw new Error(`${what} exited before listening`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  throw new Error(`${what} did not start listening on ${path}`);
}

async function waitForPort(port: number, what: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    try {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      c.close();
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  throw new Error(`${what} did not start listening on port ${port}`);
}

function stopper(child: Deno.ChildProcess): () => Promise<void> {
  return async () => {
    try {
      child.kill("SIGTERM");
    } catch {
      // already gone
    }
    await child.status;
  };
}

let serial = 0;

/**
 * Starts `nbdkit` on a Unix socket in `dir`: `args` are the plugin, its parameters
 * and any filters (e.g. `["--filter=delay", "memory", "64M", "rdelay=10ms"]`).
 */
export async function startNbdkit(dir: string, args: string[]): Promise<Server> {
  const socket = `${dir}/nbdkit-${++serial}.sock`;
  const child = new Deno.Command("nbdkit", {
    args: ["-f", "--exit-with-parent", "-U", socket, ...args],
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  await waitFor(socket, child, "nbdkit");
  return { uri: `nbd+unix:///?socket=${socket}`, stop: stopper(child) };
}

/** Options of {@link startQemuNbd}. */
export interface QemuNbdOptions {
  /** Image format (default raw). */
  format?: string;
  /** Export name (default "disk"). */
  name?: string;
  /** Serve read-only (default true). */
  readOnly?: boolean;
  /** Listen on this loopback port instead of a Unix socket. */
  port?: number;
  /** Directory of `ca-cert.pem`, `server-cert.pem`, `server-key.pem`: serve TLS only. */
  tlsDir?: string;
  /** Clients served at once (default 8). */
  shared?: number;
}

/** Starts `qemu-nbd` serving `image`; the URI's scheme is nbds when TLS is on. */
export async function startQemuNbd(
  dir: string,
  image: string,
  options: QemuNbdOptions = {},
): Promise<Server> {
  const name = options.name ?? "disk";
  const args = [
    "-t",
    "-f",
    options.format ?? "raw",
    "-x",
    name,
    "-e",
    String(options.shared ?? 8),
    "--cache=writeback",
  ];
  if (options.readOnly !== false) args.push("-r");
  if (options.tlsDir !== undefined) {
    args.push(
      "--object",
      `tls-creds-x509,id=tls0,endpoint=server,dir=${options.tlsDir},verify-peer=off`,
      "--tls-creds",
      "tls0",
    );
  }
  const socket = `${dir}/qemu-nbd-${++serial}.sock`;
  if (options.port !== undefined) args.push("-b", "127.0.0.1", "-p", String(options.port));
  else args.push("-k", socket);
  args.push(image);
  const child = new Deno.Command("qemu-nbd", { args, stdout: "null", stderr: "inherit" }).spawn();
  const tls = options.tlsDir !== undefined;
  if (options.port !== undefined) await waitForPort(options.port, "qemu-nbd");
  else await waitFor(socket, child, "qemu-nbd");
  const uri = options.port !== undefined
    ? `nbd${tls ? "s" : ""}://127.0.0.1:${options.port}/${name}`
    : `nbd${tls ? "s" : ""}+unix:///${name}?socket=${socket}`;
  return { uri, stop: stopper(child) };
}

/**
 * Makes a CA and a server certificate (for `localhost` and 127.0.0.1) in `dir` with
 * certtool, in the file names QEMU's tls-creds-x509 expects.
 */
export async function makeCertificates(dir: string, hostname = "localhost"): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const tool = async (args: string[], out: string) => {
    const r = await run("certtool", [...args, "--outfile", `${dir}/${out}`]);
    if (r.code !== 0) throw new Error(`certtool ${args.join(" ")}: ${r.stderr}`);
  };
  await Deno.writeTextFile(`${dir}/ca.info`, "cn = diskstream test CA\nca\ncert_signing_key\n");
  await Deno.writeTextFile(
    `${dir}/server.info`,
    `organization = diskstream test\ncn = ${hostname}\ndns_name = ${hostname}\n` +
      "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n",
  );
  await tool(["--generate-privkey"], "ca-key.pem");
  await tool([
    "--generate-self-signed",
    "--load-privkey",
    `${dir}/ca-key.pem`,
    "--template",
    `${dir}/ca.info`,
  ], "ca-cert.pem");
  await tool(["--generate-privkey"], "server-key.pem");
  await tool([
    "--generate-certificate",
    "--load-ca-certificate",
    `${dir}/ca-cert.pem`,
    "--load-ca-privkey",
    `${dir}/ca-key.pem`,
    "--load-privkey",
    `${dir}/server-key.pem`,
    "--template",
    `${dir}/server.info`,
  ], "server-cert.pem");
}

/** A free loopback TCP port. */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Copies the whole export at `uri` into the raw file `out` with nbdcopy. */
export async function nbdcopyTo(uri: string, out: string): Promise<void> {
  const r = await run("nbdcopy", [uri, out]);
  if (r.code !== 0) throw new Error(`nbdcopy ${uri} ${out}: ${r.stderr}`);
}

/** The data extents (not flagged zero) of the export, from `nbdinfo --map --json`. */
export async function nbdinfoData(uri: string): Promise<[number, number][]> {
  const r = await run("nbdinfo", ["--map", "--json", uri]);
  if (r.code !== 0) throw new Error(`nbdinfo --map ${uri}: ${r.stderr}`);
  const map = JSON.parse(new TextDecoder().decode(r.stdout)) as {
    offset: number;
    length: number;
    type: number;
  }[];
  const out: [number, number][] = [];
  for (const e of map) {
    if ((e.type & 2) !== 0) continue;
    const last = out[out.length - 1];
    if (last !== undefined && last[1] === e.offset) last[1] += e.length;
    else out.push([e.offset, e.offset + e.length]);
  }
  return out;
}
