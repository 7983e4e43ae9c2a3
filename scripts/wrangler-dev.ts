// Runs the Worker in local workerd through `wrangler dev`, for `bun run dev` and the tests.
// wrangler dev exposes POST /cdn-cgi/handler/email?from=..&to=.. which calls email() with the
// request body as the raw message (it needs a Message-ID header).

import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface WranglerDev {
  url: string;
  /** Everything wrangler and the Worker printed so far. */
  output(): string;
  stop(): Promise<void>;
}

const root = join(import.meta.dir, "..");

export async function startWranglerDev(opts: { port: number; vars: Record<string, string>; readyTimeoutMs?: number }): Promise<WranglerDev> {
  // Secrets go through an env file, never the command line (visible in ps).
  const dir = mkdtempSync(join(tmpdir(), "relay-wrangler-"));
  const envFile = join(dir, "worker.env");
  writeFileSync(envFile, Object.entries(opts.vars).map(([k, v]) => `${k}=${v}`).join("\n") + "\n", { mode: 0o600 });

  const proc = Bun.spawn(
    [process.execPath, "x", "wrangler", "dev", "--port", String(opts.port), "--ip", "127.0.0.1", "--env-file", envFile, "--persist-to", join(dir, "state"), "--show-interactive-dev-session=false"],
    {
      cwd: root,
      env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1", FORCE_COLOR: "0" },
      stdout: "pipe",
      stderr: "pipe",
    },
  );
  let out = "";
  const collect = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const chunk of s) out += dec.decode(chunk, { stream: true });
  };
  void collect(proc.stdout);
  void collect(proc.stderr);

  const url = `http://127.0.0.1:${opts.port}`;
  const stop = async () => {
    proc.kill("SIGTERM");
    const killer = setTimeout(() => proc.kill("SIGKILL"), 5_000);
    await proc.exited;
    clearTimeout(killer);
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 60_000);
  while (!/Ready on http/.test(out)) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`wrangler dev did not start (workerd from the wrangler package):\n${out.slice(-3000)}`);
    }
    await Bun.sleep(100);
  }
  return { url, output: () => out, stop };
}
