/**
 * Descriptors the caller passed. A descriptor number given on the command line
 * (`--output-fd N`, `--input-fd N`, `fd:N`, the drop-ins' descriptor flags) must be one
 * this process inherited: the runtime opens its own files (Deno's cache databases sit
 * at 9–15) with close-on-exec set, while a descriptor passed through `exec` has it
 * clear. {@link inheritedFd} is the check every such path goes through.
 *
 * @module
 */
import { PermissionError, UsageError } from "../errors.ts";
import { loadLibc, O_CLOEXEC, readErrno } from "./libc.ts";

const F_GETFD = 1;
const FD_CLOEXEC = 1;
const EBADF = 9;
/** Descriptors are non-negative C ints. */
const MAX_FD = 2 ** 31 - 1;

const SYMBOLS = {
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/**
 * How this process holds descriptor `fd`: `"inherited"` (close-on-exec clear: passed
 * by the caller), `"own"` (close-on-exec set: the runtime's), `"closed"`, or null when
 * it cannot be learnt (neither FFI nor `/proc/self/fdinfo` is permitted).
 */
export function descriptorState(fd: number): "inherited" | "own" | "closed" | null {
  const c = loadLibc(SYMBOLS);
  if (c !== null) {
    const flags = c.fcntl(fd, F_GETFD, 0);
    if (flags < 0) return readErrno(c.__errno_location) === EBADF ? "closed" : null;
    return (flags & FD_CLOEXEC) !== 0 ? "own" : "inherited";
  }
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`);
  } catch (err) {
    return err instanceof Deno.errors.NotFound ? "closed" : null;
  }
  const m = /^flags:\s+([0-7]+)/m.exec(text);
  if (!m) return null;
  // `flags` in /proc/self/fdinfo/N is octal, with open(2)'s O_CLOEXEC bit.
  return (parseInt(m[1], 8) & O_CLOEXEC) !== 0 ? "own" : "inherited";
}

/**
 * Returns `fd` when it is a descriptor this process inherited from its caller, and
 * throws otherwise: a {@link UsageError} (exit status 2) for a number that is not a
 * descriptor, a closed descriptor or one of the runtime's own, a
 * {@link PermissionError} when it cannot be checked. `what` names it in messages
 * (`"--output-fd 9"`, `"fd:9"`).
 *
 * @example
 * ```ts
 * import { inheritedFd } from "./descriptor.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(inheritedFd(2, "stderr"), 2); // passed by whoever started this process
 * assert.throws(() => inheritedFd(-1, "fd:-1"), /not a file descriptor/);
 * ```
 */
export function inheritedFd(fd: number, what: string): number {
  if (!Number.isSafeInteger(fd) || fd < 0 || fd > MAX_FD) {
    throw new UsageError(`${what}: not a file descriptor number`);
  }
  const state = descriptorState(fd);
  if (state === "inherited") return fd;
  if (state === "closed") {
    throw new UsageError(
      `${what}: descriptor ${fd} is not open: the caller must pass it (e.g. '${fd}<FILE' or ` +
        `'${fd}>FILE' in a shell)`,
    );
  }
  if (state === "own") {
    throw new UsageError(
      `${what}: descriptor ${fd} was not passed to diskstream (it is one of the runtime's own ` +
        `files: close-on-exec is set): the caller must pass it (e.g. '${fd}<FILE' or '${fd}>FILE' ` +
        `in a shell)`,
    );
  }
  throw new PermissionError(
    `${what}: cannot check that descriptor ${fd} was passed to diskstream: run with --allow-ffi or --allow-all`,
  );
}

/** `/dev/fd/N` for a descriptor the caller passed ({@link inheritedFd}). */
export function descriptorPath(fd: number, what: string): string {
  return `/dev/fd/${inheritedFd(fd, what)}`;
}
