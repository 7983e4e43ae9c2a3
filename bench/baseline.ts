// The host as it was at another commit, to measure before and after in one run:
// `BENCH_BASELINE=<git ref> bun run bench`. The commit's files are unpacked under .bench/ (git
// archive, nothing in the work tree changes) and run with this checkout's node_modules, so the
// only difference between the two hosts is the product's own code.

import { existsSync, mkdirSync, rmSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { OUT_DIR, ROOT } from "./server-child.ts";

export interface Baseline {
  ref: string;
  sha: string;
  dir: string;
}

export function checkoutBaseline(ref: string): Baseline {
  const rev = Bun.spawnSync(["git", "-C", ROOT, "rev-parse", "--verify", `${ref}^{commit}`], { stderr: "pipe" });
  if (rev.exitCode !== 0) throw new Error(`BENCH_BASELINE=${ref} is not a commit here: ${rev.stderr.toString().trim()}`);
  const sha = rev.stdout.toString().trim();
  const dir = join(OUT_DIR, `baseline-${sha.slice(0, 12)}`);
  if (!existsSync(join(dir, "server.ts"))) {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    const unpack = Bun.spawnSync(["sh", "-c", `git -C "$0" archive "$1" | tar -x -C "$2"`, ROOT, sha, dir], { stderr: "pipe" });
    if (unpack.exitCode !== 0) throw new Error(`cannot unpack ${sha}: ${unpack.stderr.toString().trim()}`);
    symlinkSync(join(ROOT, "node_modules"), join(dir, "node_modules"));
  }
  return { ref, sha, dir };
}
