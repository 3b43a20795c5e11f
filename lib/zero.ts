/**
 * Fast all-zero and equality tests of buffer regions. The comparisons run natively
 * (node:buffer's `compare`, a memcmp that moves a machine word at a time and stops at
 * the first difference) against a shared zero region, so a cluster of data is
 * rejected after its first non-zero word and an all-zero cluster is confirmed at
 * memory speed. The testers bind their buffers once, so testing cluster after cluster
 * of a multi-megabyte read costs one native call each.
 *
 * @module
 */
import { Buffer } from "node:buffer";

/** The largest region compared in one native call (the largest qcow2 cluster). */
const ZERO_BYTES = 2 * 1024 * 1024;
const ZEROS = Buffer.alloc(ZERO_BYTES);

function bufferOf(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A test of regions `[start, end)` of one buffer. */
export type RegionTest = (start: number, end: number) => boolean;

/** Returns a test that is true when `bytes[start, end)` is all zeros. */
export function zeroTest(bytes: Uint8Array): RegionTest {
  const view = bufferOf(bytes);
  return (start, end) => {
    for (let at = start; at < end; at += ZERO_BYTES) {
      const stop = Math.min(end, at + ZERO_BYTES);
      if (view.compare(ZEROS, 0, stop - at, at, stop) !== 0) return false;
    }
    return true;
  };
}

/** True when every byte of `bytes[start, end)` is zero. */
export function isAllZero(bytes: Uint8Array, start = 0, end = bytes.length): boolean {
  return zeroTest(bytes)(start, end);
}

/** Returns a test that is true when `a[start, end)` and `b[start, end)` are equal. */
export function sameTest(a: Uint8Array, b: Uint8Array): RegionTest {
  const va = bufferOf(a);
  const vb = bufferOf(b);
  return (start, end) => va.compare(vb, start, end, start, end) === 0;
}
