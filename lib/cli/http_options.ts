/**
 * The HTTP(S) client flags that `export -o URL` and `import -i URL` share.
 *
 * @module
 */
import type { Command } from "commander";
import type { HttpClientOptions, HttpFlags } from "../http/client.ts";
import { UsageError } from "../errors.ts";

/** Adds `--header`, `--cacert` and `--insecure` to `command`. */
export function addHttpOptions(command: Command): Command {
  return command
    .option(
      "--header <LINE>",
      "with an http(s):// URL: send this header, 'Name: value' (repeatable)",
      (v: string, all: string[] = []) => [...all, v],
    )
    .option(
      "--cacert <FILE>",
      "with an https:// URL or nbds:// URI: trust the CA certificate(s) in FILE (PEM)",
    )
    .option("--insecure", "with an https:// URL: skip the certificate check (tests only)");
}

/** The client options of the HTTP flags (reads `--cacert`). */
export async function httpOptionsOf(flags: HttpFlags): Promise<HttpClientOptions> {
  const { clientOptionsFrom } = await import("../http/client.ts");
  return await clientOptionsFrom(flags);
}

/**
 * Says on stderr when a redirect leads to another server: it is followed, but never
 * silently (and the client sends no credentials there).
 */
export function noteRedirect(from: string, to: string): void {
  if (new URL(from).origin === new URL(to).origin) return;
  console.error(
    `diskstream: note: ${from} redirects to another server, ${to}: ` +
      "the URL's password, Authorization and Cookie are not sent there",
  );
}

/** Refuses the HTTP flags when the endpoint is not a URL. */
export function checkHttpFlags(flags: HttpFlags, isUrl: boolean, option: string): void {
  if (isUrl) return;
  const given = [
    flags.header && "--header",
    flags.cacert && "--cacert",
    flags.insecure && "--insecure",
  ]
    .filter(Boolean);
  if (given.length > 0) {
    throw new UsageError(
      `${given.join(", ")} ${given.length === 1 ? "applies" : "apply"} to an http(s):// ` +
        `${option} only`,
    );
  }
}
