// A diagnostic, not part of `bun run bench`: how fast three ways of starting the drain's next run
// in a fresh invocation hand over, in local workerd (wrangler dev). Each prototype chains 40 runs;
// each run makes 45 R2 calls (a run's worth of subrequests) and starts the next:
//   binding   a service binding of the Worker to itself: fetch() answers 202, works in waitUntil
//   alarm     a Durable Object (SQLite-backed, the free plan's kind) that sets its alarm to now
//   queue     a Queue whose consumer (batch of 1, no batch wait) sends the next message
// `bun bench/drain-chain-mechanisms.ts` prints the time from the first run's start to the last
// one's, per mechanism. What local workerd cannot show (limits, billing, production latency) is
// in docs/edge-spool.md with what Cloudflare documents.

import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freePort } from "../scripts/free-port.ts";
import { OUT_DIR, ROOT } from "./server-child.ts";

const RUNS = 40;
const CALLS = 45;

const work = `async function work(env) { for (let i = 0; i < ${CALLS}; i++) await env.B.head("x" + i); }`;
const r2 = `[[r2_buckets]]\nbinding = "B"\nbucket_name = "chain-bench"\n`;

const prototypes: Record<string, { toml: string; worker: string; start: string }> = {
  binding: {
    toml: `name = "chain-binding"\nmain = "w.js"\ncompatibility_date = "2026-04-01"\nservices = [{ binding = "SELF", service = "chain-binding" }]\n${r2}`,
    worker: `${work}
export default {
  async fetch(req, env, ctx) {
    const n = Number(new URL(req.url).searchParams.get("n"));
    ctx.waitUntil((async () => {
      await work(env);
      console.log(JSON.stringify({ run: n, at: Date.now() }));
      if (n < ${RUNS}) await (await env.SELF.fetch("https://self/?n=" + (n + 1))).text();
    })());
    return new Response(null, { status: 202 });
  },
};`,
    start: "/?n=1",
  },
  alarm: {
    toml: `name = "chain-alarm"\nmain = "w.js"\ncompatibility_date = "2026-04-01"\n[[durable_objects.bindings]]\nname = "D"\nclass_name = "Drainer"\n[[migrations]]\ntag = "v1"\nnew_sqlite_classes = ["Drainer"]\n${r2}`,
    worker: `import { DurableObject } from "cloudflare:workers";
${work}
export class Drainer extends DurableObject {
  async start() { await this.ctx.storage.put("n", 1); await this.ctx.storage.setAlarm(Date.now()); }
  async alarm() {
    const n = await this.ctx.storage.get("n");
    await work(this.env);
    console.log(JSON.stringify({ run: n, at: Date.now() }));
    if (n < ${RUNS}) { await this.ctx.storage.put("n", n + 1); await this.ctx.storage.setAlarm(Date.now()); }
  }
}
export default { async fetch(req, env) { await env.D.get(env.D.idFromName("drain")).start(); return new Response("ok"); } };`,
    start: "/",
  },
  queue: {
    toml: `name = "chain-queue"\nmain = "w.js"\ncompatibility_date = "2026-04-01"\n[[queues.producers]]\nbinding = "Q"\nqueue = "chain-bench"\n[[queues.consumers]]\nqueue = "chain-bench"\nmax_batch_size = 1\nmax_batch_timeout = 0\n${r2}`,
    worker: `${work}
export default {
  async fetch(req, env) { await env.Q.send({ n: 1 }); return new Response("ok"); },
  async queue(batch, env) {
    for (const m of batch.messages) {
      await work(env);
      console.log(JSON.stringify({ run: m.body.n, at: Date.now() }));
      if (m.body.n < ${RUNS}) await env.Q.send({ n: m.body.n + 1 });
      m.ack();
    }
  },
};`,
    start: "/",
  },
};

async function measure(name: string): Promise<number> {
  const p = prototypes[name]!;
  const dir = mkdtempSync(join(OUT_DIR, `chain-${name}-`));
  writeFileSync(join(dir, "wrangler.toml"), p.toml);
  writeFileSync(join(dir, "w.js"), p.worker);
  const port = await freePort();
  const proc = Bun.spawn(
    [process.execPath, "x", "wrangler", "dev", "-c", join(dir, "wrangler.toml"), "--port", String(port), "--ip", "127.0.0.1", "--inspector-port", String(await freePort()), "--persist-to", join(dir, "state"), "--show-interactive-dev-session=false"],
    { cwd: ROOT, env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1" }, stdout: "pipe", stderr: "pipe", detached: true },
  );
  let out = "";
  void (async () => {
    for await (const c of proc.stdout) out += new TextDecoder().decode(c);
  })();
  try {
    for (let i = 0; i < 600 && !out.includes("Ready on"); i++) await Bun.sleep(100);
    if (!out.includes("Ready on")) throw new Error(`${name}: wrangler dev did not start`);
    await (await fetch(`http://127.0.0.1:${port}${p.start}`)).text();
    const runs = () => out.split("\n").filter((l) => l.startsWith('{"run"')).map((l) => JSON.parse(l) as { run: number; at: number });
    for (let i = 0; i < 600 && runs().length < RUNS; i++) await Bun.sleep(50);
    const r = runs();
    if (r.length < RUNS) throw new Error(`${name}: ${r.length} of ${RUNS} runs`);
    return (r[r.length - 1]!.at - r[0]!.at) / (RUNS - 1);
  } finally {
    process.kill(-proc.pid, "SIGKILL");
    await proc.exited;
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  for (const name of Object.keys(prototypes)) console.log(`${name}: ${(await measure(name)).toFixed(1)} ms from one run to the next (${CALLS} R2 calls each, ${RUNS} runs, local workerd)`);
}
