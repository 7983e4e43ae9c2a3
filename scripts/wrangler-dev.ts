// Runs the Worker in local workerd through `wrangler dev`, for `bun run dev` and the tests.
// wrangler dev exposes POST /cdn-cgi/handler/email?from=..&to=.. which calls email() with the
// request body as the raw message. What it answers (wrangler 4.86, checked by
// tests/integration/workerd.test.ts):
//   email() returned                -> 200 "Worker successfully processed email"
//   email() called setReject(r)     -> 400 "Worker rejected email with the following reason: r", and
//                                      its output shows: Email handler rejected message with the following reason: "r"
//                                      (only if setReject's promise is awaited: locally it is an RPC call)
//   email() threw e                 -> 500 with e's message and stack as text
//   wrangler's own refusals         -> 400 (no Message-ID, no From/To parameter, over 1 MiB locally)
//                                      and 500 when the message has no From header at all.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { LogLine } from "../shared/log.ts";
import { freePort } from "./free-port.ts";

export interface WranglerDev {
  url: string;
  port: number;
  /** wrangler's process group (bun x and everything it started: node, workerd). */
  pid: number;
  /** Everything wrangler and the Worker printed so far (stdout and stderr, colour codes removed). */
  output(): string;
  /** The JSON lines among it (the Worker's log), from an offset into output() on. */
  logLines(from?: number): LogLine[];
  stop(): Promise<void>;
}

const root = join(import.meta.dir, "..");


// Process groups still running; killed on exit so a crashed test run leaves no workerd behind.
const groups = new Set<number>();
let exitHook = false;

function killGroup(pid: number, signal: NodeJS.Signals | 0): boolean {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false; // ESRCH: the group is gone
  }
}

export interface WranglerDevOptions {
  port?: number;
  vars: Record<string, string>;
  readyTimeoutMs?: number;
  /** Local state (R2) kept here and left in place on stop, so a restart finds it; else a temp dir. */
  persistTo?: string;
  /** false: wrangler.toml without the EDGE_SPOOL bucket and the cron (the Worker as it runs without them). */
  edgeSpool?: boolean;
  /** Another entry module instead of worker.ts (the bench's copy of an earlier version). */
  main?: string;
  /** Appended to wrangler.toml: e.g. a [[services]] binding to a Worker of `alsoRun`. */
  extraToml?: string;
  /** The wrangler.toml of further Workers run in the same workerd (wrangler dev -c ... -c ...): a service binding reaches them. */
  alsoRun?: string[];
}

/**
 * wrangler.toml as it is, or rewritten: without the R2 bucket and the cron, or with another main.
 * Null: the repository's own file.
 */
function configFor(opts: WranglerDevOptions, dir: string): string | null {
  if (opts.edgeSpool !== false && !opts.main && !opts.extraToml) return opts.alsoRun?.length ? join(root, "wrangler.toml") : null;
  let toml = readFileSync(join(root, "wrangler.toml"), "utf8");
  if (opts.edgeSpool === false) toml = toml.replace(/^\[\[r2_buckets\]\]\n(?:(?!\[).*(?:\n|$))*/m, "").replace(/^\[triggers\]\n(?:(?!\[).*(?:\n|$))*/m, "");
  toml = toml.replace(/^main = .*$/m, `main = ${JSON.stringify(opts.main ?? join(root, "worker.ts"))}`);
  if (opts.extraToml) toml += `\n${opts.extraToml}\n`;
  const path = join(dir, "wrangler.toml");
  writeFileSync(path, toml);
  return path;
}

/**
 * Starts it; when a port it was given by freePort was taken before workerd bound it (other test
 * runs on the machine start servers too), once more with fresh ones.
 */
export async function startWranglerDev(opts: WranglerDevOptions): Promise<WranglerDev> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(opts);
    } catch (e) {
      if (attempt >= 3 || opts.port || !/Address already in use/.test((e as Error).message)) throw e;
    }
  }
}

async function startOnce(opts: WranglerDevOptions): Promise<WranglerDev> {
  const port = opts.port || (await freePort());
  // Its devtools port too: the default 9229 lets only one wrangler dev run at a time.
  const inspectorPort = await freePort();
  // Vars go through an env file, never the command line (visible in ps). wrangler treats them as
  // secrets: its binding table shows "(hidden)" instead of the value.
  const dir = mkdtempSync(join(tmpdir(), "relay-wrangler-"));
  const envFile = join(dir, "worker.env");
  writeFileSync(envFile, Object.entries(opts.vars).map(([k, v]) => `${k}=${v}`).join("\n") + "\n", { mode: 0o600 });
  const config = configFor(opts, dir);

  const proc = Bun.spawn(
    [
      process.execPath, "x", "wrangler", "dev", ...(config ? ["--config", config] : []), ...(opts.alsoRun ?? []).flatMap((c) => ["--config", c]),
      "--port", String(port), "--ip", "127.0.0.1", "--env-file", envFile, "--persist-to", opts.persistTo ?? join(dir, "state"),
      "--inspector-ip", "127.0.0.1", "--inspector-port", String(inspectorPort), "--show-interactive-dev-session=false",
    ],
    {
      cwd: root,
      env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1", FORCE_COLOR: "0" },
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      // Its own process group: bun x -> node wrangler -> node cli -> workerd x2 all go with one kill.
      detached: true,
    },
  );
  const pid = proc.pid;
  groups.add(pid);
  if (!exitHook) {
    exitHook = true;
    process.on("exit", () => {
      for (const g of groups) killGroup(g, "SIGKILL");
    });
  }

  let out = "";
  const collect = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const chunk of s) out += dec.decode(chunk, { stream: true });
  };
  void collect(proc.stdout);
  void collect(proc.stderr);
  const output = () => out.replace(/\x1b\[[0-9;]*m/g, "");

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    killGroup(pid, "SIGTERM");
    const deadline = Date.now() + 5_000;
    // The group is gone once every member exited (not only bun x, which proc.exited watches).
    while (killGroup(pid, 0) && Date.now() < deadline) await Bun.sleep(50);
    killGroup(pid, "SIGKILL");
    await proc.exited;
    groups.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  };

  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 60_000);
  while (!/Ready on http/.test(out)) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`wrangler dev did not start (workerd from the wrangler package; bun install installs both):\n${output().slice(-3000)}`);
    }
    await Bun.sleep(100);
  }
  // With several Workers in one wrangler dev (alsoRun), each line starts with "[<name>] ": the
  // relay's own lines are read without it, the others' left out.
  const prefix = `[${(Bun.TOML.parse(readFileSync(join(root, "wrangler.toml"), "utf8")) as { name: string }).name}] `;
  const logLines = (from = 0) =>
    output()
      .slice(from)
      .split("\n")
      .map((l) => (l.startsWith(prefix) ? l.slice(prefix.length) : l))
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as LogLine);
  return { url, port, pid, output, logLines, stop };
}
