/**
 * `deno task fuzz [--seconds N] [--seed S]`: structure-aware fuzzing of diskstream.
 *
 * A small corpus of qcow2 and VHD images is made by qemu-img at run time (and by
 * diskstream's own export, for the metadata-first layout). Each case takes one image
 * and mutates what its metadata says — header fields, L1/L2/BAT entries, offsets,
 * sizes, cluster bits, VHD fields with their checksums recomputed so parsing goes
 * deeper, truncation at every metadata boundary, L2 tables moved after the data; for
 * extended L2 images (16-byte entries, 32 subclusters a cluster) the subcluster bitmaps
 * and host offsets, bits past the disk's end, truncation inside a subcluster — and runs
 * the CLI on it:
 *
 * - `import` (the image through a pipe, or with `-i FILE`, into a new raw file or one
 *   full of 0xAA bytes; sometimes with a small --max-buffer, so that data met before its
 *   L2 table goes to the spool file),
 * - `headers` and `info`,
 * - `alloc`: hostile (and valid) allocation JSON given to `export --allocation`.
 *
 * Oracles: exit status 0 or 1 with exactly one `diskstream: …` line on failure and no
 * stack trace or internal error; a time bound and a peak-RSS bound; an import never
 * leaves a destination larger than the virtual size, and when qemu-img reads the image
 * too, the bytes equal `qemu-img convert -O raw`'s (VHD: with the sectors whose bitmap
 * bit is clear read as zeros, as diskstream does); `headers` lists every cluster that
 * holds non-zero data for qemu-img; valid hints export exactly the hinted clusters and
 * invalid ones are refused.
 *
 * A failing case is saved under `fuzz-failures/<family>-<seed>-<case>/` with its input
 * and `case.json`; `deno task fuzz --replay DIR` runs it again. `--seed S --case N`
 * regenerates case N of seed S (the corpus is deterministic).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { type Outcome, runMeasured } from "./fuzz_run.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const CLI = `${ROOT}cli.ts`;
const MiB = 1024 * 1024;

// ---------------------------------------------------------------- options

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "60" },
    seed: { type: "string" },
    case: { type: "string" },
    family: { type: "string" },
    replay: { type: "string" },
    out: { type: "string", default: `${ROOT}fuzz-failures` },
    "time-limit": { type: "string", default: "30" },
    "rss-limit": { type: "string", default: "400" },
    refusals: { type: "string" },
    quiet: { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
});

if (opts.help) {
  console.log(`Usage: deno task fuzz [--seconds N] [--seed S] [--family F] [--case N] [--replay DIR]

Structure-aware fuzzing of import, headers, info and export --allocation.

  --seconds N      run for N seconds (default 60)
  --seed S         the run's seed (default: random, printed)
  --family F       only this family: import, headers, info, alloc (comma-separated)
  --case N         run only case N of --seed S (reproduces it without saved files)
  --replay DIR     run a saved failing case again (fuzz-failures/…)
  --out DIR        where failing cases are saved (default fuzz-failures/)
  --time-limit S   seconds one command may take (default 30)
  --rss-limit MB   peak RSS one command may reach (default 400)
  --refusals FILE  append to FILE (JSON lines) the import cases refused although qemu-img
                   reads the image: candidates for needless strictness, not failures
Exit status 0 when no case failed, 1 otherwise.`);
  Deno.exit(0);
}

const TIME_LIMIT = Number(opts["time-limit"]) * 1000;
const RSS_LIMIT = Number(opts["rss-limit"]) * MiB;
/** Import's memory allowance in the fuzz: what the RSS bound is built on. */
const MAX_BUFFER = "32M";
/** Virtual sizes above this are not converted by qemu-img for comparison. */
const COMPARE_LIMIT = 256 * MiB;

// ---------------------------------------------------------------- random numbers

/** A small seeded generator (splitmix32): the same seed gives the same cases. */
class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  u32(): number {
    let z = (this.#s = (this.#s + 0x9e3779b9) >>> 0);
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return n <= 0 ? 0 : Math.floor((this.u32() / 2 ** 32) * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.u32() & 0xff;
    return out;
  }
}

/** The seed of case `index` of a run with seed `seed`. */
function caseSeed(seed: number, index: number): number {
  return new Rng((seed ^ Math.imul(index + 1, 0x27d4eb2d)) >>> 0).u32();
}

// ---------------------------------------------------------------- processes

function runBounded(cmd: string, args: string[], stdin?: Uint8Array): Promise<Outcome> {
  return runMeasured(cmd, args, { stdin, timeLimitMs: TIME_LIMIT, rssLimit: RSS_LIMIT });
}

/** Runs a helper tool (qemu-img, qemu-io). */
async function tool(cmd: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  // qemu-img on a mutated image gets a time bound too (it is the oracle, not under test).
  const r = await runMeasured(cmd, args, { timeLimitMs: TIME_LIMIT });
  return { ok: r.code === 0 && !r.killed, out: new TextDecoder().decode(r.stdout) + r.stderr };
}

function diskstream(args: string[], stdin?: Uint8Array): Promise<Outcome> {
  return runBounded(Deno.execPath(), ["run", "--allow-all", CLI, ...args], stdin);
}

/**
 * import's one note on success when data came before its tables and was spooled (with
 * a small --max-buffer): the only stderr line an exit 0 may have.
 */
const SPOOL_NOTE = /^import: [^\n]+ waited in a spool file [^\n]+\n?$/;

/** The oracle shared by every family: status, one line, no stack trace, bounds. */
function checkOutcome(o: Outcome, allowStdout: boolean, note?: RegExp): string | null {
  if (o.killed) return `killed: ${o.killed}`;
  if (o.peakRss > RSS_LIMIT) return `peak RSS ${(o.peakRss / MiB).toFixed(0)} MiB above the bound`;
  if (o.code !== 0 && o.code !== 1) return `exit status ${o.code} (expected 0 or 1)`;
  const err = o.stderr;
  if (/\n\s+at |\bat .*\.ts:\d+/.test(err)) return "a stack trace on stderr";
  if (o.code === 1) {
    if (!/^diskstream: [^\n]+\n?$/.test(err)) {
      return `stderr is not one 'diskstream: …' line: ${JSON.stringify(err.slice(0, 300))}`;
    }
    if (/internal error/.test(err)) return `an internal error: ${err.trim()}`;
  } else if (err.trim() !== "" && !note?.test(err)) {
    return `exit 0 with stderr output: ${JSON.stringify(err.slice(0, 300))}`;
  }
  if (!allowStdout && o.stdout.length > 0) return "unexpected output on stdout";
  return null;
}

// ---------------------------------------------------------------- corpus

interface Image {
  name: string;
  format: "qcow2" | "vhd";
  bytes: Uint8Array;
}

/** The raw disk behind every image: data, holes and an all-zero run, not cluster aligned. */
const SOURCE_SIZE = 3 * MiB + 7 * 512;

function sourceBytes(): Uint8Array {
  const rng = new Rng(0x5eed);
  const src = new Uint8Array(SOURCE_SIZE);
  const regions: [number, number][] = [
    [0, 65536],
    [200 * 1024, 100 * 1024],
    [MiB + 512, 3584],
    [2 * MiB - 4096, 12288],
    [SOURCE_SIZE - 1024, 1024],
  ];
  for (const [at, n] of regions) src.set(rng.bytes(n), at);
  // Low-entropy data too, so that compressed clusters are small.
  for (let i = 0; i < 40000; i++) src[1536 * 1024 + i] = (i >> 7) & 0xff;
  return src;
}

async function buildCorpus(dir: string): Promise<{ images: Image[]; source: string }> {
  const source = `${dir}/source.raw`;
  const src = sourceBytes();
  await Deno.writeFile(source, new Uint8Array(0));
  {
    using f = await Deno.open(source, { write: true });
    await f.truncate(SOURCE_SIZE);
    // Write only the non-zero 64 KiB pieces, so the raw file has holes.
    for (let at = 0; at < SOURCE_SIZE; at += 65536) {
      const piece = src.subarray(at, at + 65536);
      if (piece.some((b) => b !== 0)) {
        await f.seek(at, Deno.SeekMode.Start);
        for (let w = 0; w < piece.length;) w += await f.write(piece.subarray(w));
      }
    }
    // An allocated all-zero run.
    await f.seek(2560 * 1024, Deno.SeekMode.Start);
    await f.write(new Uint8Array(65536));
  }
  // qemu-img convert of the source: name, format, extra options.
  const jobs: [string, "qcow2" | "vhd", string[]][] = [
    ["q64.qcow2", "qcow2", []],
    ["q512.qcow2", "qcow2", ["-o", "cluster_size=512"]],
    ["q4k-v2.qcow2", "qcow2", ["-o", "cluster_size=4096,compat=0.10"]],
    ["q4k-z.qcow2", "qcow2", ["-c", "-o", "cluster_size=4096"]],
    ["v-dyn.vhd", "vhd", ["-o", "subformat=dynamic,force_size=on"]],
    ["v-fixed.vhd", "vhd", ["-o", "subformat=fixed,force_size=on"]],
  ];
  const images: Image[] = [];
  for (const [name, format, options] of jobs) {
    const path = `${dir}/${name}`;
    const out = format === "vhd" ? "vpc" : "qcow2";
    const r = await tool("qemu-img", ["convert", "-f", "raw", "-O", out, ...options, source, path]);
    if (!r.ok) throw new Error(`qemu-img convert ${options.join(" ")}: ${r.out}`);
    images.push({ name, format, bytes: await Deno.readFile(path) });
  }
  // Variants made by qemu-img create/qemu-io: zstd, extended L2 (subclusters), an
  // internal snapshot with writes after it (shared clusters, COPIED flags off), and a
  // backing file (the source itself, as raw).
  const variants: [string, string[], string[]][] = [
    ["q-zstd.qcow2", ["-o", "cluster_size=4096,compression_type=zstd"], []],
    ["q-extl2.qcow2", ["-o", "cluster_size=65536,extended_l2=on"], []],
    ["q-snap.qcow2", ["-o", "cluster_size=4096"], ["snapshot"]],
    ["q-backed.qcow2", ["-o", "cluster_size=4096", "-b", "source.raw", "-F", "raw"], []],
  ];
  for (const [name, options, extra] of variants) {
    const path = `${dir}/${name}`;
    const backed = options.includes("-b");
    const made = backed
      ? await tool("qemu-img", ["create", "-f", "qcow2", ...options, path])
      : await tool("qemu-img", [
        "convert",
        ...(name === "q-zstd.qcow2" ? ["-c"] : []),
        "-f",
        "raw",
        "-O",
        "qcow2",
        ...options,
        source,
        path,
      ]);
    if (!made.ok) throw new Error(`qemu-img for ${name}: ${made.out}`);
    if (extra.includes("snapshot")) {
      const r = await tool("qemu-img", ["snapshot", "-c", "s1", path]);
      if (!r.ok) throw new Error(`qemu-img snapshot: ${r.out}`);
    }
    const writes = ["write -P 0x5a 8192 12288", "write -z 0 4096", "write -P 0x33 2M 4096"];
    const w = await tool("qemu-io", ["-f", "qcow2", ...writes.flatMap((c) => ["-c", c]), path]);
    if (!w.ok) throw new Error(`qemu-io on ${name}: ${w.out}`);
    images.push({ name, format: "qcow2", bytes: await Deno.readFile(path) });
  }
  images.push(...await extL2Corpus(dir, source));
  // ZERO clusters (v3) over a copy of the 64K image.
  const zpath = `${dir}/q64-zero.qcow2`;
  await Deno.copyFile(`${dir}/q64.qcow2`, zpath);
  const z = await tool("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -z 0 4096",
    "-c",
    "write -z 1M 128K",
    zpath,
  ]);
  if (!z.ok) throw new Error(`qemu-io: ${z.out}`);
  images.push({ name: "q64-zero.qcow2", format: "qcow2", bytes: await Deno.readFile(zpath) });
  // diskstream's own layouts: metadata first.
  for (
    const [name, format, args] of [
      ["ds-4k.qcow2", "qcow2", ["-c", "4096"]],
      ["ds.vhd", "vhd", ["-f", "vhd"]],
    ] as const
  ) {
    const path = `${dir}/${name}`;
    const o = await diskstream(["export", source, ...args, "-o", path]);
    if (o.code !== 0) throw new Error(`diskstream export ${args.join(" ")}: ${o.stderr}`);
    images.push({ name, format, bytes: await Deno.readFile(path) });
  }
  return { images, source };
}

/**
 * Extended L2 images (16-byte L2 entries, 32 subclusters a cluster), made by qemu-img
 * create and qemu-io so that single subclusters are allocated, read as zeros (`write -z`)
 * or discarded (neither: they read from the backing file, or as zeros): 16 KiB clusters
 * (512-byte subclusters), 64 KiB and 2 MiB (64 KiB subclusters, the last cluster cut by
 * the disk's end); one over a backing file (imported with --delta); one compressed by
 * qemu-img convert -c with writes after it (COW of compressed clusters into subclusters).
 */
async function extL2Corpus(dir: string, source: string): Promise<Image[]> {
  const images: Image[] = [];
  // name, cluster size, qemu-img create (or convert -c with "compress"), qemu-io commands
  const jobs: [string, string, string[], string[]][] = [
    ["x16k.qcow2", "16384", [], [
      "write -P 0x11 512 512",
      "write -P 0x12 1536 1024",
      "write -z 4096 1024",
      "write -P 0x13 20000 30000",
      "discard 24576 2048",
      "write -P 0x14 1M 16384",
      "write -z -u 1040K 8K",
      "write -P 0x15 3M 3584",
    ]],
    ["x64k.qcow2", "65536", [], [
      "write -P 0x21 2048 2048",
      "write -P 0x22 63488 4096",
      "write -z 131072 6144",
      "write -P 0x23 196608 65536",
      "discard 200704 8192",
      "write -P 0x24 3070K 5632",
    ]],
    ["x2m.qcow2", "2M", [], [
      "write -P 0x31 0 64K",
      "write -P 0x32 192K 128K",
      "write -z 512K 64K",
      "write -P 0x33 2M 64K",
      "write -P 0x34 3M 3584",
      "discard 192K 64K",
    ]],
    ["x-backed.qcow2", "65536", ["-b", "source.raw", "-F", "raw"], [
      "write -P 0x41 4096 2048",
      "write -z 8192 2048",
      "discard 200K 4K",
      "write -P 0x42 1M 6K",
    ]],
    ["x16k-z.qcow2", "16384", ["compress"], [
      "write -P 0x51 16896 512",
      "write -z 33280 1024",
    ]],
  ];
  for (const [name, cs, extra, writes] of jobs) {
    const path = `${dir}/${name}`;
    const o = ["-o", `cluster_size=${cs},extended_l2=on`];
    const made = extra[0] === "compress"
      ? await tool("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", ...o, source, path])
      : await tool("qemu-img", ["create", "-f", "qcow2", ...o, ...extra, path, `${SOURCE_SIZE}`]);
    if (!made.ok) throw new Error(`qemu-img for ${name}: ${made.out}`);
    const w = await tool("qemu-io", ["-f", "qcow2", ...writes.flatMap((c) => ["-c", c]), path]);
    if (!w.ok) throw new Error(`qemu-io on ${name}: ${w.out}`);
    images.push({ name, format: "qcow2", bytes: await Deno.readFile(path) });
  }
  return images;
}

// ---------------------------------------------------------------- format views

/** Reads a field (0 past the end of a truncated image). */
const u32 = (b: Uint8Array, at: number) =>
  at >= 0 && at + 4 <= b.length ? new DataView(b.buffer, b.byteOffset).getUint32(at) : 0;
const u64 = (b: Uint8Array, at: number) =>
  at >= 0 && at + 8 <= b.length ? new DataView(b.buffer, b.byteOffset).getBigUint64(at) : 0n;
/** Writes a field; a field past the end of a truncated image is left alone. */
const setU32 = (b: Uint8Array, at: number, v: number) => {
  if (at >= 0 && at + 4 <= b.length) new DataView(b.buffer, b.byteOffset).setUint32(at, v >>> 0);
};
const setU64 = (b: Uint8Array, at: number, v: bigint) => {
  if (at >= 0 && at + 8 <= b.length) {
    new DataView(b.buffer, b.byteOffset).setBigUint64(at, BigInt.asUintN(64, v));
  }
};
const OFFSET_MASK = 0x00fffffffffffe00n;

interface Qcow2View {
  cs: number;
  size: number;
  l1Offset: number;
  l1Size: number;
  refOffset: number;
  refClusters: number;
  /** L2 tables: their offset and L1 index. */
  l2: { offset: number; index: number }[];
  /** Extended L2 entries (incompatible feature bit 4): 16 bytes each. */
  ext: boolean;
  /** Bytes of one L2 entry: 8, or 16 with extended L2. */
  eb: number;
  /**
   * Allocated L2 entries: where the entry is and what its first word says (with
   * extended L2, `bitmap` is the second word: bits 32–63 "reads as zeros", 0–31
   * "allocated").
   */
  entries: { at: number; value: bigint; bitmap: bigint; cluster: number }[];
}

/** The tables of a qcow2 image, read leniently (entries that make no sense are skipped). */
function qcow2View(b: Uint8Array): Qcow2View | null {
  if (b.length < 72 || u32(b, 0) !== 0x514649fb) return null;
  const bits = u32(b, 20);
  if (bits < 9 || bits > 21) return null;
  const cs = 2 ** bits;
  const v: Qcow2View = {
    cs,
    size: Number(u64(b, 24)),
    l1Offset: Number(u64(b, 40)),
    l1Size: u32(b, 36),
    refOffset: Number(u64(b, 48)),
    refClusters: u32(b, 56),
    l2: [],
    entries: [],
    ext: b.length >= 80 && u32(b, 0x04) >= 3 && (u64(b, 72) & 16n) !== 0n,
    eb: 8,
  };
  if (v.ext) v.eb = 16;
  for (let i = 0; i < v.l1Size && v.l1Offset + i * 8 + 8 <= b.length; i++) {
    const off = Number(u64(b, v.l1Offset + i * 8) & OFFSET_MASK);
    if (off === 0 || off + cs > b.length) continue;
    v.l2.push({ offset: off, index: i });
    for (let j = 0; j < cs / v.eb; j++) {
      const value = u64(b, off + j * v.eb);
      const bitmap = v.ext ? u64(b, off + j * v.eb + 8) : 0n;
      const cluster = i * (cs / v.eb) + j;
      if (value !== 0n || bitmap !== 0n) {
        v.entries.push({ at: off + j * v.eb, value, bitmap, cluster });
      }
    }
  }
  return v;
}

interface VhdView {
  fixed: boolean;
  size: number;
  dataOffset: number;
  tableOffset: number;
  maxEntries: number;
  blockSize: number;
  /** Allocated BAT entries: index and sector. */
  blocks: { index: number; sector: number }[];
}

function vhdView(b: Uint8Array): VhdView | null {
  const cookie = (at: number) => new TextDecoder().decode(b.subarray(at, at + 8));
  if (b.length >= 512 && cookie(0) === "conectix") {
    const dataOffset = Number(u64(b, 16));
    if (dataOffset + 1024 > b.length) return null;
    const v: VhdView = {
      fixed: false,
      size: Number(u64(b, 48)),
      dataOffset,
      tableOffset: Number(u64(b, dataOffset + 16)),
      maxEntries: u32(b, dataOffset + 28),
      blockSize: u32(b, dataOffset + 32),
      blocks: [],
    };
    for (let i = 0; i < v.maxEntries && v.tableOffset + i * 4 + 4 <= b.length; i++) {
      const sector = u32(b, v.tableOffset + i * 4);
      if (sector !== 0xffffffff) v.blocks.push({ index: i, sector });
    }
    return v;
  }
  if (b.length >= 512 && cookie(b.length - 512) === "conectix") {
    const at = b.length - 512;
    return {
      fixed: true,
      size: Number(u64(b, at + 48)),
      dataOffset: -1,
      tableOffset: -1,
      maxEntries: 0,
      blockSize: 2 * MiB,
      blocks: [],
    };
  }
  return null;
}

/** Recomputes a VHD footer (at `at`) or dynamic header checksum. */
function vhdChecksum(b: Uint8Array, at: number, length: number, field: number): void {
  if (at < 0 || at + length > b.length) return;
  setU32(b, at + field, 0);
  let sum = 0;
  for (let i = at; i < at + length; i++) sum += b[i];
  setU32(b, at + field, ~sum);
}

// ---------------------------------------------------------------- mutations

/** Values that break size and offset arithmetic. */
function interesting(rng: Rng, current: bigint, fileSize: number, unit: number): bigint {
  const choices: (() => bigint)[] = [
    () => 0n,
    () => 1n,
    () => BigInt(unit),
    () => BigInt(unit) - 1n,
    () => BigInt(unit) + 1n,
    () => current + BigInt(unit),
    () => current - BigInt(unit),
    () => current * 2n,
    () => current / 2n,
    () => current + 1n,
    () => BigInt(fileSize),
    () => BigInt(Math.max(0, fileSize - unit)),
    () => BigInt(rng.int(Math.max(1, fileSize / unit))) * BigInt(unit),
    () => 2n ** BigInt(rng.pick([31, 32, 40, 41, 45, 49, 52, 53, 56, 62, 63])),
    () => 2n ** 64n - 1n,
    () => 2n ** 32n - 1n,
    () => (BigInt(rng.u32()) << 32n) | BigInt(rng.u32()),
  ];
  return BigInt.asUintN(64, rng.pick(choices)());
}

type Mutator = (rng: Rng, b: Uint8Array) => { bytes: Uint8Array; what: string };

/** Cuts the image at `at` (a metadata boundary, or one byte either side). */
function truncateAt(
  rng: Rng,
  b: Uint8Array,
  boundaries: number[],
): { bytes: Uint8Array; what: string } {
  const base = rng.pick(boundaries.filter((x) => x > 0 && x < b.length).concat([b.length - 1]));
  const at = Math.max(0, Math.min(b.length - 1, base + rng.pick([0, 0, 0, -1, 1, -8, 8, -512])));
  return { bytes: b.slice(0, at), what: `truncate at ${at}` };
}

function flipBits(rng: Rng, b: Uint8Array, from: number, length: number, what: string) {
  const n = 1 + rng.int(8);
  const out = b.slice();
  for (let i = 0; i < n; i++) {
    const at = from + rng.int(Math.max(1, Math.min(length, out.length - from)));
    if (at < out.length) out[at] ^= 1 << rng.int(8);
  }
  return { bytes: out, what: `${n} bit flips in ${what}` };
}

const QCOW2_FIELDS: [string, number, 4 | 8][] = [
  ["version", 4, 4],
  ["backing_file_offset", 8, 8],
  ["backing_file_size", 16, 4],
  ["cluster_bits", 20, 4],
  ["size", 24, 8],
  ["crypt_method", 32, 4],
  ["l1_size", 36, 4],
  ["l1_table_offset", 40, 8],
  ["refcount_table_offset", 48, 8],
  ["refcount_table_clusters", 56, 4],
  ["nb_snapshots", 60, 4],
  ["snapshots_offset", 64, 8],
  ["incompatible_features", 72, 8],
  ["refcount_order", 96, 4],
  ["header_length", 100, 4],
];

const qcow2Mutators: Mutator[] = [
  // A header field.
  (rng, b) => {
    const [name, at, width] = rng.pick(QCOW2_FIELDS);
    const out = b.slice();
    if (name === "cluster_bits") {
      const v = rng.pick([0, 8, 9, 12, 16, 20, 21, 22, 31, 63, u32(b, 20) + 1, u32(b, 20) - 1]);
      setU32(out, at, v);
      return { bytes: out, what: `qcow2 ${name} = ${v}` };
    }
    if (name === "incompatible_features") {
      const v = 1n << BigInt(rng.int(64));
      setU64(out, at, u64(b, at) ^ v);
      return {
        bytes: out,
        what: `qcow2 incompatible feature bit ${v.toString(2).length - 1} flipped`,
      };
    }
    const cur = width === 8 ? u64(b, at) : BigInt(u32(b, at));
    const v = interesting(rng, cur, b.length, 2 ** u32(b, 20));
    if (width === 8) setU64(out, at, v);
    else setU32(out, at, Number(BigInt.asUintN(32, v)));
    return { bytes: out, what: `qcow2 ${name} = ${width === 8 ? v : BigInt.asUintN(32, v)}` };
  },
  // An L1 entry.
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    const i = rng.chance(0.8) && v.l2.length > 0 ? rng.pick(v.l2).index : rng.int(v.l1Size + 2);
    const at = v.l1Offset + i * 8;
    if (at + 8 > out.length) return { bytes: out, what: "nothing (L1 past the end)" };
    const other = v.l2.length > 0 ? BigInt(rng.pick(v.l2).offset) : 0n;
    const value = rng.pick([
      () => other | (1n << 63n), // shared with another entry
      () => other,
      () => BigInt(v.l1Offset) | (1n << 63n), // the L1 table itself
      () => 0n,
      () => BigInt(v.refOffset),
      () => 2n ** 40n,
      () => BigInt(Math.ceil(out.length / v.cs) * v.cs), // just past the end
      () => other + 512n, // unaligned
      () => other | (1n << BigInt(56 + rng.int(7))), // reserved bits
      () => interesting(rng, u64(b, at), b.length, v.cs),
    ])();
    setU64(out, at, value);
    return { bytes: out, what: `L1 entry ${i} = 0x${value.toString(16)}` };
  },
  // Every L1 entry naming one L2 table (shared tables).
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    const target = v.l2.length > 0 ? BigInt(rng.pick(v.l2).offset) : BigInt(v.l1Offset);
    const n = Math.min(v.l1Size, Math.floor((out.length - v.l1Offset) / 8));
    for (let i = 0; i < n; i++) setU64(out, v.l1Offset + i * 8, target | (1n << 63n));
    return { bytes: out, what: `all ${n} L1 entries name the table at ${target}` };
  },
  // An L2 entry.
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    if (v.l2.length === 0) return { bytes: out, what: "nothing (no L2 table)" };
    const e = v.entries.length > 0 && rng.chance(0.8)
      ? rng.pick(v.entries)
      : { at: rng.pick(v.l2).offset + rng.int(v.cs / v.eb) * v.eb, value: 0n, bitmap: 0n };
    const other = v.entries.length > 0 ? rng.pick(v.entries).value : 0n;
    const value = rng.pick([
      () => other, // two entries naming one host cluster
      () => BigInt(v.l1Offset) | (1n << 63n), // data inside metadata
      () => BigInt(rng.pick(v.l2).offset) | (1n << 63n),
      () => (1n << 63n), // offset 0: the header
      () => (2n ** 40n) | (1n << 63n), // far away
      () => BigInt(Math.ceil(out.length / v.cs) * v.cs) | (1n << 63n),
      () => e.value + 512n, // unaligned
      () => e.value | 1n, // ZERO flag
      () => e.value ^ (1n << 62n), // compressed flag
      () => (1n << 62n) | BigInt(rng.u32()) << BigInt(rng.int(30)) | BigInt(rng.u32()),
      () => e.value | (1n << BigInt(1 + rng.int(8))), // reserved bits
      () => e.value ^ (1n << 63n),
      () => 0n,
      () => interesting(rng, e.value, b.length, v.cs),
    ])();
    setU64(out, e.at, value);
    return { bytes: out, what: `L2 entry at ${e.at} = 0x${value.toString(16)}` };
  },
  // One L2 table copied over another.
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    if (v.l2.length < 2) return { bytes: out, what: "nothing (one L2 table)" };
    const from = rng.pick(v.l2).offset;
    const to = rng.pick(v.l2).offset;
    out.copyWithin(to, from, from + v.cs);
    return { bytes: out, what: `L2 table at ${from} copied over the one at ${to}` };
  },
  // Truncation at a metadata boundary.
  (rng, b) => {
    const v = qcow2View(b)!;
    const cuts = [72, 104, v.cs, v.l1Offset, v.l1Offset + v.l1Size * 8, v.refOffset];
    for (const t of v.l2) cuts.push(t.offset, t.offset + v.cs);
    for (const e of v.entries) {
      const host = Number(e.value & OFFSET_MASK);
      cuts.push(host, host + v.cs);
    }
    return truncateAt(rng, b, cuts);
  },
  // Bit flips in the metadata.
  (rng, b) => {
    const v = qcow2View(b)!;
    const region = rng.pick([
      [0, Math.min(v.cs, 512), "the header"] as const,
      [v.l1Offset, v.l1Size * 8, "the L1 table"] as const,
      ...v.l2.map((t) => [t.offset, v.cs, `the L2 table at ${t.offset}`] as const),
    ]);
    return flipBits(rng, b, region[0], region[1], region[2]);
  },
  // Compressed data corrupted.
  (rng, b) => {
    const v = qcow2View(b)!;
    const comp = v.entries.filter((e) => (e.value & (1n << 62n)) !== 0n);
    if (comp.length === 0) return flipBits(rng, b, v.cs, b.length - v.cs, "the file");
    const e = rng.pick(comp);
    const shift = 62n - BigInt(Math.log2(v.cs) - 8);
    const host = Number(e.value & ((1n << shift) - 1n));
    return flipBits(rng, b, host, 256, `the compressed cluster at ${host}`);
  },
  // L2 tables moved to the end of the file, after the data they map: a stream meets the
  // data first (held in the buffer, or spooled), the table last.
  (rng, b) => moveL2Tables(rng, b),
];

/** One L2 table (or all) copied past the end, the L1 entry pointing there. */
function moveL2Tables(rng: Rng, b: Uint8Array): { bytes: Uint8Array; what: string } {
  const v = qcow2View(b)!;
  if (v.l2.length === 0) return { bytes: b.slice(), what: "nothing (no L2 table)" };
  const tables = rng.chance(0.4) ? v.l2 : [rng.pick(v.l2)];
  let end = Math.ceil(b.length / v.cs) * v.cs;
  const out = new Uint8Array(end + tables.length * v.cs);
  out.set(b);
  const clear = rng.chance(0.5);
  for (const t of rng.chance(0.5) ? tables : [...tables].reverse()) {
    out.copyWithin(end, t.offset, t.offset + v.cs);
    if (clear) out.fill(0, t.offset, t.offset + v.cs);
    setU64(out, v.l1Offset + t.index * 8, BigInt(end) | (1n << 63n));
    end += v.cs;
  }
  return {
    bytes: out,
    what: `${tables.length} L2 table(s) moved past the data${clear ? " (old copies zeroed)" : ""}`,
  };
}

/** Sets an extended L2 entry (first word and bitmap). */
function setExtEntry(out: Uint8Array, at: number, value: bigint, bitmap: bigint) {
  setU64(out, at, value);
  setU64(out, at + 8, bitmap);
}

const hex64 = (x: bigint) => `0x${BigInt.asUintN(64, x).toString(16).padStart(16, "0")}`;

/** Mutations of extended L2 entries (16 bytes: host word, then the subcluster bitmap). */
const extL2Mutators: Mutator[] = [
  // The subcluster bitmap of one entry: bit flips and hostile patterns.
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    if (v.l2.length === 0) return { bytes: out, what: "nothing (no L2 table)" };
    const e = v.entries.length > 0 && rng.chance(0.85) ? rng.pick(v.entries) : (() => {
      const t = rng.pick(v.l2);
      const j = rng.int(v.cs / 16);
      return { at: t.offset + j * 16, value: 0n, bitmap: 0n, cluster: t.index * v.cs / 16 + j };
    })();
    const alloc = e.bitmap & 0xffffffffn;
    const lowAlloc = alloc & -alloc;
    const bit = () => 1n << BigInt(rng.int(32));
    const [name, bitmap] = rng.pick<() => [string, bigint]>([
      () => {
        let m = e.bitmap;
        const n = 1 + rng.int(4);
        for (let i = 0; i < n; i++) m ^= 1n << BigInt(rng.int(64));
        return [`${n} bit flips`, m];
      },
      // Allocated and reads-as-zero at once.
      () => {
        const x = lowAlloc || bit();
        return ["alloc/zero overlap", e.bitmap | x | (x << 32n)];
      },
      // A subcluster made allocated (maybe with no host offset).
      () => ["one more allocated", e.bitmap | bit()],
      // Allocated ones turned into reads-as-zero.
      () => ["allocated ones read as zeros", alloc << 32n],
      () => ["all read as zeros", 0xffffffffn << 32n],
      () => ["all allocated", 0xffffffffn],
      () => ["none", 0n],
      () => ["random", (BigInt(rng.u32()) << 32n) | BigInt(rng.u32())],
      () => ["upper half of the allocated ones", alloc & 0xffff0000n],
    ])();
    setU64(out, e.at + 8, bitmap);
    return {
      bytes: out,
      what: `extended L2 bitmap of guest cluster ${e.cluster} (at ${e.at + 8}): ${name} = ${
        hex64(bitmap)
      }`,
    };
  },
  // Allocated subclusters with no host offset, or a host offset into metadata, past the
  // end, or shared with another entry (same, overlapping or disjoint subclusters).
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    const data = v.entries.filter((e) => (e.bitmap & 0xffffffffn) !== 0n);
    if (data.length === 0) return { bytes: out, what: "nothing (no allocated subcluster)" };
    const e = rng.pick(data);
    const o = rng.pick(data);
    const oHost = o.value & OFFSET_MASK;
    const oAlloc = o.bitmap & 0xffffffffn;
    const copied = 1n << 63n;
    const [name, value, bitmap] = rng.pick<() => [string, bigint, bigint]>([
      () => ["no host offset", 0n, e.bitmap],
      () => ["no host offset, COPIED", copied, e.bitmap],
      () => ["host = the L1 table", BigInt(v.l1Offset) | copied, e.bitmap],
      () => ["host = an L2 table", BigInt(rng.pick(v.l2).offset) | copied, e.bitmap],
      () => ["host = the refcount table", BigInt(v.refOffset) | copied, e.bitmap],
      () => ["host = the header", copied | 0n, 0xffffffffn],
      () => ["host = past the end", BigInt(Math.ceil(b.length / v.cs) * v.cs) | copied, e.bitmap],
      () => ["host = another entry's, same subclusters", oHost | copied, o.bitmap],
      () => ["host = another entry's, own subclusters", oHost | copied, e.bitmap],
      () => [
        "host = another entry's, the other subclusters",
        oHost | copied,
        ~oAlloc & 0xffffffffn,
      ],
      () => ["host = another entry's + 1 cluster", (oHost + BigInt(v.cs)) | copied, e.bitmap],
      () => ["host + one subcluster (unaligned)", e.value + BigInt(v.cs / 32), e.bitmap],
      () => ["compressed flag set", e.value | (1n << 62n), e.bitmap],
    ])();
    setExtEntry(out, e.at, value, bitmap);
    return {
      bytes: out,
      what: `extended L2 entry of guest cluster ${e.cluster}: ${name} (${hex64(value)} ${
        hex64(bitmap)
      })`,
    };
  },
  // Bits for subclusters past the disk's end: in the entry of the last cluster, and in
  // the entries after it in the last L2 table.
  (rng, b) => {
    const v = qcow2View(b)!;
    const out = b.slice();
    const clusters = Math.ceil(v.size / v.cs);
    const perTable = v.cs / 16;
    const t = v.l2.find((t) => t.index === Math.floor((clusters - 1) / perTable));
    if (!t) return { bytes: out, what: "nothing (no L2 table for the last cluster)" };
    const j = (clusters - 1) % perTable + (rng.chance(0.7) ? 0 : 1 + rng.int(3));
    const at = t.offset + j * 16;
    if (at + 16 > t.offset + v.cs) return { bytes: out, what: "nothing (last entry of a table)" };
    const sub = v.cs / 32;
    const inside = j === (clusters - 1) % perTable ? Math.ceil((v.size % v.cs || v.cs) / sub) : 0;
    const past = inside >= 32 ? 0n : (0xffffffffn >> BigInt(inside)) << BigInt(inside);
    const cur = u64(b, at + 8);
    const host = u64(b, at) & OFFSET_MASK;
    const [name, value, bitmap] = rng.pick<() => [string, bigint, bigint]>([
      () => ["allocated past the end", u64(b, at), cur | past],
      () => ["zero past the end", u64(b, at), cur | (past << 32n)],
      () => ["overlap past the end", u64(b, at), cur | past | (past << 32n)],
      () => [
        "allocated past the end, a host cluster past the file",
        host === 0n ? BigInt(Math.ceil(b.length / v.cs) * v.cs) | (1n << 63n) : u64(b, at),
        cur | past,
      ],
    ])();
    setExtEntry(out, at, value, bitmap);
    return {
      bytes: out,
      what: `extended L2 entry ${j} of the last table (${inside} subclusters inside): ${name} (${
        hex64(value)
      } ${hex64(bitmap)})`,
    };
  },
  // The file cut inside an allocated subcluster.
  (rng, b) => {
    const v = qcow2View(b)!;
    const sub = v.cs / 32;
    const cuts: number[] = [];
    for (const e of v.entries) {
      const host = Number(e.value & OFFSET_MASK);
      const alloc = Number(e.bitmap & 0xffffffffn);
      if (host === 0 || (e.value & (1n << 62n)) !== 0n) continue;
      for (let i = 0; i < 32; i++) if ((alloc >>> i) & 1) cuts.push(host + i * sub);
    }
    if (cuts.length === 0) return truncateAt(rng, b, [v.cs, v.l1Offset]);
    const at = rng.pick(cuts) + rng.pick([1, 511, sub / 2, sub - 1, 512]);
    if (at >= b.length) return truncateAt(rng, b, cuts);
    return { bytes: b.slice(0, at), what: `truncate at ${at} (inside a subcluster)` };
  },
];

const FOOTER_FIELDS: [string, number, 4 | 8][] = [
  ["features", 8, 4],
  ["version", 12, 4],
  ["data_offset", 16, 8],
  ["original_size", 40, 8],
  ["current_size", 48, 8],
  ["disk_type", 60, 4],
];
const HEADER_FIELDS: [string, number, 4 | 8][] = [
  ["data_offset", 8, 8],
  ["table_offset", 16, 8],
  ["header_version", 24, 4],
  ["max_table_entries", 28, 4],
  ["block_size", 32, 4],
];

/** Sets a field of the footer at `at` (or of the dynamic header), usually fixing the checksum. */
function setVhdField(
  rng: Rng,
  out: Uint8Array,
  at: number,
  field: [string, number, 4 | 8],
  header: boolean,
): string {
  const [name, off, width] = field;
  const cur = width === 8 ? u64(out, at + off) : BigInt(u32(out, at + off));
  let v: bigint;
  if (name === "disk_type") v = BigInt(rng.pick([0, 1, 2, 3, 4, 5, 6]));
  else if (name === "block_size") {
    v = BigInt(rng.pick([0, 512, 4096, 65536, MiB, 2 * MiB, 4 * MiB, 2 ** 31, 3 * MiB, 1000]));
  } else v = interesting(rng, cur, out.length, 512);
  if (width === 8) setU64(out, at + off, v);
  else setU32(out, at + off, Number(BigInt.asUintN(32, v)));
  const fix = rng.chance(0.9);
  if (fix) vhdChecksum(out, at, header ? 1024 : 512, header ? 36 : 64);
  return `VHD ${header ? "header" : "footer"} ${name} = ${width === 8 ? v : BigInt.asUintN(32, v)}${
    fix ? "" : " (stale checksum)"
  }`;
}

const vhdMutators: Mutator[] = [
  // A footer field, in both copies or one.
  (rng, b) => {
    const v = vhdView(b)!;
    const out = b.slice();
    const field = rng.pick(FOOTER_FIELDS);
    const where = v.fixed ? [out.length - 512] : rng.pick([[0, out.length - 512], [0], [
      out.length - 512,
    ]]);
    let what = "";
    const seed = rng.u32();
    for (const at of where) what = setVhdField(new Rng(seed), out, at, field, false);
    return { bytes: out, what: `${what} at ${where.join(" and ")}` };
  },
  // A dynamic header field.
  (rng, b) => {
    const v = vhdView(b)!;
    const out = b.slice();
    if (v.fixed) return qcow2LikeTruncate(rng, b, v);
    return { bytes: out, what: setVhdField(rng, out, v.dataOffset, rng.pick(HEADER_FIELDS), true) };
  },
  // A BAT entry.
  (rng, b) => {
    const v = vhdView(b)!;
    const out = b.slice();
    if (v.fixed) return qcow2LikeTruncate(rng, b, v);
    const i = v.blocks.length > 0 && rng.chance(0.7)
      ? rng.pick(v.blocks).index
      : rng.int(Math.max(1, Math.ceil(v.size / v.blockSize)));
    const other = v.blocks.length > 0 ? rng.pick(v.blocks).sector : 0;
    const sector = rng.pick([
      other, // two entries naming one block
      other + 1,
      0xffffffff,
      0,
      1,
      v.dataOffset / 512,
      v.tableOffset / 512,
      Math.floor(out.length / 512) - 1, // the end footer
      Math.floor(out.length / 512),
      0x7fffffff,
      0xfffffffe,
      rng.u32(),
    ]);
    setU32(out, v.tableOffset + i * 4, sector);
    return { bytes: out, what: `BAT entry ${i} = ${sector}` };
  },
  // Bits of a block's sector bitmap.
  (rng, b) => {
    const v = vhdView(b)!;
    if (v.fixed || v.blocks.length === 0) return qcow2LikeTruncate(rng, b, v);
    const blk = rng.pick(v.blocks);
    return flipBits(rng, b, blk.sector * 512, 512, `the bitmap of block ${blk.index}`);
  },
  // Bit flips in the footer, header or BAT, checksums recomputed.
  (rng, b) => {
    const v = vhdView(b)!;
    const regions: [number, number, string, number, number][] = v.fixed
      ? [[b.length - 512, 512, "the footer", 512, 64]]
      : [
        [0, 512, "the footer copy", 512, 64],
        [v.dataOffset, 1024, "the dynamic header", 1024, 36],
        [v.tableOffset, Math.ceil(v.size / v.blockSize) * 4, "the BAT", 0, 0],
      ];
    const [at, n, what, len, field] = rng.pick(regions);
    const r = flipBits(rng, b, at, n, what);
    if (len > 0 && rng.chance(0.8)) vhdChecksum(r.bytes, at, len, field);
    return r;
  },
  (rng, b) => qcow2LikeTruncate(rng, b, vhdView(b)!),
];

/** Truncation of a VHD at one of its boundaries. */
function qcow2LikeTruncate(rng: Rng, b: Uint8Array, v: VhdView) {
  const cuts = [512, b.length - 512];
  if (!v.fixed) {
    cuts.push(v.dataOffset, v.dataOffset + 1024, v.tableOffset, v.tableOffset + v.maxEntries * 4);
    for (const blk of v.blocks) {
      const at = blk.sector * 512;
      cuts.push(at, at + 512, at + 512 + v.blockSize);
    }
  }
  return truncateAt(rng, b, cuts);
}

interface Mutated {
  image: Image;
  bytes: Uint8Array;
  mutations: string[];
  /** Import into an existing file full of 0xAA bytes (it must be overwritten), not a new one. */
  prefill: boolean;
  /**
   * import's --max-buffer: usually {@link MAX_BUFFER}, sometimes small so that data
   * met before its L2 table (tables moved after the data) goes to the spool file.
   */
  maxBuffer: string;
  /** import reads the image with `-i FILE` (tables by random access), not from a pipe. */
  fromFile: boolean;
}

function mutateImage(rng: Rng, images: Image[]): Mutated {
  const image = rng.pick(images);
  let bytes = image.bytes;
  const mutations: string[] = [];
  const n = rng.pick([0, 1, 1, 1, 2, 2, 3]);
  for (let i = 0; i < n; i++) {
    const isQcow = qcow2View(bytes) !== null;
    const isVhd = !isQcow && vhdView(bytes) !== null;
    if (!isQcow && !isVhd) {
      const r = flipBits(rng, bytes, 0, bytes.length, "the file");
      bytes = r.bytes;
      mutations.push(r.what);
      continue;
    }
    const mutators = !isQcow
      ? vhdMutators
      : qcow2View(bytes)!.ext && rng.chance(0.6)
      ? extL2Mutators
      : qcow2Mutators;
    const r = rng.pick(mutators)(rng, bytes);
    bytes = r.bytes;
    mutations.push(r.what);
  }
  const prefill = rng.chance(0.35);
  const maxBuffer = rng.chance(0.3) ? rng.pick(["64K", "256K", "1M"]) : MAX_BUFFER;
  const fromFile = rng.chance(0.25);
  return { image, bytes, mutations, prefill, maxBuffer, fromFile };
}

// ---------------------------------------------------------------- oracles per family

interface CaseResult {
  family: string;
  /** import: into an existing file (replayed the same way). */
  prefill?: boolean;
  /** import: its --max-buffer (replayed the same way). */
  maxBuffer?: string;
  /** import: with `-i FILE` rather than from a pipe (replayed the same way). */
  fromFile?: boolean;
  /** Exit status of diskstream. */
  code: number;
  /** Whether the byte/allocation oracle ran (qemu-img read the image too). */
  compared: boolean;
  failure: string | null;
  input: Uint8Array;
  inputName: string;
  description: string[];
  args: string[];
}

/** The virtual size an image claims (the oracle's own reading). */
function claimedSize(b: Uint8Array): number | null {
  const q = qcow2View(b);
  if (q) return q.size;
  const v = vhdView(b);
  return v ? v.size : null;
}

/** What qemu-img reads from `path` as raw bytes, or null when it refuses the image. */
async function qemuRaw(path: string, format: string, dir: string): Promise<Uint8Array | null> {
  const out = `${dir}/qemu.raw`;
  await Deno.remove(out).catch(() => {});
  const r = await tool("qemu-img", ["convert", "-f", format, "-O", "raw", path, out]);
  if (!r.ok) return null;
  const bytes = await Deno.readFile(out);
  await Deno.remove(out).catch(() => {});
  return bytes;
}

/**
 * What diskstream should read from a dynamic VHD that qemu-img reads as `raw`: the
 * sectors whose bitmap bit is clear are zeros (QEMU ignores the bitmaps).
 */
function vhdExpected(b: Uint8Array, raw: Uint8Array): Uint8Array {
  const v = vhdView(b);
  if (!v || v.fixed) return raw;
  const out = raw.slice();
  const bitmapBytes = Math.ceil(Math.ceil(v.blockSize / 512 / 8) / 512) * 512;
  for (const blk of v.blocks) {
    if (blk.index * v.blockSize >= out.length) continue;
    const at = blk.sector * 512;
    for (let s = 0; s < v.blockSize / 512; s++) {
      const bit = at + (s >> 3) < b.length && at + (s >> 3) < at + bitmapBytes
        ? (b[at + (s >> 3)] >> (7 - (s & 7))) & 1
        : 0;
      if (bit === 0) {
        const g = blk.index * v.blockSize + s * 512;
        out.fill(0, Math.min(g, out.length), Math.min(g + 512, out.length));
      }
    }
  }
  return out;
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

async function importCase(m: Mutated, dir: string): Promise<CaseResult> {
  const path = `${dir}/case.img`;
  await Deno.writeFile(path, m.bytes);
  const dest = `${dir}/dest.raw`;
  await Deno.remove(dest).catch(() => {});
  const fixed = m.image.name.includes("fixed");
  // An image with a backing file is a diff: applied with --delta onto a copy of its base.
  const delta = m.image.name.includes("backed");
  if (delta) await Deno.copyFile(`${dir}/source.raw`, dest);
  const claimed = claimedSize(m.bytes);
  const prefill = !delta && m.prefill && claimed !== null && claimed <= COMPARE_LIMIT;
  if (prefill) {
    await Deno.writeFile(dest, new Uint8Array(Math.ceil(claimed / 512) * 512).fill(0xaa));
  }
  const args = [
    "import",
    dest,
    "--max-buffer",
    m.maxBuffer,
    "--spool-dir",
    dir,
    ...(fixed ? ["-f", "vhd"] : []),
    ...(delta ? ["--delta"] : []),
    ...(m.fromFile ? ["-i", path] : []),
  ];
  const o = await diskstream(args, m.fromFile ? undefined : m.bytes);
  const res: CaseResult = {
    family: "import",
    code: o.code,
    compared: false,
    failure: checkOutcome(o, false, SPOOL_NOTE),
    input: m.bytes,
    inputName: "image",
    description: [
      `${m.image.name}: ${m.mutations.join("; ") || "unchanged"}${
        prefill ? " (into an existing file of 0xAA bytes)" : ""
      }${m.maxBuffer !== MAX_BUFFER ? ` (--max-buffer ${m.maxBuffer})` : ""}${
        m.fromFile ? " (-i FILE)" : ""
      }`,
    ],
    prefill,
    maxBuffer: m.maxBuffer,
    fromFile: m.fromFile,
    args: [
      ...args.slice(0, 1),
      "DEST",
      ...args.slice(2).map((a) => a === dir ? "SPOOL_DIR" : a === path ? "image" : a),
      ...(m.fromFile ? [] : ["< image"]),
    ],
  };
  if (res.failure) return res;
  const destStat = await Deno.stat(dest).catch(() => null);
  if (o.code !== 0) {
    if (destStat && !delta && !prefill) {
      res.failure = "a failed import left the destination it created";
    } else if (opts.refusals && m.image.format === "qcow2") {
      // Not a failure (diskstream refuses what qemu reads on purpose: reserved bits, data
      // inside metadata, shared host clusters), but worth a look.
      const raw = await qemuRaw(path, "qcow2", dir);
      if (raw) {
        const line = { image: res.description[0], stderr: o.stderr.trim() };
        await Deno.writeTextFile(opts.refusals, JSON.stringify(line) + "\n", { append: true });
      }
    }
    return res;
  }
  if (!destStat) {
    res.failure = "import succeeded but there is no destination";
    return res;
  }
  // A new file ends at the virtual size; an existing one keeps its size and its bytes
  // past the virtual size.
  const end = delta ? Math.min(destStat.size, claimed ?? Infinity) : destStat.size;
  if (!delta && claimed !== null && destStat.size > Math.ceil(claimed / 512) * 512) {
    res.failure = `the destination has ${destStat.size} bytes, past the virtual size ${claimed}`;
    return res;
  }
  if (delta && destStat.size !== SOURCE_SIZE) {
    res.failure = `--delta changed the destination's size to ${destStat.size}`;
    return res;
  }
  if (destStat.size <= COMPARE_LIMIT) {
    const got = await Deno.readFile(dest);
    if (delta && firstDifference(got.subarray(end), sourceBytes().subarray(end)) >= 0) {
      res.failure = `--delta wrote past the virtual size ${end}`;
      return res;
    }
    const raw = await qemuRaw(path, m.image.format === "vhd" ? "vpc" : "qcow2", dir);
    if (raw && raw.length === end) {
      res.compared = true;
      const expected = m.image.format === "vhd" ? vhdExpected(m.bytes, raw) : raw;
      const at = firstDifference(expected, got.subarray(0, end));
      if (at >= 0) {
        res.failure = `the imported bytes differ from qemu-img convert -O raw at offset ${at}`;
      }
    }
  }
  await Deno.remove(dest).catch(() => {});
  return res;
}

async function headersCase(
  m: Mutated,
  dir: string,
  family: "headers" | "info",
): Promise<CaseResult> {
  const path = `${dir}/case.img`;
  await Deno.writeFile(path, m.bytes);
  const args = family === "headers" ? ["headers", path] : ["info", path];
  const o = await diskstream(args);
  const res: CaseResult = {
    family,
    code: o.code,
    compared: false,
    failure: checkOutcome(o, o.code === 0),
    input: m.bytes,
    inputName: "image",
    description: [`${m.image.name}: ${m.mutations.join("; ") || "unchanged"}`],
    args: [family, "image"],
  };
  if (res.failure || o.code !== 0 || family === "info") return res;
  let json: { virtual_size: number; cluster_bits: number; data_clusters: [number, number][] };
  try {
    json = JSON.parse(new TextDecoder().decode(o.stdout));
  } catch {
    res.failure = "headers printed something that is not JSON";
    return res;
  }
  const cs = 2 ** json.cluster_bits;
  const nClusters = Math.ceil(json.virtual_size / cs);
  let prev = -1;
  for (const [a, b] of json.data_clusters) {
    if (!(a > prev && b >= a && b < nClusters)) {
      res.failure = `headers lists [${a},${b}] out of order or past the ${nClusters} clusters`;
      return res;
    }
    prev = b;
  }
  // Every cluster holding non-zero data for qemu-img must be listed.
  if (json.virtual_size <= COMPARE_LIMIT) {
    const raw = await qemuRaw(path, m.image.format === "vhd" ? "vpc" : "qcow2", dir);
    if (raw && raw.length === json.virtual_size) {
      res.compared = true;
      const listed = new Uint8Array(nClusters);
      for (const [a, b] of json.data_clusters) listed.fill(1, a, b + 1);
      for (let c = 0; c < nClusters; c++) {
        if (listed[c]) continue;
        if (raw.subarray(c * cs, (c + 1) * cs).some((x) => x !== 0)) {
          res.failure = `headers leaves out cluster ${c}, which holds data for qemu-img`;
          return res;
        }
      }
    }
  }
  return res;
}

// ---------------------------------------------------------------- allocation JSON

type Json = unknown;

interface Hint {
  text: string;
  /** Clusters (bytes) the hint allocates when it is valid; null when it must be refused. */
  ranges: [number, number][] | null;
  what: string;
}

/** A valid hint: legacy list, intervals or qemu-img map, at some hint cluster size. */
function validHint(rng: Rng): { json: Json; ranges: [number, number][]; shape: string } {
  const shape = rng.pick(["legacy", "intervals", "map"]);
  const size = SOURCE_SIZE;
  if (shape === "map") {
    const ext: Record<string, Json>[] = [];
    const ranges: [number, number][] = [];
    let at = 0;
    let data = rng.chance(0.5);
    while (at < size) {
      const len = Math.min(size - at, (1 + rng.int(300)) * 512 * rng.pick([1, 8, 128]));
      ext.push({ start: at, length: len, depth: 0, present: data, zero: !data, data, offset: at });
      if (data) ranges.push([at, at + len]);
      at += len;
      data = !data;
    }
    return { json: ext, ranges, shape };
  }
  const bits = rng.pick([9, 12, 16, 21, 22, 30]);
  const hs = 2 ** bits;
  const n = Math.ceil(size / hs);
  const clusters: number[] = [];
  for (let c = 0; c < n; c++) if (rng.chance(0.3)) clusters.push(c);
  const ranges: [number, number][] = clusters.map((c) => [c * hs, Math.min(size, (c + 1) * hs)]);
  let list: Json[];
  if (shape === "legacy") list = clusters;
  else {
    list = [];
    for (const c of clusters) {
      const last = list.at(-1) as [number, number] | undefined;
      if (last && last[1] === c - 1) last[1] = c;
      else list.push([c, c]);
    }
  }
  return { json: { virtual_size: size, cluster_bits: bits, data_clusters: list }, ranges, shape };
}

const HOSTILE_VALUES: Json[] = [
  "3",
  "true",
  true,
  false,
  null,
  1.5,
  -1,
  2 ** 49,
  2 ** 52,
  2 ** 53,
  1e300,
  [],
  {},
];

/** A hint that must be refused: a valid one with one thing wrong. */
function hostileHint(rng: Rng): { json: Json; what: string } {
  const { json, shape } = validHint(rng);
  const kind = rng.int(5);
  if (kind === 0) {
    const top = rng.pick<Json>([null, 42, "x", true, [1, 2], [[0, 1]], {
      virtual_size: SOURCE_SIZE,
    }]);
    return { json: top, what: `top level ${JSON.stringify(top)}` };
  }
  if (shape === "map") {
    const ext = json as Record<string, Json>[];
    const i = rng.int(ext.length);
    const e = ext[i];
    const choice = rng.int(9);
    if (choice === 0) e.data = rng.pick<Json>(["true", 1, "false", null, 0]);
    else if (choice === 1) e.start = rng.pick(HOSTILE_VALUES.filter((v) => v !== 2 ** 49));
    else if (choice === 2) e.length = rng.pick([-512, "512", 2 ** 52, 1e300, null]);
    else if (choice === 3) delete e.data;
    else if (choice === 4 && ext.length > 1) ext.reverse();
    else if (choice === 5) (e.start as number) += 512; // gap or overlap
    else if (choice === 6) ext.push({ ...ext.at(-1)!, start: SOURCE_SIZE, length: 2 ** 49 });
    else if (choice === 7) ext[i] = rng.pick<Json>([null, 42, "x", []]) as Record<string, Json>;
    else ext.splice(i, 0, { ...e }); // duplicate: overlap
    return { json: ext, what: `map entry ${i} changed (${choice})` };
  }
  const obj = json as Record<string, Json>;
  if (kind === 1) {
    obj.virtual_size = rng.pick<Json>([
      "3149312",
      -512,
      1.5,
      2 ** 49,
      2 ** 52,
      2 ** 53,
      1e300,
      null,
      SOURCE_SIZE * 2,
      SOURCE_SIZE - 512,
    ]);
    return { json: obj, what: `virtual_size ${JSON.stringify(obj.virtual_size)}` };
  }
  if (kind === 2) {
    obj.cluster_bits = rng.pick<Json>([8, 31, 64, "16", 16.5, null, -1]);
    return { json: obj, what: `cluster_bits ${JSON.stringify(obj.cluster_bits)}` };
  }
  const list = obj.data_clusters as Json[];
  const n = Math.ceil(SOURCE_SIZE / 2 ** (obj.cluster_bits as number));
  const bad = rng.pick<() => Json[] | Json>([
    () => [...list, rng.pick(HOSTILE_VALUES)],
    () => [...list, [1]],
    () => [...list, [1, 2, 3]],
    () => [[5, 2]],
    () => [n],
    () => [[0, n]],
    () => [2 ** 52],
    () => (n > 4 ? (shape === "legacy" ? [3, 1] : [[3, 3], [1, 1]]) : [n]), // out of order
    () => (n > 4 ? (shape === "legacy" ? [1, 1] : [[0, 2], [2, 3]]) : [n]), // overlap
    () => "0-3",
    () => null,
  ]);
  obj.data_clusters = bad();
  return { json: obj, what: `data_clusters ${JSON.stringify(obj.data_clusters).slice(0, 80)}` };
}

function makeHint(rng: Rng): Hint {
  if (rng.chance(0.35)) {
    const { json, ranges, shape } = validHint(rng);
    return { text: JSON.stringify(json), ranges, what: `valid ${shape} hint` };
  }
  const { json, what } = hostileHint(rng);
  return { text: json === undefined ? "" : JSON.stringify(json), ranges: null, what };
}

async function allocCase(
  rng: Rng,
  dir: string,
  corpus: { images: Image[]; source: string },
): Promise<CaseResult> {
  const source = corpus.source;
  if (rng.chance(0.25)) return await imageHintCase(rng, dir, corpus);
  const hint = makeHint(rng);
  const hintPath = `${dir}/hint.json`;
  await Deno.writeTextFile(hintPath, hint.text);
  const out = `${dir}/out.img`;
  await Deno.remove(out).catch(() => {});
  const vhd = rng.chance(0.25);
  const cs = vhd ? 2 * MiB : rng.pick([512, 4096, 65536, 2 * MiB]);
  const fmtArgs = vhd ? ["-f", "vhd"] : ["-c", String(cs)];
  const args = ["export", source, "--allocation", hintPath, ...fmtArgs, "-o", out];
  const o = await diskstream(args);
  const input = new TextEncoder().encode(hint.text);
  const res: CaseResult = {
    family: "alloc",
    code: o.code,
    compared: false,
    failure: checkOutcome(o, false),
    input,
    inputName: "hint.json",
    description: [hint.what],
    args: ["export", "SOURCE", "--allocation", "hint.json", ...fmtArgs, "-o", "OUT"],
  };
  if (res.failure) return res;
  if (hint.ranges === null) {
    if (o.code === 0) res.failure = "an invalid allocation hint was accepted";
    return res;
  }
  if (o.code !== 0) {
    res.failure = `a valid allocation hint was refused: ${o.stderr.trim()}`;
    return res;
  }
  const raw = await qemuRaw(out, vhd ? "vpc" : "qcow2", dir);
  if (!raw) {
    res.failure = "qemu-img cannot read the exported image";
    return res;
  }
  res.compared = true;
  const src = sourceBytes();
  const expected = new Uint8Array(src.length);
  for (const [a, b] of hint.ranges) {
    const from = Math.floor(a / cs) * cs;
    const to = Math.min(src.length, Math.ceil(b / cs) * cs);
    expected.set(src.subarray(from, to), from);
  }
  const at = firstDifference(expected, raw.subarray(0, Math.max(raw.length, expected.length)));
  if (raw.length < expected.length || at >= 0 && at < expected.length) {
    res.failure = `the export with a valid hint differs from the hinted source clusters at ${at}`;
  } else if (raw.subarray(expected.length).some((x) => x !== 0)) {
    res.failure = "the export holds data past the source size";
  }
  await Deno.remove(out).catch(() => {});
  return res;
}

/**
 * A mutated image as the hint (`--allocation image`, the hybrid case): refused, or an
 * export in which every cluster is either the source's bytes or zeros (never others).
 */
async function imageHintCase(
  rng: Rng,
  dir: string,
  corpus: { images: Image[]; source: string },
): Promise<CaseResult> {
  const m = mutateImage(rng, corpus.images);
  const hintPath = `${dir}/hint.img`;
  await Deno.writeFile(hintPath, m.bytes);
  const out = `${dir}/out.qcow2`;
  await Deno.remove(out).catch(() => {});
  const cs = rng.pick([512, 65536, 2 * MiB]);
  const o = await diskstream(
    ["export", corpus.source, "--allocation", hintPath, "-c", String(cs), "-o", out],
  );
  const res: CaseResult = {
    family: "alloc",
    code: o.code,
    compared: false,
    failure: checkOutcome(o, false),
    input: m.bytes,
    inputName: "hint.img",
    description: [`image hint ${m.image.name}: ${m.mutations.join("; ") || "unchanged"}`],
    args: ["export", "SOURCE", "--allocation", "hint.img", "-c", String(cs), "-o", "OUT"],
  };
  if (res.failure || o.code !== 0) return res;
  const raw = await qemuRaw(out, "qcow2", dir);
  if (!raw) {
    res.failure = "qemu-img cannot read the exported image";
    return res;
  }
  res.compared = true;
  const src = sourceBytes();
  for (let at = 0; at < src.length; at += cs) {
    const got = raw.subarray(at, at + cs);
    if (got.some((x) => x !== 0) && firstDifference(got, src.subarray(at, at + cs)) >= 0) {
      res.failure = `the export holds bytes at ${at} that are neither the source's nor zeros`;
      break;
    }
  }
  await Deno.remove(out).catch(() => {});
  return res;
}

// ---------------------------------------------------------------- the run

const FAMILIES = ["import", "headers", "info", "alloc"] as const;
type Family = typeof FAMILIES[number];

async function runCase(
  family: Family,
  rng: Rng,
  dir: string,
  corpus: { images: Image[]; source: string },
): Promise<CaseResult> {
  if (family === "alloc") return await allocCase(rng, dir, corpus);
  const m = mutateImage(rng, corpus.images);
  return family === "import" ? await importCase(m, dir) : await headersCase(m, dir, family);
}

/** Saves a failing case; returns the folder. */
async function saveFailure(
  r: CaseResult,
  seed: number,
  index: number,
  source: string,
  families: string[],
) {
  const folder = `${opts.out}/${r.family}-${seed}-${index}`;
  await Deno.mkdir(folder, { recursive: true });
  await Deno.writeFile(`${folder}/${r.inputName}`, r.input);
  if (r.family === "alloc") await Deno.copyFile(source, `${folder}/source.raw`);
  await Deno.writeTextFile(
    `${folder}/case.json`,
    JSON.stringify(
      {
        family: r.family,
        seed,
        case: index,
        failure: r.failure,
        mutations: r.description,
        prefill: r.prefill,
        maxBuffer: r.maxBuffer,
        fromFile: r.fromFile,
        command: `diskstream ${r.args.join(" ")}`,
        replay: `deno task fuzz --replay ${folder}`,
        regenerate: `deno task fuzz --seed ${seed} --family ${families.join(",")} --case ${index}`,
      },
      null,
      2,
    ) + "\n",
  );
  return folder;
}

/** Runs a saved case again (its input as saved, the family's oracles). */
async function replay(folder: string, dir: string, corpus: { images: Image[]; source: string }) {
  const meta = JSON.parse(await Deno.readTextFile(`${folder}/case.json`));
  if (meta.family === "alloc") {
    // The hint is replayed through the same path as generated ones: regenerate the case.
    return await runCase("alloc", new Rng(caseSeed(meta.seed, meta.case)), dir, corpus);
  }
  const bytes = await Deno.readFile(`${folder}/image`);
  const name = (meta.mutations[0] as string).split(":")[0];
  const image = corpus.images.find((i) => i.name === name) ?? corpus.images[0];
  const m: Mutated = {
    image,
    bytes,
    mutations: ["replayed"],
    prefill: meta.prefill === true,
    maxBuffer: meta.maxBuffer ?? MAX_BUFFER,
    fromFile: meta.fromFile === true,
  };
  return meta.family === "import"
    ? await importCase(m, dir)
    : await headersCase(m, dir, meta.family);
}

async function main(): Promise<number> {
  const dir = await Deno.makeTempDir({ prefix: "diskstream-fuzz-" });
  const cleanup = () => Deno.removeSync(dir, { recursive: true });
  Deno.addSignalListener("SIGINT", () => {
    cleanup();
    Deno.exit(130);
  });
  try {
    const corpus = await buildCorpus(dir);
    if (opts.replay) {
      const r = await replay(opts.replay, dir, corpus);
      console.log(r.failure ? `FAIL: ${r.failure}` : `passes now (exit ${r.code})`);
      return r.failure ? 1 : 0;
    }
    const seed = opts.seed !== undefined
      ? Number(opts.seed) >>> 0
      : (Math.random() * 2 ** 32) >>> 0;
    const families = (opts.family?.split(",") ?? FAMILIES) as Family[];
    for (const f of families) {
      if (!FAMILIES.includes(f)) throw new Error(`unknown family '${f}'`);
    }
    const stats = new Map<
      string,
      {
        cases: number;
        ok: number;
        refused: number;
        compared: number;
        failed: number;
        /** Cases whose input is an extended L2 qcow2 image (after mutation). */
        ext: number;
      }
    >();
    for (const f of families) {
      stats.set(f, { cases: 0, ok: 0, refused: 0, compared: 0, failed: 0, ext: 0 });
    }
    const failures: string[] = [];
    const deadline = Date.now() + Number(opts.seconds) * 1000;
    const only = opts.case !== undefined ? Number(opts.case) : undefined;
    console.log(`fuzz: seed ${seed}, ${opts.seconds} s, families ${families.join(", ")}`);
    let nextReport = Date.now() + 60_000; // a progress line a minute
    for (
      let index = only ?? 0;
      only !== undefined ? index === only : Date.now() < deadline;
      index++
    ) {
      if (!opts.quiet && only === undefined && Date.now() >= nextReport) {
        nextReport += 60_000;
        const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
        console.log(`fuzz: ${index} cases, ${failures.length} failures, ${left} s left`);
      }
      const rng = new Rng(caseSeed(seed, index));
      const family = families[index % families.length];
      const r = await runCase(family, rng, dir, corpus);
      const s = stats.get(family)!;
      s.cases++;
      if (r.code === 0) s.ok++;
      else s.refused++;
      if (r.compared) s.compared++;
      if (qcow2View(r.input)?.ext) s.ext++;
      if (r.failure) {
        s.failed++;
        const folder = await saveFailure(r, seed, index, corpus.source, families);
        failures.push(
          `${family} case ${index}: ${r.failure}\n    ${
            r.description.join("; ")
          }\n    replay: deno task fuzz --replay ${folder}`,
        );
        console.log(`FAIL ${failures.at(-1)}`);
      } else if (!opts.quiet && only !== undefined) {
        console.log(
          `case ${index} (${family}): passes (exit ${r.code}) — ${r.description.join("; ")}`,
        );
      }
    }
    console.log("\nfamily    cases  accepted  refused  compared  failed  ext-L2");
    let total = 0;
    for (const [f, s] of stats) {
      total += s.cases;
      console.log(
        `${f.padEnd(8)} ${String(s.cases).padStart(6)} ${String(s.ok).padStart(9)} ${
          String(s.refused).padStart(8)
        } ${String(s.compared).padStart(9)} ${String(s.failed).padStart(7)} ${
          String(s.ext).padStart(7)
        }`,
      );
    }
    console.log(`${total} cases, ${failures.length} failures (seed ${seed})`);
    return failures.length === 0 ? 0 : 1;
  } finally {
    cleanup();
  }
}

Deno.exit(await main());
