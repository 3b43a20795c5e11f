/**
 * Small helpers for on-disk integers and alignment. All formats here are big-endian.
 * 64-bit fields are read as bigint and converted only when they fit a safe integer.
 *
 * @module
 */
import { CorruptImageError } from "./errors.ts";

/**
 * Reads a big-endian u64 at `offset` of `view` as a number; throws
 * {@link CorruptImageError} naming `field` if it is above 2^53 - 1.
 */
export function readU64(view: DataView, offset: number, field: string, base = 0): number {
  const v = view.getBigUint64(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(
      `${field} is ${v}, larger than this tool can address`,
      base + offset,
    );
  }
  return Number(v);
}

/** Writes `value` (a safe integer) as a big-endian u64. */
export function writeU64(view: DataView, offset: number, value: number): void {
  view.setBigUint64(offset, BigInt(value));
}

/** Rounds `n` up to a multiple of `align`. */
export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/** `ceil(a / b)` for non-negative safe integers. */
export function divCeil(a: number, b: number): number {
  return Math.ceil(a / b);
}

/** A DataView over the whole of `bytes`. */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** True when `n` is a power of two (n > 0). */
export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 30;
}

/** log2 of a power of two up to 2^30. */
export function log2(n: number): number {
  return 31 - Math.clz32(n);
}
