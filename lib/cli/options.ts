/**
 * Option parsers shared by the commands: each turns a flag's text into a value or a
 * {@link UsageError} (exit status 2) that names the flag.
 *
 * @module
 */
import type { Command } from "commander";
import { UsageError } from "../errors.ts";
import type { NbdOptions } from "../nbd/client.ts";
import { inheritedFd } from "../io/descriptor.ts";
import type { Endpoint } from "../io/stream.ts";
import type { ProgressMode } from "../progress.ts";
import { parseSize } from "../size.ts";

/** `--flag SIZE` with K/M/G suffixes. */
export function sizeOption(flag: string): (v: string) => number {
  return (v) => parseSize(v, flag);
}

/**
 * A file descriptor number (`--output-fd N`) that the caller passed: a descriptor
 * this process did not inherit (closed, or one of the runtime's own) is refused
 * here, before any work.
 */
export function fdOption(flag: string): (v: string) => number {
  return (v) => {
    if (!/^\d+$/.test(v)) {
      throw new UsageError(`${flag} needs a file descriptor number, got '${v}'`);
    }
    return inheritedFd(Number(v), `${flag} ${v}`);
  };
}

/** A power of two between `min` and `max` (sizes with suffixes accepted). */
export function powerOfTwoOption(flag: string, min: number, max: number): (v: string) => number {
  return (v) => {
    const n = parseSize(v, flag);
    if (n < min || n > max || (n & (n - 1)) !== 0) {
      throw new UsageError(`${flag} must be a power of two from ${min} to ${max}, got '${v}'`);
    }
    return n;
  };
}

/** The endpoint named by a path option (`-` = std) or an fd option; std by default. */
export function endpointFrom(
  path: string | undefined,
  fd: number | undefined,
  flags: string,
): Endpoint {
  if (path !== undefined && fd !== undefined) {
    throw new UsageError(`give only one of ${flags}`);
  }
  if (fd !== undefined) return { kind: "fd", fd };
  if (path === undefined || path === "-") return { kind: "std" };
  return { kind: "path", path };
}

/** `--progress` / `--machine` → the progress mode. */
export function progressMode(opts: { progress?: boolean; machine?: boolean }): ProgressMode {
  if (opts.machine) return "machine";
  return opts.progress ? "bar" : "none";
}

/** The NBD flags of a command (see {@link addNbdOptions}). */
export interface NbdFlags {
  connections?: number;
  cacert?: string;
}

/**
 * Adds `--connections N` (for `nbd://…` endpoints) to `command`; `--cacert FILE`, which
 * `nbds://` endpoints use too, comes with the HTTP flags.
 */
export function addNbdOptions(command: Command): Command {
  return command
    .option(
      "--connections <N>",
      "NBD: connections to the server, 1 to 64 (default 4; 1 unless it offers multi-conn)",
      (v: string) => {
        if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 64) {
          throw new UsageError(`--connections needs a number from 1 to 64, got '${v}'`);
        }
        return Number(v);
      },
    );
}

/** The NBD options the flags give. */
export function nbdOptionsFrom(flags: NbdFlags): NbdOptions {
  return { connections: flags.connections, cacert: flags.cacert };
}

/** Help of `--direct` (export and import). */
export const DIRECT_HELP =
  "keep the disk's data out of the host's page cache (vhd-tool's --direct): disks and\n" +
  "output files are read and written with O_DIRECT, or where that is refused dropped\n" +
  "from the cache a few MiB behind the transfer (needs --allow-ffi)";

/**
 * `--direct` needs FFI (O_DIRECT descriptors, `posix_fadvise`): without it the transfer
 * goes through the page cache as usual. Says so on stderr rather than ignoring the flag
 * silently (the transfer itself goes on: XAPI's calls run with every permission).
 */
export function noteDirectWithoutFfi(direct: boolean | undefined): void {
  if (!direct || Deno.permissions.querySync({ name: "ffi" }).state === "granted") return;
  console.error(
    "diskstream: note: --direct needs --allow-ffi (or -A); without it the page cache is " +
      "used as usual",
  );
}
