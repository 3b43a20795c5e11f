/**
 * Test helpers that need root: loop devices (`losetup`) over temp files and small
 * tmpfs mounts (a full disk on demand). Such tests are skipped on a developer machine
 * without root or the tools, but **fail** in CI (CI=true), which runs as root.
 */
import { IN_CI, run } from "./helpers.ts";

/** True when this process may create loop devices and mounts. */
export const IS_ROOT = Deno.uid() === 0;

async function have(tool: string): Promise<boolean> {
  try {
    return (await new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" })
      .output()).success;
  } catch {
    return false;
  }
}

/** True when losetup and mount are on PATH. */
export const HAVE_LOSETUP = await have("losetup");
/** True when strace is on PATH (for syscall checks). */
export const HAVE_STRACE = await have("strace");

/**
 * A test that needs root and `tools` (losetup, mount, strace, qemu-img): skipped
 * without them on a developer machine, failing in CI.
 */
export function rootTest(
  name: string,
  tools: { losetup?: boolean; strace?: boolean; qemu?: boolean },
  fn: () => Promise<void>,
): void {
  const missing = [
    IS_ROOT ? null : "root",
    tools.losetup && !HAVE_LOSETUP ? "losetup (apt-get install -y mount)" : null,
    tools.strace && !HAVE_STRACE ? "strace (apt-get install -y strace)" : null,
  ].filter((m) => m !== null);
  Deno.test({
    name,
    ignore: missing.length > 0 && !IN_CI,
    fn: async () => {
      if (missing.length > 0) throw new Error(`this test needs ${missing.join(", ")}`);
      if (tools.qemu) {
        const { HAVE_QEMU } = await import("./helpers.ts");
        if (!HAVE_QEMU) throw new Error("qemu-img is missing: apt-get install -y qemu-utils");
      }
      await fn();
    },
  });
}

async function must(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return new TextDecoder().decode(r.stdout).trim();
}

/**
 * Attaches `backing` (a file) as a loop device, runs `fn` with its path, and always
 * detaches it.
 */
export async function withLoopDevice<T>(
  backing: string,
  fn: (device: string) => Promise<T>,
): Promise<T> {
  const device = await must("losetup", ["--find", "--show", backing]);
  try {
    return await fn(device);
  } finally {
    await must("losetup", ["--detach", device]);
  }
}

/** Mounts a tmpfs of `size` (e.g. "1M") at `dir`, runs `fn`, and always unmounts it. */
export async function withTmpfs<T>(dir: string, size: string, fn: () => Promise<T>): Promise<T> {
  await must("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", dir]);
  try {
    return await fn();
  } finally {
    await must("umount", [dir]);
  }
}
