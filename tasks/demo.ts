/**
 * `deno task demo`: the main job on a built-in example. Makes a sparse 1 GiB sample
 * disk holding 40 MiB of recognisable data in a temp dir, exports it as a qcow2 stream
 * with the library, exports a diff after changing a few MiB, checks both with
 * qemu-img when it is installed, prints what happened and how fast, and removes the
 * temp dir.
 *
 * @module
 */
import { exportQcow2, formatBytes, type Qcow2Export } from "../mod.ts";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const encoder = new TextEncoder();

/** 1 MiB of text that says where it lives, so a hex dump of the image is readable. */
function recognisable(offset: number): Uint8Array {
  const block = new Uint8Array(MiB);
  for (let at = 0; at < MiB; at += 64) {
    const line = `diskstream demo: byte ${offset + at}`.padEnd(63, ".") + "\n";
    encoder.encodeInto(line, block.subarray(at, at + 64));
  }
  return block;
}

/** Creates a sparse file of `size` bytes holding `writes` ([offset, bytes]). */
async function sparseDisk(path: string, size: number, writes: [number, Uint8Array][]) {
  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(size);
  for (const [offset, bytes] of writes) {
    await file.seek(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < bytes.length) done += await file.write(bytes.subarray(done));
  }
}

/** Runs qemu-img; null when it is not installed. */
async function qemuImg(args: string[]): Promise<{ ok: boolean; text: string } | null> {
  try {
    const out = await new Deno.Command("qemu-img", { args, stdout: "piped", stderr: "piped" })
      .output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    return { ok: out.success, text: text.trim() };
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return null;
    throw err;
  }
}

/** Plans an export, writes its stream to `out`, and reports what happened. */
async function exportAndReport(
  title: string,
  source: string,
  out: string,
  base?: string,
): Promise<void> {
  const started = performance.now();
  const e = await exportQcow2(source, { base });
  const planned = performance.now();
  // writeTo: the data clusters are copied by the kernel (copy_file_range) when FFI is
  // allowed; `e.stream` gives the same bytes as a ReadableStream.
  await e.writeTo({ kind: "path", path: out });
  const pass1 = (planned - started) / 1000;
  const pass2 = (performance.now() - planned) / 1000;
  report(title, e, pass1, pass2);
}

function report(title: string, e: Qcow2Export, pass1: number, pass2: number): void {
  const l = e.layout;
  console.log(`\n${title}`);
  console.log(
    `  virtual size     ${formatBytes(l.virtualSize)} (${l.guestClusters} clusters of ${
      formatBytes(l.clusterSize)
    })`,
  );
  console.log(
    `  pass 1           ${(pass1 * 1000).toFixed(0)} ms: ${
      formatBytes(e.scannedBytes)
    } examined (holes skipped)`,
  );
  console.log(
    `  data clusters    ${l.dataClusters} (${
      formatBytes(l.dataClusters * l.clusterSize)
    }) in ${l.l2Tables} L2 table(s)`,
  );
  console.log(
    `  image size       ${
      formatBytes(l.fileSize)
    } (${l.totalClusters} clusters, refcount blocks ${l.refcountBlocks})`,
  );
  const total = pass1 + pass2;
  console.log(
    `  pass 2           ${(pass2 * 1000).toFixed(0)} ms; in all ${(total * 1000).toFixed(0)} ms, ${
      (l.virtualSize / MiB / total).toFixed(0)
    } MiB/s of virtual disk, ${(l.fileSize / MiB / total).toFixed(0)} MiB/s of image`,
  );
}

async function check(label: string, image: string, reference: string): Promise<boolean> {
  const checked = await qemuImg(["check", image]);
  if (checked === null) {
    console.log(`  qemu-img         not installed: checks skipped (apt-get install qemu-utils)`);
    return true;
  }
  const compared = await qemuImg(["compare", "-F", "raw", image, reference]);
  console.log(`  qemu-img check   ${checked.ok ? "no errors" : "FAILED: " + checked.text}`);
  console.log(
    `  qemu-img compare ${compared!.ok ? `identical to ${label}` : "FAILED: " + compared!.text}`,
  );
  return checked.ok && compared!.ok;
}

async function main(): Promise<number> {
  const dir = await Deno.makeTempDir({ prefix: "diskstream-demo-" });
  try {
    const disk = `${dir}/sample.raw`;
    console.log(`sample disk: ${disk}`);
    // 1 GiB virtual, 40 MiB of data in four places, the rest holes.
    const writes: [number, Uint8Array][] = [];
    for (const [start, mib] of [[0, 4], [100 * MiB, 16], [512 * MiB, 12], [GiB - 8 * MiB, 8]]) {
      for (let k = 0; k < mib; k++) writes.push([start + k * MiB, recognisable(start + k * MiB)]);
    }
    await sparseDisk(disk, GiB, writes);
    console.log(`  ${formatBytes(GiB)} virtual, ${formatBytes(writes.length * MiB)} of data`);

    await exportAndReport("export sample.raw → sample.qcow2", disk, `${dir}/sample.qcow2`);
    let ok = await check("sample.raw", `${dir}/sample.qcow2`, disk);

    // The same disk with 3 MiB changed (one of them now zeros): export only what differs.
    const changed = `${dir}/changed.raw`;
    await sparseDisk(changed, GiB, [
      ...writes,
      [300 * MiB, recognisable(1)],
      [513 * MiB, recognisable(2)],
      [101 * MiB, new Uint8Array(MiB)],
    ]);
    await exportAndReport(
      "export changed.raw --diff sample.raw → diff.qcow2",
      changed,
      `${dir}/diff.qcow2`,
      disk,
    );
    const rebased = await qemuImg(["rebase", "-u", "-b", disk, "-F", "raw", `${dir}/diff.qcow2`]);
    if (rebased !== null) {
      ok = await check("changed.raw (diff over sample.raw)", `${dir}/diff.qcow2`, changed) && ok;
    }
    console.log(ok ? "\ndemo: all good" : "\ndemo: a check FAILED");
    return ok ? 0 : 1;
  } finally {
    await Deno.remove(dir, { recursive: true });
    console.log(`removed ${dir}`);
  }
}

if (import.meta.main) Deno.exit(await main());
