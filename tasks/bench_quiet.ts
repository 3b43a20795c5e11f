/**
 * Two things a VM's host does to its guest's memory that make a bench measure the host, not the
 * commands, and how the bench pauses them while it runs (root only; both are turned on again
 * when it ends, also on Ctrl-C):
 *
 * - DAMON-based reclaim (a kdamond with a `pageout` scheme) evicts page-cache pages idle for a
 *   minute or so: the inputs of the warm cases, mid-bench, so that a "warm" run reads from the
 *   disk at random. Paused by turning such kdamonds off.
 * - Free page reporting (virtio-balloon): memory freed for a few seconds is handed back to the
 *   host, and the next process to touch it pays a host page fault per 4 KiB (measured here:
 *   4 GiB written to tmpfs took 6.9 s of system time after 20 s idle, 0.8 s with reporting
 *   off). Which command pays lands at random: a 2 GiB import took 2 s or 9 s. Paused by
 *   unbinding the balloon driver; then `warm` GiB are touched once, so that the memory the
 *   bench's outputs reuse is the host's already.
 *
 * @module
 */

const DAMON = "/sys/kernel/mm/damon/admin/kdamonds";
const BALLOON = "/sys/bus/virtio/drivers/virtio_balloon";
const GiB = 1024 ** 3;

/** What was paused, for the report, and how to undo it. */
export interface Quieted {
  /** Sentences for the report's machine section (empty when nothing was paused). */
  notes: string[];
  /** Turns on again what was paused; safe to call more than once. */
  resume(): void;
}

function pauseDamon(): string[] {
  const paused: string[] = [];
  try {
    for (const k of Deno.readDirSync(DAMON)) {
      const dir = `${DAMON}/${k.name}`;
      if (!/^\d+$/.test(k.name)) continue;
      if (Deno.readTextFileSync(`${dir}/state`).trim() !== "on") continue;
      Deno.writeTextFileSync(`${dir}/state`, "off");
      paused.push(dir);
    }
  } catch {
    // no DAMON, or not root: nothing to pause
  }
  return paused;
}

/** The balloon devices that report free pages (feature bit 5), unbound from their driver. */
function unbindBalloons(): string[] {
  const unbound: string[] = [];
  try {
    for (const d of Deno.readDirSync(BALLOON)) {
      if (!/^virtio\d+$/.test(d.name)) continue;
      const features = Deno.readTextFileSync(`${BALLOON}/${d.name}/features`).trim();
      if (features[5] !== "1") continue; // VIRTIO_BALLOON_F_REPORTING
      Deno.writeTextFileSync(`${BALLOON}/unbind`, d.name);
      unbound.push(d.name);
    }
  } catch {
    // no balloon, or not root
  }
  return unbound;
}

/** Writes and removes `bytes` of zeros in tmpfs: touches that much free memory once. */
function touchMemory(bytes: number): void {
  const path = `/dev/shm/diskstream-bench-warm-${Deno.pid}`;
  const chunk = new Uint8Array(16 * 1024 * 1024).fill(1);
  try {
    const f = Deno.openSync(path, { write: true, create: true, truncate: true });
    try {
      for (let done = 0; done < bytes; done += chunk.length) f.writeSync(chunk);
    } finally {
      f.close();
    }
  } catch {
    // no tmpfs, or full: the first runs pay instead
  } finally {
    try {
      Deno.removeSync(path);
    } catch {
      // not made
    }
  }
}

function memAvailable(): number {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(Deno.readTextFileSync("/proc/meminfo"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * Pauses DAMON reclaim and free page reporting (see the module doc), and touches up to
 * `warmGiB` GiB of memory once (never more than half of what is available).
 */
export function quietMachine(warmGiB: number): Quieted {
  const damon = pauseDamon();
  const balloons = unbindBalloons();
  let warmed = 0;
  if (balloons.length) {
    warmed = Math.min(warmGiB * GiB, Math.floor(memAvailable() / 2 / GiB) * GiB);
    touchMemory(warmed);
  }
  const notes: string[] = [];
  if (damon.length) {
    notes.push(
      "DAMON reclaim (kdamond pageout, which evicts pages idle for a minute) paused during " +
        "the bench and resumed after",
    );
  }
  if (balloons.length) {
    notes.push(
      "free page reporting (virtio-balloon, which hands memory idle for seconds back to the " +
        "host, so that its next user pays a host page fault per page) paused during the bench " +
        `and resumed after; ${warmed / GiB} GiB touched once before the first case`,
    );
  }
  return {
    notes,
    resume() {
      for (const dir of damon.splice(0)) {
        try {
          Deno.writeTextFileSync(`${dir}/state`, "on");
        } catch {
          // best effort
        }
      }
      for (const name of balloons.splice(0)) {
        try {
          Deno.writeTextFileSync(`${BALLOON}/bind`, name);
        } catch {
          // best effort
        }
      }
    },
  };
}
