/**
 * The `import` command family (placeholder until implemented).
 *
 * @module
 */
import type { Command } from "commander";

/** Registers the import commands on `program`. */
export function registerImport(_program: Command): void {}
