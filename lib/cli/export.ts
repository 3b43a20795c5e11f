/**
 * The `export` command family (placeholder until implemented).
 *
 * @module
 */
import type { Command } from "commander";

/** Registers the export commands on `program`. */
export function registerExport(_program: Command): void {}
