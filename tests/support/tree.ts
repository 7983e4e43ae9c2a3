// A directory tree as lines, to show that a command changed nothing in it.

import { lstatSync, readFileSync, readdirSync, readlinkSync } from "node:fs";
import { join } from "node:path";

/** Every entry under `root` (links not followed): path, kind, mode, size, mtime, content digest. */
export function snapshot(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      const st = lstatSync(p);
      const kind = st.isSymbolicLink() ? `link->${readlinkSync(p)}` : st.isDirectory() ? "dir" : st.isFile() ? "file" : "other";
      const digest = st.isFile() ? new Bun.CryptoHasher("sha256").update(readFileSync(p)).digest("hex") : "";
      out.push(`${p.slice(root.length)} ${kind} ${(st.mode & 0o7777).toString(8)} ${st.size} ${st.mtimeMs} ${digest}`);
      if (kind === "dir") walk(p);
    }
  };
  walk(root);
  return out;
}
