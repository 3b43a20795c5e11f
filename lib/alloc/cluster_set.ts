/**
 * A set of cluster indices stored as a paged bitmap: one bit per cluster, in pages of
 * 65536 clusters (8 KiB) created only where a cluster is added. A 1 TiB disk at 64
 * KiB clusters costs at most 2 MiB; a disk that merely claims to be huge (an image
 * header saying 2^53 bytes, an empty L1 table) costs nothing for its empty regions,
 * so memory and time follow the clusters really present, not the declared size.
 *
 * @module
 */

/** Clusters per page (a power of two). */
const PAGE_BITS = 65536;
/** 32-bit words per page. */
const PAGE_WORDS = PAGE_BITS / 32;

/** A bitmap of `length` clusters of `clusterSize` bytes each. */
export class ClusterSet {
  /** Number of clusters the set can hold (indices 0 … length-1). */
  readonly length: number;
  /** Size in bytes of one cluster. */
  readonly clusterSize: number;
  /** Pages by page index; `#keys` holds their indices in ascending order. */
  readonly #pages = new Map<number, Uint32Array>();
  #keys: number[] = [];
  #count = 0;
  /** The page looked up last (most accesses stay within one page). */
  #lastKey = -1;
  #lastPage: Uint32Array | undefined;

  constructor(length: number, clusterSize: number) {
    this.length = length;
    this.clusterSize = clusterSize;
  }

  /** Number of clusters in the set. */
  get count(): number {
    return this.#count;
  }

  #page(key: number): Uint32Array | undefined {
    if (key !== this.#lastKey) {
      this.#lastKey = key;
      this.#lastPage = this.#pages.get(key);
    }
    return this.#lastPage;
  }

  #pageForWrite(key: number): Uint32Array {
    const existing = this.#page(key);
    if (existing) return existing;
    const page = new Uint32Array(PAGE_WORDS);
    this.#pages.set(key, page);
    const keys = this.#keys;
    if (keys.length === 0 || keys[keys.length - 1] < key) keys.push(key);
    else keys.splice(lowerBound(keys, key), 0, key);
    this.#lastKey = key;
    this.#lastPage = page;
    return page;
  }

  /** True if cluster `i` is in the set. */
  has(i: number): boolean {
    if (i < 0 || i >= this.length) return false;
    const key = Math.floor(i / PAGE_BITS);
    const page = this.#page(key);
    if (page === undefined) return false;
    const b = i - key * PAGE_BITS;
    return (page[b >>> 5] & (1 << (b & 31))) !== 0;
  }

  /** Adds cluster `i` (ignored when out of range). */
  add(i: number): void {
    if (i < 0 || i >= this.length) return;
    const key = Math.floor(i / PAGE_BITS);
    const page = this.#pageForWrite(key);
    const b = i - key * PAGE_BITS;
    const bit = 1 << (b & 31);
    if ((page[b >>> 5] & bit) === 0) {
      page[b >>> 5] |= bit;
      this.#count++;
    }
  }

  /** Removes cluster `i`. */
  delete(i: number): void {
    if (i < 0 || i >= this.length) return;
    const key = Math.floor(i / PAGE_BITS);
    const page = this.#page(key);
    if (page === undefined) return;
    const b = i - key * PAGE_BITS;
    const bit = 1 << (b & 31);
    if ((page[b >>> 5] & bit) !== 0) {
      page[b >>> 5] &= ~bit;
      this.#count--;
    }
  }

  /** Adds every cluster from `first` to `last`, both inclusive, clipped to the set. */
  addRange(first: number, last: number): void {
    let i = Math.max(0, first);
    const hi = Math.min(this.length - 1, last);
    while (i <= hi) {
      const key = Math.floor(i / PAGE_BITS);
      const page = this.#pageForWrite(key);
      const base = key * PAGE_BITS;
      const end = Math.min(hi, base + PAGE_BITS - 1);
      for (; i <= end; i++) {
        const b = i - base;
        if ((b & 31) === 0 && i + 31 <= end) {
          this.#count += 32 - popcount(page[b >>> 5]);
          page[b >>> 5] = 0xffffffff;
          i += 31;
        } else {
          const bit = 1 << (b & 31);
          if ((page[b >>> 5] & bit) === 0) {
            page[b >>> 5] |= bit;
            this.#count++;
          }
        }
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

  /** The first cluster ≥ `from` in the set, or -1; skips absent pages and empty words. */
  nextSet(from: number): number {
    from = Math.max(0, from);
    if (from >= this.length) return -1;
    const keys = this.#keys;
    const fromKey = Math.floor(from / PAGE_BITS);
    for (let k = lowerBound(keys, fromKey); k < keys.length; k++) {
      const key = keys[k];
      const page = this.#pages.get(key)!;
      const base = key * PAGE_BITS;
      const start = key === fromKey ? from - base : 0;
      let w = start >>> 5;
      let bits = page[w] & (~0 << (start & 31));
      while (bits === 0 && ++w < PAGE_WORDS) bits = page[w];
      if (bits === 0) continue;
      const i = base + w * 32 + 31 - Math.clz32(bits & -bits);
      return i < this.length ? i : -1;
    }
    return -1;
  }

  /** The first cluster ≥ `from` not in the set (`length` if none); skips full words. */
  nextClear(from: number): number {
    let i = Math.max(0, from);
    while (i < this.length) {
      const key = Math.floor(i / PAGE_BITS);
      const page = this.#page(key);
      if (page === undefined) return i;
      const base = key * PAGE_BITS;
      const start = i - base;
      let w = start >>> 5;
      let bits = ~page[w] & (~0 << (start & 31));
      while (bits === 0 && ++w < PAGE_WORDS) bits = ~page[w];
      if (bits !== 0) return Math.min(this.length, base + w * 32 + 31 - Math.clz32(bits & -bits));
      i = base + PAGE_BITS;
    }
    return this.length;
  }

  /** Adds every cluster of `other`. Both sets must have the same length. */
  addAll(other: ClusterSet): void {
    for (const [first, last] of other.runs()) this.addRange(first, last);
  }

  /** The cluster indices in ascending order; skips absent pages and empty words. */
  *[Symbol.iterator](): IterableIterator<number> {
    for (const key of this.#keys) {
      const page = this.#pages.get(key)!;
      const base = key * PAGE_BITS;
      for (let w = 0; w < PAGE_WORDS; w++) {
        let bits = page[w];
        while (bits !== 0) {
          const low = bits & -bits;
          yield base + w * 32 + 31 - Math.clz32(low);
          bits ^= low;
        }
      }
    }
  }

  /** Maximal runs of consecutive clusters as `[first, last]` pairs, both inclusive. */
  *runs(): IterableIterator<[number, number]> {
    for (let i = this.nextSet(0); i >= 0;) {
      const end = this.nextClear(i);
      yield [i, end - 1];
      i = end < this.length ? this.nextSet(end) : -1;
    }
  }

  /**
   * The same allocation at another cluster size: a cluster of the result is set
   * when any byte of it lies in a cluster of this set. `virtualSize` bounds the result.
   */
  remap(clusterSize: number, virtualSize: number): ClusterSet {
    const out = new ClusterSet(Math.ceil(virtualSize / clusterSize), clusterSize);
    if (clusterSize === this.clusterSize && out.length === this.length) {
      for (const key of this.#keys) out.#pages.set(key, this.#pages.get(key)!.slice());
      out.#keys = [...this.#keys];
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

/** The index of the first value ≥ `x` in the ascending `sorted` (its length if none). */
export function lowerBound(sorted: ArrayLike<number>, x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
