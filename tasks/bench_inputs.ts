/**
 * The benchmark's inputs, built on demand in a work directory: a fully allocated raw
 * disk, a base differing from it in 5% of its clusters, an allocation hint, a sparse
 * disk and its data as a dense file, a qcow2 made by qemu-img, and a huge qcow2 with
 * scattered data.
 *
 * @module
 */
import { pseudoRandom, qemu, writeSparse } from "../tests/helpers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const CLUSTER = 64 * KiB;

/** Sizes of the inputs: the real ones, or small ones for a smoke run. */
export interface InputSizes {
  /** The fully allocated disk. */
  full: number;
  /** The sparse disk's virtual size. */
  sparseVirtual: number;
  /** Number of 64 KiB pieces of data in the sparse disk. */
  sparsePieces: number;
  /** The huge qcow2's virtual size. */
  hugeVirtual: number;
  /** Number of 64 KiB writes scattered over the huge qcow2. */
  hugeWrites: number;
  /** The compressible disk behind the compressed qcow2 images. */
  compressible: number;
  /** Each of the disks exported concurrently by the many-streams case. */
  small: number;
}

/** The sizes the issue asks for. */
export const FULL_SIZES: InputSizes = {
  full: 2 * GiB,
  sparseVirtual: 64 * GiB,
  sparsePieces: 1280, // 80 MiB
  hugeVirtual: 1024 * GiB,
  hugeWrites: 4000,
  compressible: 512 * MiB,
  small: 256 * MiB,
};

/** Small sizes for `--quick`. */
export const QUICK_SIZES: InputSizes = {
  full: 256 * MiB,
  sparseVirtual: 8 * GiB,
  sparsePieces: 160, // 10 MiB
  hugeVirtual: 64 * GiB,
  hugeWrites: 500,
  compressible: 32 * MiB,
  small: 16 * MiB,
};

/** A deterministic sequence of distinct integers in `[0, n)`. */
function distinctIndexes(count: number, n: number, seed: number): number[] {
  const chosen = new Set<number>();
  let x = seed >>> 0 || 1;
  while (chosen.size < Math.min(count, n)) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    chosen.add(x % n);
  }
  return [...chosen].sort((a, b) => a - b);
}

async function writeAll(f: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await f.write(bytes.subarray(off));
}

/**
 * Makes `path` a file of `size` zero bytes with its blocks allocated (`fallocate`, else
 * written with dd): a target that imports overwrite, so that the first timed run does not
 * also pay for the file system's block allocation, as the runs after it do not.
 */
export async function zeroFilled(path: string, size: number): Promise<void> {
  const run = (cmd: string, args: string[]) =>
    new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output()
      .catch((e) => ({ success: false, stderr: new TextEncoder().encode(String(e)) }));
  await Deno.remove(path).catch(() => {});
  if ((await run("fallocate", ["-l", String(size), path])).success) return;
  const r = await run("dd", [
    "if=/dev/zero",
    `of=${path}`,
    "bs=4M",
    `count=${Math.ceil(size / (4 * MiB))}`,
    "conv=fsync",
  ]);
  if (!r.success) throw new Error(`dd: ${new TextDecoder().decode(r.stderr).trim()}`);
  await Deno.truncate(path, size);
}

/** Builds each input once, when first asked for. */
export class Inputs {
  #made = new Map<string, Promise<string>>();
  constructor(
    readonly dir: string,
    readonly sizes: InputSizes,
    readonly log: (s: string) => void,
  ) {}

  #once(name: string, make: (path: string) => Promise<void>): Promise<string> {
    let p = this.#made.get(name);
    if (p === undefined) {
      const path = `${this.dir}/${name}`;
      p = (async () => {
        const t = performance.now();
        await make(path);
        this.log(`  made ${name} in ${((performance.now() - t) / 1000).toFixed(1)} s`);
        return path;
      })();
      this.#made.set(name, p);
    }
    return p;
  }

  /** A fully allocated raw disk of pseudo-random data (no two clusters alike). */
  fullRaw(): Promise<string> {
    return this.#once("full.raw", async (path) => {
      const block = pseudoRandom(64 * MiB, 7);
      const view = new DataView(block.buffer);
      await using f = await Deno.open(path, { write: true, create: true, truncate: true });
      for (let done = 0, n = 0; done < this.sizes.full; n++) {
        const len = Math.min(block.length, this.sizes.full - done);
        for (let c = 0; c < len; c += CLUSTER) view.setUint32(c, n, true);
        await writeAll(f, block.subarray(0, len));
        done += len;
      }
    });
  }

  /** The base for `--diff`: the full disk with 5% of its 64 KiB clusters changed. */
  diffBase(): Promise<string> {
    return this.#once("base.raw", async (path) => {
      await Deno.copyFile(await this.fullRaw(), path);
      const clusters = Math.ceil(this.sizes.full / CLUSTER);
      const changed = distinctIndexes(Math.round(clusters * 0.05), clusters, 99);
      const data = pseudoRandom(CLUSTER, 1234);
      await using f = await Deno.open(path, { write: true });
      for (const c of changed) {
        new DataView(data.buffer).setUint32(0, c, true);
        await f.seek(c * CLUSTER, Deno.SeekMode.Start);
        await writeAll(f, data);
      }
    });
  }

  /** An allocation hint for the full disk: `qemu-img map --output=json` of it. */
  hint(): Promise<string> {
    return this.#once("hint.json", async (path) => {
      const raw = await this.fullRaw();
      await Deno.writeTextFile(path, await qemu(["map", "--output=json", "-f", "raw", raw]));
    });
  }

  /**
   * An allocation hint listing 5% of the full disk's 2 MiB blocks (as `vhd-tool
   * read_headers_interval` prints a VHD's), for the tar export goals.
   */
  hint5(): Promise<string> {
    return this.#once("hint5.json", async (path) => {
      const blocks = Math.ceil(this.sizes.full / (2 * MiB));
      const chosen = distinctIndexes(Math.max(1, Math.round(blocks * 0.05)), blocks, 55);
      const runs: [number, number][] = [];
      for (const b of chosen) {
        const last = runs.at(-1);
        if (last && last[1] + 1 === b) last[1] = b;
        else runs.push([b, b]);
      }
      await Deno.writeTextFile(
        path,
        JSON.stringify({ virtual_size: this.sizes.full, cluster_bits: 21, data_clusters: runs }),
      );
    });
  }

  /** The full disk as XVA disk members (`export -f tar` by the diskstream in `cli`). */
  fullTar(cli: string[]): Promise<string> {
    return this.#once("full.tar", async (path) => {
      // Written by diskstream itself (-o): piping 2 GiB through this process took 30 s.
      const r = await new Deno.Command(cli[0], {
        args: [...cli.slice(1), "export", "-f", "tar", await this.fullRaw(), "-o", path],
        stdout: "null",
        stderr: "piped",
      }).output();
      if (!r.success) {
        throw new Error(`export -f tar failed: ${new TextDecoder().decode(r.stderr).trim()}`);
      }
    });
  }

  /** A sparse disk with 64 KiB pieces of data spread evenly over its virtual size. */
  sparse(): Promise<string> {
    return this.#once("sparse.raw", async (path) => {
      const { sparseVirtual: size, sparsePieces: n } = this.sizes;
      const step = Math.floor(size / n / CLUSTER) * CLUSTER;
      const writes: [number, Uint8Array][] = [];
      for (let i = 0; i < n; i++) writes.push([i * step, pseudoRandom(CLUSTER, 1000 + i)]);
      await writeSparse(path, size, writes);
    });
  }

  /** The sparse disk's data, back to back, as a dense file. */
  dense(): Promise<string> {
    return this.#once("dense.raw", async (path) => {
      await using f = await Deno.open(path, { write: true, create: true, truncate: true });
      for (let i = 0; i < this.sizes.sparsePieces; i++) {
        await writeAll(f, pseudoRandom(CLUSTER, 1000 + i));
      }
    });
  }

  /** The full disk as qcow2, written by `qemu-img convert` (L2 tables among the data). */
  fullQcow2(): Promise<string> {
    return this.#once("full.qcow2", async (path) => {
      await qemu(["convert", "-f", "raw", "-O", "qcow2", await this.fullRaw(), path]);
    });
  }

  /**
   * The full disk as qcow2, snapshotted (`qemu-img snapshot -c`) and then fully
   * rewritten with the diff base's bytes: the active L2 tables are copied after all the
   * snapshot's data, so a stream reader meets the whole old disk before any table of
   * the new one.
   */
  snapshotQcow2(): Promise<string> {
    return this.#once("snapshot.qcow2", async (path) => {
      await qemu(["convert", "-f", "raw", "-O", "qcow2", await this.fullRaw(), path]);
      await qemu(["snapshot", "-c", "before", path]);
      await qemu(["convert", "-n", "-f", "raw", "-O", "qcow2", await this.diffBase(), path]);
    });
  }

  /**
   * {@link snapshotQcow2} after `qemu-img convert`: tables first, no snapshot. Made from
   * the diff base, the snapshotted image's active bytes: `qemu-img convert` (7.2) writes
   * the same file byte for byte from either source, two to three times faster from the
   * raw one (so it can be made while the snapshotted image is).
   */
  snapshotFlat(): Promise<string> {
    return this.#once("snapshot-flat.qcow2", async (path) => {
      await qemu(["convert", "-f", "raw", "-O", "qcow2", await this.diffBase(), path]);
    });
  }

  /**
   * A disk that compresses about 2:1 with deflate (words of hex text drawn from a
   * pseudo-random dictionary), like a disk of logs and binaries. Four 16 MiB blocks of
   * words are made and repeated, each 64 KiB cluster stamped with its number, so that
   * no two clusters are alike (each is compressed on its own) at an eighth of the cost.
   */
  compressibleRaw(): Promise<string> {
    return this.#once("compressible.raw", async (path) => {
      const noise = pseudoRandom(64 * KiB, 77);
      const dict = Array.from(
        { length: 2048 },
        (_, i) =>
          new TextEncoder().encode(noise.subarray(i * 16, i * 16 + 2 + (i % 7)).join("") + " "),
      );
      const blocks = Array.from({ length: 4 }, () => new Uint8Array(16 * MiB));
      let x = 12345;
      for (const block of blocks) {
        for (let at = 0; at < block.length;) {
          x = (x * 1103515245 + 12345) >>> 0;
          const w = dict[x >>> 21];
          const n = Math.min(w.length, block.length - at);
          block.set(w.subarray(0, n), at);
          at += n;
        }
      }
      const out = new Uint8Array(16 * MiB);
      const stamp = new TextEncoder();
      await using f = await Deno.open(path, { write: true, create: true, truncate: true });
      for (let done = 0, n = 0; done < this.sizes.compressible; done += out.length, n++) {
        out.set(blocks[n % blocks.length]);
        for (let c = 0; c < out.length; c += CLUSTER) {
          stamp.encodeInto(`${done + c} `, out.subarray(c, c + 16));
        }
        await writeAll(f, out.subarray(0, Math.min(out.length, this.sizes.compressible - done)));
      }
    });
  }

  /** The compressible disk as a compressed qcow2 (`qemu-img convert -c`), deflate or zstd. */
  compressedQcow2(type: "deflate" | "zstd"): Promise<string> {
    return this.#once(`compressed-${type}.qcow2`, async (path) => {
      await qemu([
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        `compression_type=${type === "deflate" ? "zlib" : "zstd"}`,
        await this.compressibleRaw(),
        path,
      ]);
    });
  }

  /**
   * Takes `file`, a checked output of `export FULL_RAW -o FILE` by the same diskstream, as
   * {@link fullExport} (moved, not copied) unless that is made already: true if taken.
   */
  async adoptFullExport(file: string): Promise<boolean> {
    const name = "full-export.qcow2", path = `${this.dir}/${name}`;
    if (this.#made.has(name)) return false;
    const moved = Deno.rename(file, path).then(() => path);
    this.#made.set(name, moved);
    await moved;
    return true;
  }

  /** The full disk as the qcow2 `export -o` of the diskstream in `cli` writes it. */
  fullExport(cli: string[]): Promise<string> {
    return this.#once("full-export.qcow2", async (path) => {
      const r = await new Deno.Command(cli[0], {
        args: [...cli.slice(1), "export", await this.fullRaw(), "-o", path],
        stdout: "null",
        stderr: "piped",
      }).output();
      if (!r.success) {
        throw new Error(`export failed: ${new TextDecoder().decode(r.stderr).trim()}`);
      }
    });
  }

  /** A smaller fully allocated disk (the many-streams case). */
  smallRaw(): Promise<string> {
    return this.#once("small.raw", async (path) => {
      await using f = await Deno.open(path, { write: true, create: true, truncate: true });
      for (let done = 0; done < this.sizes.small; done += 16 * MiB) {
        await writeAll(
          f,
          pseudoRandom(Math.min(16 * MiB, this.sizes.small - done), 500 + done / MiB),
        );
      }
    });
  }

  /** A huge qcow2 with 64 KiB of data written at scattered clusters by qemu-io. */
  hugeQcow2(): Promise<string> {
    return this.#once("huge.qcow2", async (path) => {
      const { hugeVirtual: size, hugeWrites: n } = this.sizes;
      await qemu(["create", "-q", "-f", "qcow2", path, String(size)]);
      const args = ["-f", "qcow2"];
      distinctIndexes(n, size / CLUSTER, 4242).forEach((c, i) => {
        args.push("-c", `write -q -P ${(i % 255) + 1} ${c * CLUSTER} 64k`);
      });
      // cache=unsafe: without it every allocating write is flushed to the disk (80 s under load).
      await qemu(["--cache=unsafe", ...args, path], "qemu-io");
    });
  }
}
