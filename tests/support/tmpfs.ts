// A real full disk for tests: a small tmpfs (the tests run as root, as CI does; a mount that fails
// is a broken set-up and fails the test, it is never a skip), and a file that fills what is left.

import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";

/** Mounts a tmpfs of `size` ("256k", "1m") on the existing folder `at`. */
export function mountTmpfs(at: string, size: string): void {
  const mounted = Bun.spawnSync(["mount", "-t", "tmpfs", "-o", `size=${size}`, "tmpfs", at]);
  if (mounted.exitCode !== 0) throw new Error(`cannot mount a tmpfs for the full-disk test (it needs root): ${mounted.stderr.toString().trim()}`);
}

/** Fills what is left of the file system under `dir` with one file; returns its path. */
export function fillDisk(dir: string): string {
  const path = join(dir, "filler");
  const chunk = new Uint8Array(4096);
  const fd = openSync(path, "w");
  try {
    for (;;) writeSync(fd, chunk);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOSPC") throw e;
  } finally {
    closeSync(fd);
  }
  return path;
}
