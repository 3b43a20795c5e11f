/**
 * The HTTP cases of `deno task bench` (issue 11): the disk server against nginx
 * serving the same bytes as a static file, `export -o http://…` against `curl -T`
 * of the finished image, and 16 concurrent exports from the server (byte-correct,
 * the server's peak RSS).
 *
 * @module
 */
import type { InputSizes } from "./bench_inputs.ts";
import type { BenchCase, Contender, Sample } from "./bench_measure.ts";
import { commandOutput } from "./bench_measure.ts";
import { imagesEqual, sha256File } from "../tests/helpers.ts";
import { type Nginx, type ServerProcess, startNginx, startServer } from "../tests/http_fixtures.ts";

/** What the HTTP cases need from the bench. */
export interface HttpBenchContext {
  work: string;
  /** A work dir in memory (tmpfs), when there is one; removed with `work`. */
  memoryWork?: string;
  /** The diskstream command (argv prefix). */
  ds: string[];
  fullRaw: () => Promise<string>;
  /** The full disk as `diskstream export -o FILE` writes it (made once). */
  fullExport: () => Promise<string>;
  sizes: InputSizes;
  log: (line: string) => void;
}

const MiB = 1024 * 1024;
const SERVER_RSS_LIMIT_MIB = 300;
const CONCURRENT = 16;
/** The server's peak RSS in the concurrency case (MiB), once measured. */
let serverPeakMiB: number | null = null;

/** A fast hash of stdin or of a file argument: XXH128 (Debian's xxhash), else SHA-256. */
const HASH = await commandOutput("xxhsum", ["-H2", "/dev/null"]) === null
  ? "sha256sum"
  : "xxhsum -H2";

/** The hash (hex) of what `script` (bash) writes to its stdout, or null if it fails. */
async function hashOf(script: string): Promise<string | null> {
  const out = await commandOutput("bash", ["-c", `set -o pipefail; ${script} | ${HASH}`]);
  return out?.split(/\s/)[0] ?? null;
}

/** Peak RSS (VmHWM) of a running process, in MiB. */
async function peakRss(pid: number): Promise<number | null> {
  try {
    const status = await Deno.readTextFile(`/proc/${pid}/status`);
    const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
    return m ? Number(m[1]) / 1024 : null;
  } catch {
    return null;
  }
}

/** nginx and a diskstream server on loopback ports, started once per case. */
class Peers {
  nginx: Nginx | null = null;
  server: ServerProcess | null = null;
  constructor(readonly dir: string, readonly ds: string[]) {}
  async start(disk: string, extra: string[] = []): Promise<void> {
    await Deno.mkdir(this.dir, { recursive: true });
    this.nginx = await startNginx(`${this.dir}/nginx`);
    this.server = await startServer(["--disk", `d=${disk}`, ...extra], this.ds.at(-1));
  }
  async stop(): Promise<void> {
    await this.server?.stop();
    await this.nginx?.stop();
    this.server = this.nginx = null;
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }
}

/** Runs diskstream `args` once (untimed setup), failing loudly. */
async function ds(ctx: HttpBenchContext, args: string[]): Promise<void> {
  const [cmd, ...rest] = ctx.ds;
  const r = await new Deno.Command(cmd, {
    args: [...rest, ...args],
    stdout: "null",
    stderr: "piped",
  })
    .output();
  if (!r.success) {
    throw new Error(`diskstream ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  }
}

/** The HTTP cases. Nothing starts until a case's contenders are asked for. */
export function httpCases(ctx: HttpBenchContext): BenchCase[] {
  const get = new Peers(`${ctx.work}/http-get`, ctx.ds);
  // nginx keeps the uploads in memory where it can: what is timed is the clients, not how
  // fast this machine's disk takes 2 GiB.
  const put = new Peers(`${ctx.memoryWork ?? ctx.work}/http-put`, ctx.ds);
  const many = new Peers(`${ctx.work}/http-16`, ctx.ds);
  const manyNotes: string[] = [
    "Timed once: no goal bounds this time; the goal is the server's memory, and the run " +
    `checks the bytes of all ${CONCURRENT} downloads.`,
  ];
  return [
    {
      name: "http-get",
      title: "server export of the fully allocated disk as qcow2, fetched by curl → /dev/null",
      reference: "nginx static file",
      notes: [
        "The server plans the export (pass 1 reads the disk) and then streams it; nginx sends " +
        "the same qcow2 bytes from a file (sendfile).",
      ],
      cleanup: () => get.stop(),
      contenders: async (): Promise<Contender[]> => {
        const raw = await ctx.fullRaw();
        await get.start(raw);
        const image = `${get.nginx!.root}/dav/disk.qcow2`;
        await Deno.link(await ctx.fullExport(), image);
        const url = `${get.server!.url}/export_raw_vdi?vdi=d&format=qcow2`;
        return [
          {
            name: "diskstream",
            pipeline: { stages: [["curl", "-sf", "-o", "/dev/null", url]] },
            // One more download, hashed as it arrives (nothing written to disk).
            verify: async () => {
              const got = await hashOf(`curl -sf '${url}'`);
              const same = got !== null && got === await hashOf(`cat '${image}'`);
              return same ? null : "the server's export differs from `diskstream export -o FILE`";
            },
          },
          {
            name: "nginx static file",
            pipeline: {
              stages: [["curl", "-sf", "-o", "/dev/null", `${get.nginx!.url}/dav/disk.qcow2`]],
            },
          },
        ];
      },
    },
    {
      name: "http-put",
      title: "export of the fully allocated disk → nginx (WebDAV PUT)",
      reference: "curl -T",
      notes: [
        "`curl -T` uploads the finished qcow2 (made beforehand, untimed) that diskstream " +
        "produces while it uploads.",
      ],
      cleanup: () => put.stop(),
      contenders: async (): Promise<Contender[]> => {
        const raw = await ctx.fullRaw();
        await put.start(raw);
        const image = await ctx.fullExport();
        const out = `${put.nginx!.root}/dav/up.qcow2`;
        const remove = () => Deno.remove(out).catch(() => {});
        return [
          {
            name: "diskstream",
            pipeline: {
              stages: [[...ctx.ds, "export", raw, "-o", `${put.nginx!.url}/dav/up.qcow2`]],
            },
            after: remove,
            verify: async () =>
              await imagesEqual(raw, out, "raw", "qcow2") ? null : `${out} differs from ${raw}`,
          },
          {
            name: "curl -T",
            pipeline: { stages: [["curl", "-sf", "-T", image, `${put.nginx!.url}/dav/up.qcow2`]] },
            after: remove,
          },
        ];
      },
    },
    {
      name: "http-16",
      title: `${CONCURRENT} concurrent curl exports of a 256 MiB disk (qcow2) from the server`,
      reference: "diskstream",
      notes: manyNotes,
      cleanup: async () => {
        if (many.server) {
          serverPeakMiB = await peakRss(many.server.pid);
          manyNotes.push(
            `Server peak RSS (VmHWM) over the case: ${
              serverPeakMiB === null ? "unknown" : `${serverPeakMiB.toFixed(0)} MiB`
            } (goal < ${SERVER_RSS_LIMIT_MIB} MiB).`,
          );
        }
        await many.stop();
      },
      contenders: async (): Promise<Contender[]> => {
        await Deno.mkdir(many.dir, { recursive: true });
        const disk = `${many.dir}/disk.raw`;
        const f = await Deno.open(disk, { write: true, create: true });
        const random = await Deno.open("/dev/urandom");
        const buf = new Uint8Array(4 * MiB);
        for (let done = 0; done < 256 * MiB; done += buf.length) {
          let n = 0;
          while (n < buf.length) n += (await random.read(buf.subarray(n))) ?? 0;
          let w = 0;
          while (w < buf.length) w += await f.write(buf.subarray(w));
        }
        f.close();
        random.close();
        await many.start(disk, ["--max-streams", String(CONCURRENT)]);
        const url = `${many.server!.url}/export_raw_vdi?vdi=d&format=qcow2`;
        const reference = `${many.dir}/ref.qcow2`;
        await ds(ctx, ["export", disk, "-o", reference]);
        const want = await sha256File(reference);
        const sums = `${many.dir}/sums.txt`;
        const script =
          `for i in $(seq ${CONCURRENT}); do curl -sf '${url}' | sha256sum & done; wait`;
        return [{
          name: "diskstream",
          pipeline: { stages: [["bash", "-c", script]], stdout: sums },
          runs: 1,
          verify: async () => {
            const lines = (await Deno.readTextFile(sums)).trim().split("\n");
            const right = lines.filter((l) => l.startsWith(want)).length;
            return right === CONCURRENT
              ? null
              : `${right} of ${CONCURRENT} downloads had the right bytes`;
          },
        }];
      },
    },
  ];
}

/** The goal rows the HTTP cases add beyond time ratios (the server's memory). */
export function httpGoalRows(results: Map<string, { samples: Sample[] }[]>): string[] {
  if (!results.has("http-16")) return [];
  const goal = `server peak RSS under ${SERVER_RSS_LIMIT_MIB} MiB during ${CONCURRENT} ` +
    `concurrent exports`;
  if (serverPeakMiB === null) return [`| ${goal} | < ${SERVER_RSS_LIMIT_MIB} MiB | — | n/a |`];
  return [
    `| ${goal} | < ${SERVER_RSS_LIMIT_MIB} MiB | ${serverPeakMiB.toFixed(0)} MiB | ${
      serverPeakMiB < SERVER_RSS_LIMIT_MIB ? "PASS" : "FAIL"
    } |`,
  ];
}
