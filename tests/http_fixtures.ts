/**
 * Real HTTP peers for the tests and the bench: `diskstream server` as a subprocess,
 * nginx with its DAV module on a loopback port (a temp config; works as root),
 * curl, and a self-signed certificate made by certtool.
 *
 * Tests that need one of these tools are declared with {@link toolTest}: skipped on
 * a developer machine without it, **failing** in CI (CI=true).
 */
import { CLI, IN_CI, pseudoRandom, writeSparse } from "./helpers.ts";

const MiB = 1 << 20;

/** A sparse disk of `size` bytes with 3 MiB of data in two places (one unaligned). */
export async function makeDisk(path: string, size = 32 * MiB, seed = 1): Promise<void> {
  await writeSparse(path, size, [
    [MiB, pseudoRandom(2 * MiB, seed)],
    [size - 3 * MiB - 512, pseudoRandom(MiB, seed + 1)],
  ]);
}

/** The Debian package that brings each tool (for the failure message). */
const PACKAGES: Record<string, string> = {
  curl: "curl",
  nginx: "nginx-light libnginx-mod-http-dav-ext",
  certtool: "gnutls-bin",
  "qemu-img": "qemu-utils",
};

async function have(tool: string): Promise<boolean> {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":").concat(["/usr/sbin", "/sbin"])) {
    try {
      if ((await Deno.stat(`${dir}/${tool}`)).isFile) return true;
    } catch {
      // not here
    }
  }
  return false;
}

/** A test that needs `tools`; fails in CI when one is missing. */
export function toolTest(
  name: string,
  tools: string[],
  fn: (t: Deno.TestContext) => Promise<void>,
): void {
  const found = Promise.all(tools.map(have));
  Deno.test({
    name,
    // Decided at run time: a missing tool skips the body outside CI.
    fn: async (t) => {
      const ok = await found;
      const missing = tools.filter((_, i) => !ok[i]);
      if (missing.length > 0) {
        const msg = `missing ${missing.join(", ")}: apt-get install -y ${
          missing.map((m) => PACKAGES[m] ?? m).join(" ")
        }`;
        if (IN_CI) throw new Error(msg);
        console.warn(`skipped: ${msg}`);
        return;
      }
      await fn(t);
    },
  });
}

/** A `diskstream server` subprocess. */
export interface ServerProcess {
  /** Base URL, e.g. `http://127.0.0.1:41234`. */
  url: string;
  port: number;
  /** Its process id. */
  pid: number;
  /** Everything it wrote on stderr so far (the access log). */
  log(): string;
  /** Waits until the log holds a line matching `re` (at most `ms`). */
  waitLog(re: RegExp, ms?: number): Promise<string>;
  /** Sends a signal. */
  kill(signal?: Deno.Signal): void;
  /** Waits for the exit; returns the status. */
  exited(): Promise<number>;
  /** Kills it (SIGKILL) if still running and waits. */
  stop(): Promise<void>;
}

/**
 * Starts `diskstream server ARGS` on a free loopback port (unless --listen is given);
 * `cli` is the cli.ts to run (default: this checkout's).
 */
export async function startServer(args: string[], cli = CLI): Promise<ServerProcess> {
  const listen = args.includes("--listen") ? [] : ["--listen", "127.0.0.1:0"];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", cli, "server", ...listen, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let text = "";
  let done = false;
  const decoder = new TextDecoder();
  const reading = (async () => {
    for await (const chunk of child.stderr) text += decoder.decode(chunk, { stream: true });
    done = true;
  })();
  const status = child.status;
  const waitLog = async (re: RegExp, ms = 20_000) => {
    const end = Date.now() + ms;
    for (;;) {
      const m = re.exec(text);
      if (m) return m[0];
      if (done || Date.now() > end) {
        throw new Error(`server log never matched ${re}:\n${text}`);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  };
  const line = await waitLog(/serving .* on (https?:\/\/\S+)/).catch(async (err) => {
    child.kill("SIGKILL");
    await status;
    throw err;
  });
  const url = /on (https?:\/\/\S+)/.exec(line)![1];
  let exitCode: number | null = null;
  const exited = async () => {
    exitCode ??= (await status).code;
    await reading;
    return exitCode;
  };
  return {
    url,
    port: Number(new URL(url).port),
    pid: child.pid,
    log: () => text,
    waitLog,
    kill: (signal = "SIGTERM") => {
      try {
        child.kill(signal);
      } catch {
        // already gone
      }
    },
    exited,
    async stop() {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
      await exited();
    },
  };
}

/** A free loopback TCP port (bound, read, released). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** An nginx serving `root` with PUT (DAV) on a loopback port. */
export interface Nginx {
  url: string;
  root: string;
  /** nginx's access log lines (`$request $status $content_length $http_transfer_encoding`). */
  accessLog(): Promise<string>;
  stop(): Promise<void>;
}

/**
 * Starts nginx in the foreground with a temp config in `dir`: files under
 * `dir/root`, PUT allowed (DAV), `/old/*` answering 307 to `/dav/*`, `/private/*`
 * behind basic auth (user `u`, password `p w`), `/gone` 404. Works as root (the
 * worker runs as root) and as a normal user.
 */
export async function startNginx(dir: string): Promise<Nginx> {
  const root = `${dir}/root`;
  await Deno.mkdir(`${root}/dav`, { recursive: true });
  await Deno.mkdir(`${root}/private`, { recursive: true });
  await Deno.mkdir(`${dir}/tmp`, { recursive: true });
  await Deno.writeTextFile(`${dir}/htpasswd`, "u:{PLAIN}p w\n");
  const port = freePort();
  const isRoot = Deno.uid() === 0;
  const davModule = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so";
  let hasDavExt = false;
  try {
    hasDavExt = (await Deno.stat(davModule)).isFile;
  } catch {
    // DAV PUT is built in; the extension only adds PROPFIND
  }
  const conf = `
${hasDavExt ? `load_module ${davModule};` : ""}
daemon off;
master_process off;
worker_processes 1;
${isRoot ? "user root;" : ""}
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 128; }
http {
  log_format t '$request $status $content_length "$http_transfer_encoding" "$http_expect"';
  access_log ${dir}/access.log t;
  client_body_temp_path ${dir}/tmp;
  proxy_temp_path ${dir}/tmp;
  fastcgi_temp_path ${dir}/tmp;
  uwsgi_temp_path ${dir}/tmp;
  scgi_temp_path ${dir}/tmp;
  client_max_body_size 0;
  default_type application/octet-stream;
  sendfile on;
  server {
    listen 127.0.0.1:${port};
    root ${root};
    location /dav/ {
      dav_methods PUT DELETE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }
    location /private/ {
      auth_basic "test";
      auth_basic_user_file ${dir}/htpasswd;
      dav_methods PUT;
    }
    location ~ ^/old/(?<uri_tail>.*)$ { return 307 /dav/$uri_tail; }
    location = /see-other { return 303 /dav/x; }
  }
}
`;
  await Deno.writeTextFile(`${dir}/nginx.conf`, conf);
  const child = new Deno.Command("nginx", {
    args: ["-c", `${dir}/nginx.conf`, "-p", dir, "-e", `${dir}/error.log`],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const url = `http://127.0.0.1:${port}`;
  const end = Date.now() + 10_000;
  for (;;) {
    try {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      c.close();
      break;
    } catch {
      if (Date.now() > end) {
        child.kill("SIGKILL");
        const out = await child.output().catch(() => null);
        const err = await Deno.readTextFile(`${dir}/error.log`).catch(() => "");
        throw new Error(
          `nginx did not start: ${err} ${out ? new TextDecoder().decode(out.stderr) : ""}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    url,
    root,
    accessLog: () => Deno.readTextFile(`${dir}/access.log`).catch(() => ""),
    async stop() {
      try {
        child.kill("SIGQUIT");
      } catch {
        // gone
      }
      await child.output();
    },
  };
}

/** A self-signed certificate for 127.0.0.1 and localhost, made by certtool. */
export async function makeCert(dir: string): Promise<{ cert: string; key: string }> {
  const key = `${dir}/key.pem`;
  const cert = `${dir}/cert.pem`;
  const template = `${dir}/cert.cfg`;
  await Deno.writeTextFile(
    template,
    'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\n' +
      "expiration_days = 2\ntls_www_server\nsigning_key\nencryption_key\n",
  );
  for (
    const args of [
      ["--generate-privkey", "--key-type=ecdsa", "--outfile", key],
      ["--generate-self-signed", "--load-privkey", key, "--template", template, "--outfile", cert],
    ]
  ) {
    const r = await new Deno.Command("certtool", { args, stdout: "null", stderr: "piped" })
      .output();
    if (!r.success) throw new Error(`certtool failed: ${new TextDecoder().decode(r.stderr)}`);
  }
  return { cert, key };
}

/** Runs curl with `args`; returns status, body (stdout) and stderr. */
export async function curl(
  args: string[],
): Promise<{ code: number; body: string; stdout: Uint8Array; stderr: string }> {
  const r = await new Deno.Command("curl", { args: ["-sS", ...args], stdin: "null" }).output();
  return {
    code: r.code,
    body: new TextDecoder().decode(r.stdout),
    stdout: r.stdout,
    stderr: new TextDecoder().decode(r.stderr),
  };
}
