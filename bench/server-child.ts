// The product's host in its own process, as it runs in production: `bun run server.ts` with its
// configuration in the environment. Its access log (one JSON line per request) goes to a file
// under .bench/, as it would go to the container's log; its CPU and memory are its own.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { freePort } from "../scripts/free-port.ts";

export const ROOT = join(import.meta.dir, "..");
export const OUT_DIR = join(ROOT, ".bench");

export interface ServerChild {
  url: string;
  pid: number;
  logPath: string;
  stop(): Promise<void>;
}

const children = new Set<Subprocess>();
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {}
  }
});


export interface SpawnOptions {
  apiKey: string;
  lmtpHost: string;
  lmtpPort: number;
  /** Names the log file under .bench/. */
  name: string;
  /** Extra arguments to bun itself (e.g. --cpu-prof). */
  bunArgs?: string[];
  /** The entry to run (default: the product's server.ts) and the folder to run it in. */
  script?: string;
  cwd?: string;
  /** The host's SPOOL_DIR; without it the host runs without a spool (503 on temporary faults). */
  spoolDir?: string;
  /** More settings (RSPAMD_URL, ...). */
  env?: Record<string, string>;
}

/** The bench decides whether the host has a spool and a spam filter, not whatever the shell had. */
function withoutSpool(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const { SPOOL_DIR: _spool, RSPAMD_URL: _rspamd, ...rest } = env;
  return rest;
}

export async function spawnServer(opts: SpawnOptions): Promise<ServerChild> {
  mkdirSync(OUT_DIR, { recursive: true });
  const port = await freePort();
  const logPath = join(OUT_DIR, `server-${opts.name}.log`);
  const proc = Bun.spawn([process.execPath, ...(opts.bunArgs ?? []), "run", opts.script ?? "server.ts"], {
    cwd: opts.cwd ?? ROOT,
    env: {
      ...withoutSpool(process.env),
      ...(opts.spoolDir ? { SPOOL_DIR: opts.spoolDir } : {}),
      ...opts.env,
      API_KEY: opts.apiKey,
      LMTP_HOST: opts.lmtpHost,
      LMTP_PORT: String(opts.lmtpPort),
      PORT: String(port),
      HOST: "127.0.0.1",
    },
    stdin: "ignore",
    stdout: Bun.file(logPath),
    stderr: Bun.file(`${logPath}.stderr`),
  });
  children.add(proc);
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`server.ts exited with code ${proc.exitCode} before /health answered (see ${logPath}.stderr)`);
    try {
      const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1_000) });
      if (r.ok) {
        await r.arrayBuffer();
        break;
      }
    } catch {}
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`server.ts did not answer ${url}/health within 15 s (see ${logPath}.stderr)`);
    }
    await Bun.sleep(50);
  }
  return {
    url,
    pid: proc.pid,
    logPath,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const done = await Promise.race([proc.exited.then(() => true), Bun.sleep(10_000).then(() => false)]);
        if (!done) proc.kill("SIGKILL");
        await proc.exited;
      }
      children.delete(proc);
    },
  };
}

/** Starts the sink (bench/sink.ts) in its own process; answers its URL once it listens. */
export async function spawnSink(): Promise<{ url: string; pid: number; stop(): Promise<void> }> {
  const proc = Bun.spawn([process.execPath, join(import.meta.dir, "sink.ts")], { stdin: "ignore", stdout: "pipe", stderr: "inherit" });
  children.add(proc);
  const reader = proc.stdout.getReader();
  let text = "";
  const deadline = Date.now() + 10_000;
  while (!text.includes("\n")) {
    const r = await Promise.race([reader.read(), Bun.sleep(Math.max(1, deadline - Date.now())).then(() => null)]);
    if (!r || r.done) {
      proc.kill("SIGKILL");
      throw new Error("the sink did not say its port");
    }
    text += new TextDecoder().decode(r.value);
  }
  reader.releaseLock();
  const port = Number(/port=(\d+)/.exec(text)?.[1]);
  return {
    url: `http://127.0.0.1:${port}`,
    pid: proc.pid,
    async stop() {
      proc.kill("SIGTERM");
      await proc.exited;
      children.delete(proc);
    },
  };
}
