/**
 * Fixtures shared by the import tests: a small source disk, piping an image into
 * `diskstream import`, reading and patching qcow2 tables, and the one-line error check.
 */
import assert from "node:assert/strict";
import { pseudoRandom, qemu, runCli, type RunResult, sha256File, writeSparse } from "./helpers.ts";

/** 1 MiB. */
export const MiB = 1 << 20;

/**
 * A sparse disk of 3 MiB + 1536 bytes (not a multiple of any cluster size above
 * 512): random data, compressible data, holes, and a partial last cluster.
 */
export async function sourceDisk(path: string, seed = 1): Promise<number> {
  const size = 3 * MiB + 1536;
  const text = new Uint8Array(300 * 1024).map((_, i) => 32 + ((i * 7) % 61));
  await writeSparse(path, size, [
    [0, pseudoRandom(5000, seed)],
    [70_000, text],
    [1 * MiB + 4096, pseudoRandom(200_000, seed + 1)],
    [2 * MiB + 512, text.subarray(0, 100_000)],
    [size - 3000, pseudoRandom(3000, seed + 2)],
  ]);
  return size;
}

/** Runs `diskstream import DEST ARGS` with `image` piped into its stdin. */
export function importPiped(image: string, dest: string, args: string[] = []): Promise<RunResult> {
  return runCli(["import", dest, ...args], { stdinFile: image });
}

/** Asserts a successful run (showing stderr otherwise). */
export function assertOk(r: RunResult): void {
  assert.equal(r.code, 0, `exit ${r.code}: ${r.stderr}`);
}

/** Imports `image` through a pipe into `dest` and asserts it equals the raw file `want`. */
export async function importMatches(
  image: string,
  want: string,
  dest: string,
  args: string[] = [],
): Promise<void> {
  assertOk(await importPiped(image, dest, args));
  await assertSameBytes(want, dest);
}

/** Asserts that `a` and `b` have the same bytes (and so the same size). */
export async function assertSameBytes(a: string, b: string): Promise<void> {
  assert.equal((await Deno.stat(a)).size, (await Deno.stat(b)).size, `size of ${a} vs ${b}`);
  assert.equal(await sha256File(a), await sha256File(b), `bytes of ${a} vs ${b}`);
}

/** The image converted to raw by qemu-img: the reference for an import. */
export async function qemuRaw(image: string, format: string, out: string): Promise<string> {
  await qemu(["convert", "-f", format, "-O", "raw", image, out]);
  return out;
}

/** Asserts the command failed with status 1 and exactly one `diskstream:` line matching `re`. */
export function assertOneLineError(r: RunResult, re: RegExp): void {
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(r.code, 1, `exit ${r.code}: ${r.stderr}`);
  assert.equal(lines.length, 1, `one line expected, got: ${r.stderr}`);
  assert.match(lines[0], /^diskstream: /);
  assert.match(lines[0], re);
}

/** The places of a qcow2 image's tables, read from the file. */
export interface Qcow2Tables {
  clusterSize: number;
  l1Offset: number;
  refcountTableOffset: number;
  /** Host offsets of the L2 tables, in L1 order (0 = none). */
  l2: number[];
}

/** Reads the header and L1 table of the qcow2 file at `path`. */
export async function qcow2Tables(path: string): Promise<Qcow2Tables> {
  const bytes = await Deno.readFile(path);
  const v = new DataView(bytes.buffer);
  const clusterSize = 2 ** v.getUint32(20);
  const l1Size = v.getUint32(36);
  const l1Offset = Number(v.getBigUint64(40));
  const l2: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    l2.push(Number(v.getBigUint64(l1Offset + i * 8) & 0x00fffffffffffe00n));
  }
  return { clusterSize, l1Offset, refcountTableOffset: Number(v.getBigUint64(48)), l2 };
}

/** Reads the big-endian u64 at `offset` of the file. */
export async function readU64At(path: string, offset: number): Promise<bigint> {
  const f = await Deno.open(path);
  try {
    const b = new Uint8Array(8);
    await f.seek(offset, Deno.SeekMode.Start);
    await f.read(b);
    return new DataView(b.buffer).getBigUint64(0);
  } finally {
    f.close();
  }
}

/** Writes `bytes` at `offset` of the file (patching an image). */
export async function patchAt(path: string, offset: number, bytes: Uint8Array): Promise<void> {
  const f = await Deno.open(path, { write: true });
  try {
    await f.seek(offset, Deno.SeekMode.Start);
    await f.write(bytes);
  } finally {
    f.close();
  }
}

/** Writes a big-endian u64 at `offset` of the file. */
export function writeU64At(path: string, offset: number, value: bigint): Promise<void> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, value);
  return patchAt(path, offset, b);
}

/** A copy of the first `length` bytes of `src` at `dst` (a truncated stream). */
export async function truncatedCopy(src: string, dst: string, length: number): Promise<void> {
  const bytes = await Deno.readFile(src);
  await Deno.writeFile(dst, bytes.subarray(0, length));
}
