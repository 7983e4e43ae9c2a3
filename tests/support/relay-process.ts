// The relay as operators run it: `bun run server.ts` as a child process with its environment,
// for tests that kill it (SIGKILL, SIGTERM) and start it again on the same spool.

import { join } from "node:path";
import type { Subprocess } from "bun";
import { freePort } from "../../scripts/free-port.ts";

const ROOT = join(import.meta.dir, "..", "..");

export interface RelayProcess {
  url: string;
  port: number;
  proc: Subprocess<"ignore", "pipe", "pipe">;
  /** Every JSON line the relay wrote to stdout so far (its log). */
  lines: Record<string, unknown>[];
  /** Everything it wrote to stderr so far. */
  stderr(): string;
  /** Sends a signal; resolves with the exit code (null when killed by the signal). */
  kill(signal?: NodeJS.Signals): Promise<number | null>;
  /** Resolves once a log line matches (rejects after `ms`). */
  waitForLine(pred: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
  /** GET /metrics, parsed into name -> value (labels kept in the name). */
  metrics(): Promise<Record<string, number>>;
  exited: Promise<number>;
}


const live = new Set<Subprocess>();
process.on("exit", () => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {}
  }
});

async function collectLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let buf = "";
  for await (const chunk of stream) {
    buf += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf("\n")) !== -1) {
      onLine(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
    }
  }
  if (buf) onLine(buf);
}

/**
 * Starts `bun run server.ts` with `env` (on top of PATH/HOME) and waits until GET /health
 * answers. PORT defaults to a free port and HOST to 127.0.0.1.
 */
export async function startRelay(env: Record<string, string>, opts: { readyMs?: number; args?: string[] } = {}): Promise<RelayProcess> {
  const port = env.PORT ? Number(env.PORT) : await freePort();
  const proc = Bun.spawn([process.execPath, "run", join(ROOT, "server.ts"), ...(opts.args ?? [])], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/root", HOST: "127.0.0.1", PORT: String(port), ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  live.add(proc);
  void proc.exited.then(() => live.delete(proc));

  const lines: Record<string, unknown>[] = [];
  const waiters = new Set<{ pred: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }>();
  void collectLines(proc.stdout, (text) => {
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text);
    } catch {
      line = { text };
    }
    lines.push(line);
    for (const w of waiters) {
      if (w.pred(line)) {
        waiters.delete(w);
        w.resolve(line);
      }
    }
  });
  let err = "";
  void collectLines(proc.stderr, (text) => void (err += text + "\n"));

  const url = `http://127.0.0.1:${port}`;
  const key = env.API_KEY ?? "";
  const relay: RelayProcess = {
    url,
    port,
    proc,
    lines,
    stderr: () => err,
    exited: proc.exited,
    async kill(signal = "SIGTERM") {
      proc.kill(signal);
      await proc.exited;
      return proc.signalCode ? null : proc.exitCode;
    },
    waitForLine(pred, ms = 30_000) {
      const found = lines.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        waiters.add(w);
        setTimeout(() => {
          if (waiters.delete(w)) reject(new Error(`no matching log line within ${ms} ms; last lines:\n${lines.slice(-5).map((l) => JSON.stringify(l)).join("\n")}`));
        }, ms).unref?.();
      });
    },
    async metrics() {
      const r = await fetch(url + "/metrics", { headers: { "X-API-Key": key } });
      if (r.status !== 200) throw new Error(`/metrics answered ${r.status}`);
      const out: Record<string, number> = {};
      for (const line of (await r.text()).split("\n")) {
        const m = /^([a-z_]+(?:\{[^}]*\})?) (\S+)$/.exec(line);
        if (m) out[m[1]!] = Number(m[2]);
      }
      return out;
    },
  };

  const deadline = Date.now() + (opts.readyMs ?? 15_000);
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      await Bun.sleep(50); // let stderr arrive
      throw new Error(`relay exited (${proc.exitCode ?? proc.signalCode}) before answering /health:\n${err}`);
    }
    const ok = await fetch(url + "/health", { signal: AbortSignal.timeout(1_000) })
      .then((r) => r.ok)
      .catch(() => false);
    if (ok) return relay;
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`relay did not answer /health within ${opts.readyMs ?? 15_000} ms:\n${err}`);
    }
    await Bun.sleep(50);
  }
}

/** Runs `bun run server.ts <args>` to completion (the queue CLI, a bad configuration). */
export async function runRelayCommand(env: Record<string, string>, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = Bun.spawn([process.execPath, "run", join(ROOT, "server.ts"), ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/root", ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, stdout, stderr };
}
