/**
 * Many small positional reads in one system call, through Linux's io_uring. The
 * probes of an export's first pass are one 4 KiB read per 64 KiB cluster, 32 768 for
 * a 2 GiB disk: as single `pread` calls they cost 2.2 µs each on the bench machine
 * (the system call, not the copy), in batches of 256 about 0.8 µs.
 *
 * Synchronous: {@link ReadRing.read} submits a batch and waits for all of it (pages in
 * the cache are copied while submitting; the others are read by the kernel's workers
 * in parallel), so no read is ever in flight when it returns and its buffer is the
 * caller's again. Optional: {@link openReadRing} returns null without `--allow-ffi`,
 * off Linux, or where the kernel refuses io_uring (`kernel.io_uring_disabled`, a
 * seccomp filter, a kernel before 5.6); callers then read one `pread` at a time. A
 * read the ring could not do (an old kernel's unknown operation, an I/O error, a short
 * read) reports its errno or length, and the caller reads it again the portable way,
 * which gives the real error.
 *
 * @module
 */
import { EINTR, loadLibc, readErrno } from "./libc.ts";
import { errnoMessage } from "./errno.ts";

// The system call numbers are the same on x86-64 and arm64 (since Linux 5.1).
const SYS_IO_URING_SETUP = 425n;
const SYS_IO_URING_ENTER = 426n;
const IORING_ENTER_GETEVENTS = 1n;
const IORING_FEAT_SINGLE_MMAP = 1;
/** Came with IORING_OP_READ (Linux 5.6): a kernel without it cannot read this way. */
const IORING_FEAT_RW_CUR_POS = 8;
const IORING_OFF_SQES = 0x10000000n;
const IORING_OP_READ = 22;
const PROT_READ_WRITE = 3;
const MAP_SHARED_POPULATE = 0x01 | 0x8000;
const EAGAIN = 11;
const EBUSY = 16;
/** Bytes of `struct io_uring_params`, of a submission entry, of a completion entry. */
const PARAMS_BYTES = 120;
const SQE_BYTES = 64;
const CQE_BYTES = 16;

const SYMBOLS = {
  syscall: { parameters: ["i64", "i64", "i64", "i64", "i64", "i64"], result: "i64" },
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/** The most reads {@link BatchReads.readMany} takes at once. */
export const BATCH_READS = 256;

/** A reader of one file that can read many small pieces in one system call. */
export interface BatchReads {
  /** True when {@link BatchReads.readMany} reads in batches (io_uring is there): opens the ring. */
  batched(): boolean;
  /**
   * Reads `length` bytes at each of `positions[0 .. count)` into consecutive slots of
   * `into` in one system call, at most {@link BATCH_READS} at a time; `results[i]` is
   * then the bytes read into slot `i` or a negative errno. Returns false, reading
   * nothing, where io_uring is unavailable.
   */
  readMany(
    into: Uint8Array,
    length: number,
    positions: ArrayLike<number>,
    count: number,
    results: Int32Array,
  ): boolean;
}

/** Buffers a failed ring may still write into: kept for the life of the process. */
const PINNED: Uint8Array[] = [];

/** Batches of positional reads; see the module comment. */
export interface ReadRing {
  /** The most reads one {@link ReadRing.read} takes. */
  readonly capacity: number;
  /**
   * Reads `length` bytes at `positions[i]` of the file open as `fd` into
   * `into[i * length, (i + 1) * length)`, for each `i < count`, and waits for all of
   * them. `results[i]` is then the bytes read (fewer at the end of the file) or a
   * negative errno. Throws only when the kernel refuses the whole call.
   */
  read(
    fd: number,
    into: Uint8Array,
    length: number,
    positions: ArrayLike<number>,
    count: number,
    results: Int32Array,
  ): void;
  /** Releases the ring; later reads throw. */
  close(): void;
}

/**
 * A ring for batches of up to `capacity` reads, or null where io_uring cannot be used
 * (see the module comment).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openReadRing } from "./uring.ts";
 *
 * const ring = openReadRing(8); // null without --allow-ffi, or where io_uring is refused
 * if (ring) {
 *   assert.equal(ring.capacity, 8);
 *   ring.close();
 * }
 * ```
 */
export function openReadRing(capacity = 256): ReadRing | null {
  const c = loadLibc(SYMBOLS);
  if (c === null) return null;
  const params = new Uint8Array(PARAMS_BYTES);
  const ringFd = Number(
    c.syscall(SYS_IO_URING_SETUP, BigInt(capacity), BigInt(addressOf(params)), 0n, 0n, 0n),
  );
  if (ringFd < 0) return null;
  const p = new DataView(params.buffer);
  const u32 = (at: number) => p.getUint32(at, true);
  const sqEntries = u32(0);
  const cqEntries = u32(4);
  // struct io_sqring_offsets at 40, struct io_cqring_offsets at 80.
  const sq = { head: u32(40), tail: u32(44), mask: u32(48), array: u32(64) };
  const cq = { head: u32(80), tail: u32(84), mask: u32(88), cqes: u32(100) };
  const needed = IORING_FEAT_SINGLE_MMAP | IORING_FEAT_RW_CUR_POS;
  if ((u32(20) & needed) !== needed || sqEntries < capacity) {
    c.close(ringFd);
    return null;
  }
  const ringBytes = Math.max(sq.array + sqEntries * 4, cq.cqes + cqEntries * CQE_BYTES);
  const sqeBytes = sqEntries * SQE_BYTES;
  const ringPtr = c.mmap(null, BigInt(ringBytes), PROT_READ_WRITE, MAP_SHARED_POPULATE, ringFd, 0n);
  const sqePtr = c.mmap(
    null,
    BigInt(sqeBytes),
    PROT_READ_WRITE,
    MAP_SHARED_POPULATE,
    ringFd,
    IORING_OFF_SQES,
  );
  const failed = (ptr: Deno.PointerValue) => ptr === null || Deno.UnsafePointer.value(ptr) === -1n;
  if (failed(ringPtr) || failed(sqePtr)) {
    if (!failed(ringPtr)) c.munmap(ringPtr, BigInt(ringBytes));
    if (!failed(sqePtr)) c.munmap(sqePtr, BigInt(sqeBytes));
    c.close(ringFd);
    return null;
  }
  const ring = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(ringPtr!, ringBytes));
  const ringSigned = new Int32Array(ring.buffer);
  const sqes = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(sqePtr!, sqeBytes));
  const sqMask = ring[sq.mask / 4];
  const cqMask = ring[cq.mask / 4];
  // The indirection array maps slot i to entry i once and for all.
  for (let i = 0; i < sqEntries; i++) ring[sq.array / 4 + i] = i;
  /** What every entry holds already: a batch writes only positions and addresses. */
  let prepared = { fd: -1, length: -1 };
  let open = true;
  let broken = false;
  return {
    capacity,
    read(fd, into, length, positions, count, results) {
      if (!open || broken) throw new Error(broken ? "the ring failed before" : "read after close");
      if (count > capacity || count * length > into.length) {
        throw new RangeError(`a batch of ${count} reads of ${length} bytes does not fit`);
      }
      if (count === 0) return;
      const address = addressOf(into);
      if (prepared.fd !== fd || prepared.length !== length) {
        const view = new DataView(sqes.buffer);
        sqes.fill(0);
        for (let at = 0; at < sqeBytes; at += SQE_BYTES) {
          view.setUint8(at, IORING_OP_READ);
          view.setInt32(at + 4, fd, true);
          view.setUint32(at + 24, length, true);
        }
        prepared = { fd, length };
      }
      let tail = Atomics.load(ring, sq.tail / 4);
      for (let i = 0; i < count; i++, tail = (tail + 1) >>> 0) {
        const entry = (tail & sqMask) * (SQE_BYTES / 4);
        const position = positions[i];
        const slot = address + i * length;
        sqes[entry + 2] = position % 0x1_0000_0000; // off
        sqes[entry + 3] = Math.floor(position / 0x1_0000_0000);
        sqes[entry + 4] = slot % 0x1_0000_0000; // addr
        sqes[entry + 5] = Math.floor(slot / 0x1_0000_0000);
        sqes[entry + 8] = i; // user_data
      }
      Atomics.store(ring, sq.tail / 4, tail); // a release store, as the ABI asks
      let submitted = 0;
      let reaped = 0;
      while (reaped < count) {
        const r = Number(c.syscall(
          SYS_IO_URING_ENTER,
          BigInt(ringFd),
          BigInt(count - submitted),
          BigInt(count - reaped),
          IORING_ENTER_GETEVENTS,
          0n,
        ));
        if (r >= 0) submitted += r;
        else {
          const e = readErrno(c.__errno_location);
          if (e !== EINTR && e !== EAGAIN && e !== EBUSY) {
            // Reads may still be in flight into `into`: the ring cannot be trusted again,
            // and `into` must outlive them.
            broken = true;
            PINNED.push(into);
            throw new Error(`io_uring_enter failed: ${errnoMessage(e)}`);
          }
        }
        let head = Atomics.load(ring, cq.head / 4);
        const end = Atomics.load(ring, cq.tail / 4); // an acquire load, as the ABI asks
        for (; head !== end; head = (head + 1) >>> 0, reaped++) {
          const at = (cq.cqes + (head & cqMask) * CQE_BYTES) / 4;
          results[ring[at]] = ringSigned[at + 2];
        }
        Atomics.store(ring, cq.head / 4, head);
      }
    },
    close() {
      if (!open) return;
      open = false;
      c.munmap(ringPtr, BigInt(ringBytes));
      c.munmap(sqePtr, BigInt(sqeBytes));
      c.close(ringFd);
    },
  };
}

/**
 * A reader's ring, opened at its first batch ({@link openReadRing}); `get` gives null
 * from then on where it could not be opened.
 */
export function lazyReadRing(capacity: number): { get(): ReadRing | null; close(): void } {
  let ring: ReadRing | null | undefined;
  return {
    get: () => ring === undefined ? (ring = openReadRing(capacity)) : ring,
    close: () => ring?.close(),
  };
}

/** The address of `bytes` (user-space addresses fit a double exactly). */
function addressOf(bytes: Uint8Array): number {
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes)));
}
