/**
 * VHD files written by hand for tests: qemu-img cannot create differencing VHDs
 * ("Backing file not supported for file format 'vpc'").
 */
import { DISK_TYPE_DIFFERENCING } from "../lib/vhd/constants.ts";
import { buildVhdDynamicHeader, encodeParentLocator } from "../lib/vhd/dynamic_header.ts";
import { buildVhdFooter } from "../lib/vhd/footer.ts";
import { pseudoRandom } from "./helpers.ts";

const BLOCK = 2 * 1024 * 1024;

/** What {@link writeVhd} writes. */
export interface HandVhd {
  diskType: number;
  size: number;
  /** Allocated blocks (their data is a pattern). */
  blocks: number[];
  locators?: [code: string, path: string][];
  parentName?: string;
  /** Default 2 MiB; block `b` holds `pseudoRandom(blockSize, b + 100)`. */
  blockSize?: number;
}

/**
 * Writes a dynamic or differencing VHD the way vhd-tool lays it out (footer copy,
 * header, BAT, locator data, blocks with all-ones bitmaps, footer): qemu-img cannot
 * create differencing VHDs ("Backing file not supported for file format 'vpc'").
 */
export async function writeVhd(path: string, v: HandVhd): Promise<void> {
  const bs = v.blockSize ?? BLOCK;
  const bitmap = Math.ceil(bs / 512 / 8 / 512) * 512;
  const entries = Math.ceil(v.size / bs);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const locData = (v.locators ?? []).map(([code, p]) => encodeParentLocator(code, p));
  let offset = 1536 + batBytes;
  const locators = locData.map((d, i) => {
    const loc = {
      platformCode: v.locators![i][0],
      dataSpace: 1,
      dataLength: d.length,
      dataOffset: offset,
    };
    offset += 512;
    return loc;
  });
  const footer = buildVhdFooter({ diskType: v.diskType, currentSize: v.size });
  const header = buildVhdDynamicHeader({
    tableOffset: 1536,
    maxTableEntries: entries,
    parentUnicodeName: v.parentName,
    parentLocators: locators,
    blockSize: bs,
    parentUuid: v.diskType === DISK_TYPE_DIFFERENCING ? new Uint8Array(16).fill(1) : undefined,
  });
  const bat = new Uint8Array(batBytes).fill(0xff);
  const parts: Uint8Array[] = [footer, header, bat];
  for (const d of locData) {
    const sector = new Uint8Array(512);
    sector.set(d);
    parts.push(sector);
  }
  for (const b of v.blocks) {
    new DataView(bat.buffer).setUint32(b * 4, offset / 512);
    parts.push(new Uint8Array(bitmap).fill(0xff), pseudoRandom(bs, b + 100));
    offset += bitmap + bs;
  }
  parts.push(footer);
  await Deno.writeFile(path, new Uint8Array());
  for (const part of parts) await Deno.writeFile(path, part, { append: true });
}
