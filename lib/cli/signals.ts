/**
 * Stopping on SIGINT, SIGTERM and SIGHUP: while a command that writes runs, these
 * signals abort it through an AbortSignal instead of killing the process, so that it
 * removes what it created and says on one line what was interrupted (exit status 128
 * + the signal's number, see {@link InterruptedError}).
 *
 * @module
 */
import { InterruptedError, STOP_SIGNALS } from "../errors.ts";

/**
 * Runs `work` with an AbortSignal that aborts (with an {@link InterruptedError}) on
 * SIGINT, SIGTERM or SIGHUP; the default action of those signals is restored after.
 */
export async function stoppableBySignals<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const listeners: [Deno.Signal, () => void][] = [];
  for (const name of Object.keys(STOP_SIGNALS) as Deno.Signal[]) {
    const listener = () => {
      if (!controller.signal.aborted) controller.abort(new InterruptedError(name));
    };
    try {
      Deno.addSignalListener(name, listener);
      listeners.push([name, listener]);
    } catch {
      // not on this platform
    }
  }
  try {
    return await work(controller.signal);
  } finally {
    for (const [name, listener] of listeners) Deno.removeSignalListener(name, listener);
  }
}
