/**
 * An import's input when it is a regular file or a block device (`-i FILE`, stdin
 * redirected from a file, `--input-fd` of a file): the image is read from where the
 * descriptor stands to the end of the file. Its metadata can then be read by random
 * access before the data ({@link SeekableInput.readInto}), the data in file order,
 * and whatever no table points to is skipped by seeking instead of being read or
 * held. With FFI, data is copied into the destination by the kernel
 * (`copy_file_range(2)`), like the pipe's `splice(2)`.
 *
 * @module
 */
import { ImageFile } from "./image_file.ts";
import * as libc from "./libc.ts";
import { destinationOps, moveFailure, type PipeInput } from "./pipe_input.ts";
import { descriptorPosition } from "./stream.ts";

/** Bytes asked per copy_file_range call. */
const COPY_STEP = 16 * 1024 * 1024;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  copy_file_range: {
    parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"],
    result: "isize",
  },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/** A file or device read as an image stream that may also seek; see the module comment. */
export interface SeekableInput extends PipeInput {
  /** Bytes of the image: from the starting position to the end of the file. */
  readonly size: number;
  /**
   * Fills `target` with the image bytes at `offset`, leaving the read position alone.
   * Throws a `CorruptImageError` naming `what` when they lie past the end.
   */
  readInto(offset: number, target: Uint8Array, what: string): void;
  /** Moves the read position `n` bytes forward without reading. */
  skip(n: number): void;
}

/**
 * The file or block device at `source` as a {@link SeekableInput}, or null when it is
 * something else (a pipe, a socket, a terminal): those are read as streams.
 */
export async function openFileInput(
  source: { path: string } | { fd: number },
  name: string,
): Promise<SeekableInput | null> {
  const path = "path" in source ? source.path : `/dev/fd/${source.fd}`;
  try {
    const st = await Deno.stat(path);
    if (!st.isFile && !st.isBlockDevice) return null;
  } catch {
    return null; // the ordinary path reports it
  }
  // An inherited descriptor may have been read partly: the image starts where it stands.
  const base = "fd" in source ? descriptorPosition(source.fd) : 0;
  const file = await ImageFile.open(path, base);
  const dest = destinationOps();
  const c = dest ? libc.loadLibc(SYMBOLS) : null;
  const offsets = new BigInt64Array(2);
  const inOffset = new Uint8Array(offsets.buffer, 0, 8);
  const outOffset = new Uint8Array(offsets.buffer, 8, 8);
  let inFd = -1;
  let pos = 0;
  return {
    name,
    size: file.size,
    read(buf) {
      const n = file.readSome(pos, buf);
      pos += n;
      return n;
    },
    readInto: (offset, target, what) => file.readInto(offset, target, what),
    skip(n) {
      pos += n;
    },
    ready: () => true, // a file never makes a read wait for a writer
    wait: () => Promise.resolve(),
    openDestination(destPath) {
      if (!dest || !c) return null;
      if (inFd < 0) inFd = c.open(new TextEncoder().encode(path + "\0"), libc.O_CLOEXEC, 0);
      return inFd < 0 ? null : dest.openDestination(destPath);
    },
    splice(destFd, at, length, destName) {
      for (;;) {
        offsets[0] = BigInt(base + pos);
        offsets[1] = BigInt(at);
        const n = Number(
          c!.copy_file_range(
            inFd,
            inOffset,
            destFd,
            outOffset,
            BigInt(Math.min(length, COPY_STEP)),
            0,
          ),
        );
        if (n >= 0) {
          pos += n;
          return n;
        }
        const e = libc.readErrno(c!.__errno_location);
        if (e !== libc.EINTR) return moveFailure(e, name, destName, at);
      }
    },
    startWriteback: (fd, at, length) => dest?.startWriteback(fd, at, length),
    closeDestination: (fd) => dest?.closeDestination(fd),
    close() {
      file.close();
      if (inFd >= 0) c!.close(inFd);
      inFd = -1;
    },
  };
}
