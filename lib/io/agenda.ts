/**
 * The agenda of a stream walk: the byte ranges the metadata read so far says are
 * coming (tables, data clusters, compressed clusters, blocks), in batches sorted by
 * stream offset, and how each kind of range is consumed.
 *
 * @module
 */

/** How the bytes of a kind of range are consumed. */
export const Mode = {
  /** Handed over piece by piece as they arrive (data written straight through). */
  Stream: 0,
  /** Collected into one buffer and handed over whole (tables, compressed data). */
  Assemble: 1,
  /** Passed over (tables the import does not need). */
  Skip: 2,
} as const;
/** One of {@link Mode}'s values. */
export type Mode = typeof Mode[keyof typeof Mode];

/** A range of the stream that the metadata says is coming. */
export interface Expected {
  kind: number;
  start: number;
  length: number;
  /** What the format attaches: a guest cluster, a table index… */
  aux: number;
}

/**
 * A batch of expected ranges (for example the entries of one L2 table), sorted by
 * stream offset before it joins the agenda.
 */
export class RecordRun {
  /** Memory one range slot takes: three doubles and a byte. */
  static readonly SLOT_BYTES = 25;
  start: Float64Array;
  length: Float64Array;
  aux: Float64Array;
  kind: Uint8Array;
  count = 0;
  /** Read position while the run is on the agenda. */
  next = 0;
  /** Called with the memory a growth is about to take (it may throw to refuse it). */
  onGrow?: (bytes: number) => void;

  constructor(capacity: number) {
    this.start = new Float64Array(capacity);
    this.length = new Float64Array(capacity);
    this.aux = new Float64Array(capacity);
    this.kind = new Uint8Array(capacity);
  }

  /** Memory the run holds (its capacity, not only its count). */
  get bytes(): number {
    return this.start.length * RecordRun.SLOT_BYTES;
  }

  /** Appends a range (the run grows as needed). */
  add(kind: number, start: number, length: number, aux: number): void {
    if (this.count === this.start.length) this.#grow();
    const i = this.count++;
    this.start[i] = start;
    this.length[i] = length;
    this.aux[i] = aux;
    this.kind[i] = kind;
  }

  #grow() {
    const cap = Math.max(16, this.start.length * 2);
    this.onGrow?.(cap * RecordRun.SLOT_BYTES);
    const grow = <T extends Float64Array | Uint8Array>(a: T, b: T) => (b.set(a), b);
    this.start = grow(this.start, new Float64Array(cap));
    this.length = grow(this.length, new Float64Array(cap));
    this.aux = grow(this.aux, new Float64Array(cap));
    this.kind = grow(this.kind, new Uint8Array(cap));
  }

  /** Sorts by start (stable); a run that is already in order costs one scan. */
  sort(): void {
    const n = this.count;
    let sorted = true;
    for (let i = 1; i < n && sorted; i++) sorted = this.start[i - 1] <= this.start[i];
    if (sorted) return;
    const order = Array.from({ length: n }, (_, i) => i);
    const s = this.start;
    order.sort((a, b) => s[a] - s[b] || a - b);
    const pick = <T extends Float64Array | Uint8Array>(a: T, b: T) => {
      for (let i = 0; i < n; i++) b[i] = a[order[i]];
      return b;
    };
    this.start = pick(this.start, new Float64Array(n));
    this.length = pick(this.length, new Float64Array(n));
    this.aux = pick(this.aux, new Float64Array(n));
    this.kind = pick(this.kind, new Uint8Array(n));
  }
}

/** The agenda: sorted runs merged by a min-heap on each run's next start. */
export class RecordQueue {
  #heap: RecordRun[] = [];
  #size = 0;
  #bytes = 0;

  get size(): number {
    return this.#size;
  }

  /** Memory the runs on the agenda hold. */
  get bytes(): number {
    return this.#bytes;
  }

  push(run: RecordRun) {
    if (run.count === 0) return;
    run.next = 0;
    this.#size += run.count;
    this.#bytes += run.bytes;
    const h = this.#heap;
    h.push(run);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (h[p].start[h[p].next] <= run.start[0]) break;
      h[i] = h[p];
      i = p;
    }
    h[i] = run;
  }

  peekStart(): number {
    const top = this.#heap[0];
    return top === undefined ? Infinity : top.start[top.next];
  }

  /**
   * The run holding the next range, and the start of the first range of any other
   * run: the top run's ranges before it are the next ones in order.
   */
  top(): { run: RecordRun | undefined; others: number } {
    const h = this.#heap;
    const key = (r: RecordRun | undefined) => r === undefined ? Infinity : r.start[r.next];
    return { run: h[0], others: Math.min(key(h[1]), key(h[2])) };
  }

  /** The next range, left on the agenda. */
  peek(out: Expected) {
    const top = this.#heap[0];
    const i = top.next;
    out.kind = top.kind[i];
    out.start = top.start[i];
    out.length = top.length[i];
    out.aux = top.aux[i];
  }

  pop(out: Expected) {
    const h = this.#heap;
    const top = h[0];
    const i = top.next++;
    out.kind = top.kind[i];
    out.start = top.start[i];
    out.length = top.length[i];
    out.aux = top.aux[i];
    this.#size--;
    if (top.next === top.count) {
      this.#bytes -= top.bytes;
      const last = h.pop()!;
      if (h.length === 0) return;
      h[0] = last;
    }
    if (h.length > 1) this.#siftDown();
  }

  #siftDown() {
    const h = this.#heap;
    const item = h[0];
    const key = item.start[item.next];
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= h.length) break;
      const r = l + 1;
      let c = l;
      if (r < h.length && h[r].start[h[r].next] < h[l].start[h[l].next]) c = r;
      if (h[c].start[h[c].next] >= key) break;
      h[i] = h[c];
      i = c;
    }
    h[i] = item;
  }
}

/** What a format decoder tells the walker. */
