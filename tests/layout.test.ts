// The one architectural boundary: what the Worker may import. shared/ is imported by both
// runtimes and edge/ runs in workerd only, so neither may use Bun or Node (no `bun:` or `node:`
// module, no `Bun.`, `process.` or `Buffer`), nor import host/ or the LMTP client; shared/ imports
// only shared/. Everything worker.ts reaches, followed through its relative imports, must be
// in shared/ or edge/, and its packages must be runtime dependencies (not dev-only ones).
// wrangler's bundle would show some of this only at deploy, and a `node:` import not at all
// until a message arrives.

import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const ROOT = resolve(import.meta.dir, "..");
const RUNTIME_PACKAGES = new Set(Object.keys(JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")).dependencies));
const transpiler = new Bun.Transpiler({ loader: "ts" });

/** Where a file may import from, by its folder: shared/ stays in shared/, edge/ and worker.ts add edge/. */
function allowedFolders(file: string): string[] {
  return file.startsWith("shared/") ? ["shared/"] : ["shared/", "edge/"];
}

/** What in `source` (the file `file`, relative to the repository) the Worker could not run. */
export function problemsIn(file: string, source: string): string[] {
  const problems: string[] = [];
  // Type-only imports are erased: only what is left at run time counts.
  for (const { path } of transpiler.scanImports(source)) {
    if (path.startsWith("bun:") || path.startsWith("node:") || path === "bun") problems.push(`${file} imports ${path}`);
    else if (path.startsWith(".")) {
      const target = relative(ROOT, resolve(ROOT, dirname(file), path));
      if (!allowedFolders(file).some((folder) => target.startsWith(folder))) problems.push(`${file} imports ${target}, outside ${allowedFolders(file).join(" and ")}`);
    } else {
      const pkg = path.startsWith("@") ? path.split("/").slice(0, 2).join("/") : path.split("/")[0]!;
      if (!RUNTIME_PACKAGES.has(pkg)) problems.push(`${file} imports ${path}, not a runtime dependency in package.json`);
    }
  }
  // Comments and types are gone after transpiling; what is left runs.
  const code = transpiler.transformSync(source);
  for (const [pattern, what] of [
    [/\bBun\s*\./, "Bun."],
    [/\bprocess\s*\./, "process."],
    [/\bBuffer\b/, "Buffer"],
  ] as const) {
    if (pattern.test(code)) problems.push(`${file} uses ${what}`);
  }
  return problems;
}

function sourcesUnder(folder: string): string[] {
  return readdirSync(join(ROOT, folder), { recursive: true, encoding: "utf8" })
    .filter((f) => f.endsWith(".ts") && !f.endsWith(".test.ts"))
    .map((f) => `${folder}/${f}`)
    .sort();
}

/** worker.ts and every file it reaches through relative imports. */
function workerGraph(): string[] {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const { path } of transpiler.scanImports(readFileSync(join(ROOT, file), "utf8"))) {
      if (path.startsWith(".")) visit(relative(ROOT, resolve(ROOT, dirname(file), path)));
    }
  };
  visit("worker.ts");
  return [...seen].sort();
}

describe("what the Worker can run", () => {
  test("no file of shared/ or edge/ uses Bun or Node, or imports host/ or the LMTP client", () => {
    const files = [...sourcesUnder("shared"), ...sourcesUnder("edge")];
    expect(files).toContain("shared/contract.ts");
    expect(files).toContain("edge/spool.ts");
    expect(files.flatMap((f) => problemsIn(f, readFileSync(join(ROOT, f), "utf8")))).toEqual([]);
  });

  test("everything worker.ts imports, followed to the end, is in shared/ or edge/ and runs in workerd", () => {
    const graph = workerGraph();
    expect(graph).toContain("shared/app.ts");
    expect(graph).toContain("edge/forward.ts");
    expect(graph.filter((f) => f !== "worker.ts" && !f.startsWith("shared/") && !f.startsWith("edge/"))).toEqual([]);
    expect(graph.flatMap((f) => problemsIn(f, readFileSync(join(ROOT, f), "utf8")))).toEqual([]);
  });
});

describe("problemsIn: the check finds what it is for", () => {
  test.each([
    ['import { readFileSync } from "node:fs";', "shared/x.ts imports node:fs"],
    ['import { Database } from "bun:sqlite";', "shared/x.ts imports bun:sqlite"],
    ['const f = await import("node:path");', "shared/x.ts imports node:path"],
    ['import { Spool } from "../host/spool.ts";', "shared/x.ts imports host/spool.ts, outside shared/"],
    ['import { LmtpPool } from "../lmtp.ts";', "shared/x.ts imports lmtp.ts, outside shared/"],
    ['import { drain } from "../edge/drain.ts";', "shared/x.ts imports edge/drain.ts, outside shared/"],
    ['import { SMTPServer } from "smtp-server";', "shared/x.ts imports smtp-server, not a runtime dependency in package.json"],
    ["export const f = () => Bun.file(\"x\");", "shared/x.ts uses Bun."],
    ["export const port = process.env.PORT;", "shared/x.ts uses process."],
    ["export const b = Buffer.from([1]);", "shared/x.ts uses Buffer"],
  ])("%s", (source, problem) => {
    expect(problemsIn("shared/x.ts", source)).toEqual([problem]);
  });

  test("edge/ may import shared/ and edge/, not host/; comments, types and type-only imports do not count", () => {
    expect(problemsIn("edge/x.ts", 'import { createApp } from "../shared/app.ts";\nimport { EdgeSpool } from "./spool.ts";\nexport { createApp, EdgeSpool };')).toEqual([]);
    expect(problemsIn("edge/x.ts", 'import { deliverNow } from "../host/delivery.ts";\nexport { deliverNow };')).toEqual(["edge/x.ts imports host/delivery.ts, outside shared/ and edge/"]);
    expect(problemsIn("shared/x.ts", '// Bun.serve and process.env in a comment\nimport type { Socket } from "bun";\nlet t: Timer | null = null;\nexport { t };')).toEqual([]);
  });
});
