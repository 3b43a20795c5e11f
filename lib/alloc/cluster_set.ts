/**
 * A set of cluster indices stored as a bitmap: one bit per cluster of the disk, so a
 * 1 TiB disk at 64 KiB clusters costs 2 MiB whatever is allocated.
 *
 * @module
 */

/** A bitmap of `length` clusters of `clusterSize` bytes each. */
export class ClusterSet {
  /** Number of clusters the set can hold (indices 0 … length-1). */
  readonly length: number;
  /** Size in bytes of one cluster. */
  readonly clusterSize: number;
  readonly #words: Uint32Array;
  #count = 0;

  constructor(length: number, clusterSize: number) {
    this.length = length;
    this.clusterSize = clusterSize;
    this.#words = new Uint32Array(Math.ceil(length / 32));
  }

  /** Number of clusters in the set. */
  get count(): number {
    return this.#count;
  }

  /** True if cluster `i` is in the set. */
  has(i: number): boolean {
    return (this.#words[Math.floor(i / 32)] & (1 << (i % 32))) !== 0;
  }

  /** Adds cluster `i` (ignored when out of range). */
  add(i: number): void {
    if (i < 0 || i >= this.length) return;
    const w = Math.floor(i / 32);
    const bit = 1 << (i % 32);
    if ((this.#words[w] & bit) === 0) {
      this.#words[w] |= bit;
      this.#count++;
    }
  }

  /** Removes cluster `i`. */
  delete(i: number): void {
    if (i < 0 || i >= this.length) return;
    const w = Math.floor(i / 32);
    const bit = 1 << (i % 32);
    if ((this.#words[w] & bit) !== 0) {
      this.#words[w] &= ~bit;
      this.#count--;
    }
  }

  /** Adds every cluster from `first` to `last`, both inclusive, clipped to the set. */
  addRange(first: number, last: number): void {
    const lo = Math.max(0, first);
    const hi = Math.min(this.length - 1, last);
    for (let i = lo; i <= hi; i++) {
      if (i % 32 === 0 && i + 31 <= hi) {
        const w = i / 32;
        this.#count += 32 - popcount(this.#words[w]);
        this.#words[w] = 0xffffffff;
        i += 31;
      } else {
        this.add(i);
      }
    }
  }

  /**
   * Adds every cluster that overlaps the byte range `[start, start + length)`:
   * the end is rounded **up**, so a partial last cluster is kept.
   */
  addBytes(start: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(start / this.clusterSize);
    const last = Math.ceil((start + length) / this.clusterSize) - 1;
    this.addRange(first, last);
  }

  /** The first cluster ≥ `from` in the set, or -1; skips empty words. */
  nextSet(from: number): number {
    const words = this.#words;
    let w = Math.floor(Math.max(0, from) / 32);
    if (w >= words.length) return -1;
    let bits = words[w] & (~0 << (Math.max(0, from) & 31));
    while (bits === 0) {
      if (++w >= words.length) return -1;
      bits = words[w];
    }
    const i = w * 32 + 31 - Math.clz32(bits & -bits);
    return i < this.length ? i : -1;
  }

  /** The first cluster ≥ `from` not in the set (`length` if none); skips full words. */
  nextClear(from: number): number {
    const words = this.#words;
    let w = Math.floor(Math.max(0, from) / 32);
    if (w >= words.length) return this.length;
    let bits = ~words[w] & (~0 << (Math.max(0, from) & 31));
    while (bits === 0) {
      if (++w >= words.length) return this.length;
      bits = ~words[w];
    }
    return Math.min(this.length, w * 32 + 31 - Math.clz32(bits & -bits));
  }

  /** Adds every cluster of `other`. Both sets must have the same length. */
  addAll(other: ClusterSet): void {
    for (const i of other) this.add(i);
  }

  /** The cluster indices in ascending order; skips empty words quickly. */
  *[Symbol.iterator](): IterableIterator<number> {
    const words = this.#words;
    for (let w = 0; w < words.length; w++) {
      let bits = words[w];
      while (bits !== 0) {
        const low = bits & -bits;
        const i = w * 32 + 31 - Math.clz32(low);
        yield i;
        bits ^= low;
      }
    }
  }

  /** Maximal runs of consecutive clusters as `[first, last]` pairs, both inclusive. */
  *runs(): IterableIterator<[number, number]> {
    let start = -1;
    let prev = -2;
    for (const i of this) {
      if (i !== prev + 1) {
        if (start >= 0) yield [start, prev];
        start = i;
      }
      prev = i;
    }
    if (start >= 0) yield [start, prev];
  }

  /**
   * The same allocation at another cluster size: a cluster of the result is set
   * when any byte of it lies in a cluster of this set. `virtualSize` bounds the result.
   */
  remap(clusterSize: number, virtualSize: number): ClusterSet {
    const out = new ClusterSet(Math.ceil(virtualSize / clusterSize), clusterSize);
    if (clusterSize === this.clusterSize && out.length === this.length) {
      out.#words.set(this.#words.subarray(0, out.#words.length));
      out.#count = this.#count;
      return out;
    }
    for (const [first, last] of this.runs()) {
      const start = first * this.clusterSize;
      const end = Math.min((last + 1) * this.clusterSize, virtualSize);
      out.addBytes(start, end - start);
    }
    return out;
  }
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
