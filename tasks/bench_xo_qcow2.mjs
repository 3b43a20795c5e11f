// The benchmark's TypeScript peer: @xen-orchestra/qcow2 (Xen Orchestra's qcow2 library)
// driven the way its own callers do, with the smallest glue around its API. Run with
// node (the runtime Xen Orchestra uses); XO_QCOW2_DIR names a directory whose
// node_modules holds @xen-orchestra/qcow2 and @vates/read-chunk (which 1.3.1 imports
// but does not declare as a dependency; tasks/bench.ts installs both there).
//
//   node bench_xo_qcow2.mjs export RAW OUT|-    raw file → qcow2 (RawDisk + toQcow2Stream)
//   node bench_xo_qcow2.mjs import-stream OUT   qcow2 on stdin → raw file (QcowStream)
//   node bench_xo_qcow2.mjs import-file IMG OUT qcow2 file → raw file (QCowAccessor)
//   node bench_xo_qcow2.mjs headers IMG         allocated cluster list (QCowAccessor)
import fs from "node:fs";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { pathToFileURL } from "node:url";
import { promisify } from "node:util";

const dir = process.env.XO_QCOW2_DIR;
if (!dir) throw new Error("XO_QCOW2_DIR is not set");
const load = (pkg) => import(pathToFileURL(join(dir, "node_modules", pkg, "dist/index.mjs")).href);
const qcow2 = await load("@xen-orchestra/qcow2");
const transform = await load("@xen-orchestra/disk-transform");

const open = promisify(fs.open);
const read = promisify(fs.read);
const write = promisify(fs.write);
const close = promisify(fs.close);
const stat = promisify(fs.stat);

/** The FileAccessor subset that RawDisk and QCowAccessor use, over node:fs. */
const accessor = {
  isEncrypted: false,
  openFile: (path) => open(path, "r"),
  closeFile: (fd) => close(fd),
  getSize: async (path) => (await stat(path)).size,
  read: async (fd, buffer, position) => {
    let done = 0;
    while (done < buffer.length) {
      const { bytesRead } = await read(fd, buffer, done, buffer.length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return { bytesRead: done, buffer };
  },
};

/** Writes every block of an initialised qcow2 Disk to a raw file at its offset. */
async function writeRaw(disk, out) {
  const fd = await open(out, "w");
  try {
    const bs = disk.getBlockSize();
    for await (const { index, data } of disk.diskBlocks()) {
      let done = 0;
      while (done < data.length) {
        done += await write(fd, data, done, data.length - done, index * bs + done);
      }
    }
    await promisify(fs.ftruncate)(fd, disk.getVirtualSize());
  } finally {
    await close(fd);
  }
}

const [mode, a, b] = process.argv.slice(2);
if (mode === "export") {
  const blockSize = Number(process.env.XO_BLOCK_SIZE ?? 64 * 1024);
  const disk = new transform.RawDisk(accessor, a, blockSize);
  await disk.init();
  const stream = qcow2.toQcow2Stream(disk);
  await pipeline(stream, b === "-" ? process.stdout : fs.createWriteStream(b));
} else if (mode === "import-stream") {
  const disk = new qcow2.QcowStream(process.stdin);
  await disk.init();
  await writeRaw(disk, a);
} else if (mode === "import-file") {
  const disk = new qcow2.QCowAccessor(accessor, a);
  await disk.init();
  await writeRaw(disk, b);
} else if (mode === "headers") {
  const disk = new qcow2.QCowAccessor(accessor, a);
  await disk.init();
  const blocks = disk.getBlockIndexes();
  await disk.close();
  const bits = Math.log2(disk.getBlockSize());
  const json = { virtual_size: disk.getVirtualSize(), cluster_bits: bits, data_clusters: blocks };
  process.stdout.write(JSON.stringify(json));
} else {
  console.error(
    "usage: bench_xo_qcow2.mjs export RAW OUT|- | import-stream OUT | import-file IMG OUT | headers IMG",
  );
  process.exit(2);
}
