/**
 * The `headers` command family (placeholder until implemented).
 *
 * @module
 */
import type { Command } from "commander";

/** Registers the headers commands on `program`. */
export function registerHeaders(_program: Command): void {}
