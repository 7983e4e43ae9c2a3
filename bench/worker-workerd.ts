// The Worker's CPU per message IN WORKERD (wrangler dev, the real runtime), for:
//   today      worker.ts as it was before the edge spool (BASELINE, checked out at bench time)
//   healthy    worker.ts with the EDGE_SPOOL bucket, the host taking every message
//   holding    worker.ts with the bucket, the host answering 503: each message goes to R2
//   writeFirst the alternative design (bench/write-first-worker.ts): R2 first, delivered from there
//   floor      an email() that only reads the message (bench/workerd-floor.ts)
// Each runs in its own wrangler dev; messages go through POST /cdn-cgi/handler/email, one at a
// time, interleaved in rounds so that drift on a shared machine hits all alike. CPU is the
// Worker runtime's workerd process (not wrangler's proxy in front of it), every thread, from
// /proc/PID/task/*/schedstat (nanoseconds): everything that process does for a message, so the
// local handler's own parsing of the message (see floor) and, on the holding path, the local R2
// simulation (SQLite and a file) are in it. performance.now() inside workerd does not advance
// during CPU work, so it cannot measure this.

import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startWranglerDev, type WranglerDev } from "../scripts/wrangler-dev.ts";
import { RECIPIENT, SENDER, messageFactory } from "./messages.ts";
import { OUT_DIR, ROOT } from "./server-child.ts";

/** The last commit before the edge spool: "today's worker.ts" for the comparison. */
export const BASELINE = "358c4e4";

export type WorkerdVariant = "today" | "healthy" | "holding" | "writeFirst" | "floor";
export const VARIANTS: WorkerdVariant[] = ["today", "healthy", "holding", "writeFirst", "floor"];

export interface WorkerdCpuRow {
  label: string;
  bytes: number;
  messages: number;
  /** Mean CPU ms per message of the Worker's workerd, per variant. */
  cpuMs: Record<WorkerdVariant, number>;
  /** Median wall ms per message at the client (POST /cdn-cgi/handler/email), per variant. */
  wallMs: Record<WorkerdVariant, number>;
  /** healthy / today. */
  ratio: number;
  failures: string[];
}

// Under wrangler's local limit of 1 MiB for /cdn-cgi/handler/email (production takes 25 MiB).
export const WORKERD_SIZES = [
  { label: "10 KB", bytes: 10 * 1024 },
  { label: "1 MB", bytes: 1_000_000 },
] as const;

/**
 * On-CPU time of every thread of a process, in ns. Throws when the process is gone: wrangler
 * restarts workerd when a watched file changes, and a new process would count from zero.
 */
function processCpuNs(pid: number): number {
  let total = 0;
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      total += Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").split(" ")[0]);
    } catch {} // a thread that just ended
  }
  return total;
}

/** The workerd that runs the Worker: in wrangler's process group, not the proxy on the public port. */
function runtimePid(w: WranglerDev): number {
  const found: number[] = [];
  for (const p of readdirSync("/proc").filter((x) => /^\d+$/.test(x))) {
    try {
      if (readFileSync(`/proc/${p}/comm`, "utf8").trim() !== "workerd") continue;
      const stat = readFileSync(`/proc/${p}/stat`, "utf8");
      const pgrp = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
      const cmd = readFileSync(`/proc/${p}/cmdline`, "utf8");
      if (pgrp === w.pid && !cmd.includes(`entry=127.0.0.1:${w.port}`)) found.push(Number(p));
    } catch {}
  }
  if (found.length !== 1) throw new Error(`expected one workerd running the Worker in wrangler's process group ${w.pid}, found ${found.length}`);
  return found[0]!;
}

/** worker.ts and what it imports, as of BASELINE, into .bench/ (inside the repo: node_modules resolve). */
function checkoutBaseline(): string {
  const dir = join(OUT_DIR, `baseline-${BASELINE}`);
  if (existsSync(join(dir, "worker.ts"))) return dir;
  mkdirSync(dir, { recursive: true });
  const files = ["worker.ts", "app.ts", "config.ts", "contract.ts", "body-limit.ts", "middleware/api-key.ts", "middleware/access-log.ts"];
  mkdirSync(join(dir, "middleware"), { recursive: true });
  for (const f of files) {
    const text = execFileSync("git", ["show", `${BASELINE}:${f}`], { cwd: ROOT, encoding: "utf8", maxBuffer: 8 * 1024 * 1024 });
    writeFileSync(join(dir, f), text);
  }
  return dir;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2) : NaN;
};

export async function workerdCpu(counts: readonly number[], progress: (line: string) => void): Promise<WorkerdCpuRow[]> {
  const key = `bench-workerd-${crypto.randomUUID().replace(/-/g, "")}`;
  // Two hosts: one confirms every message as the real host would, one cannot take any (a 503).
  const confirm = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      await req.arrayBuffer();
      return Response.json({ status: "success", message: "Email delivered to LMTP", recipients: [{ address: RECIPIENT, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Saved" }] });
    },
  });
  const down = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      await req.arrayBuffer();
      return Response.json({ status: "deferred", error: "lmtp_unavailable", message: "temporary failure" }, { status: 503 });
    },
  });
  const endpoint = (s: { port: number | undefined }) => `http://127.0.0.1:${s.port}/api/v1/inbound-mail`;
  const vars = (host: typeof confirm) => ({ API_KEY: key, DELL_API_ENDPOINT: endpoint(host), POSTMASTER: RECIPIENT, ALLOWED_RECIPIENTS: RECIPIENT });
  const state = mkdtempSync(join(OUT_DIR, "workerd-"));
  const workers = {} as Record<WorkerdVariant, WranglerDev>;
  try {
    const baseline = checkoutBaseline();
    const started = await Promise.all([
      startWranglerDev({ vars: vars(confirm), edgeSpool: false, main: join(baseline, "worker.ts"), readyTimeoutMs: 120_000 }),
      startWranglerDev({ vars: vars(confirm), persistTo: join(state, "healthy"), readyTimeoutMs: 120_000 }),
      startWranglerDev({ vars: vars(down), persistTo: join(state, "holding"), readyTimeoutMs: 120_000 }),
      startWranglerDev({ vars: vars(confirm), persistTo: join(state, "write-first"), main: join(ROOT, "bench", "write-first-worker.ts"), readyTimeoutMs: 120_000 }),
      startWranglerDev({ vars: vars(confirm), edgeSpool: false, main: join(ROOT, "bench", "workerd-floor.ts"), readyTimeoutMs: 120_000 }),
    ]);
    VARIANTS.forEach((v, i) => (workers[v] = started[i]!));
    const pids = Object.fromEntries(VARIANTS.map((v) => [v, runtimePid(workers[v])])) as Record<WorkerdVariant, number>;

    const rows: WorkerdCpuRow[] = [];
    let sentToHolding = 0;
    for (const [k, size] of WORKERD_SIZES.entries()) {
      const n = counts[k] ?? 10;
      const make = messageFactory(`workerd-${k}`, size.bytes);
      const failures: string[] = [];
      const cpuNs = Object.fromEntries(VARIANTS.map((v) => [v, 0])) as Record<WorkerdVariant, number>;
      const walls = Object.fromEntries(VARIANTS.map((v) => [v, [] as number[]])) as Record<WorkerdVariant, number[]>;
      let index = 0;
      /** `count` messages to one variant; its CPU from before the first to after the last one's trailing work. */
      const batch = async (v: WorkerdVariant, count: number, counted: boolean) => {
        const before = processCpuNs(pids[v]);
        for (let i = 0; i < count; i++) {
          const raw = make(index++);
          if (v === "holding") sentToHolding++;
          const t0 = performance.now();
          const res = await fetch(`${workers[v].url}/cdn-cgi/handler/email?${new URLSearchParams({ from: SENDER, to: RECIPIENT })}`, { method: "POST", body: raw });
          const text = await res.text();
          if (counted) walls[v].push(performance.now() - t0);
          if (res.status !== 200) failures.push(`${v}: HTTP ${res.status} ${text.slice(0, 200)}`);
        }
        // What the Worker does after answering (ctx.waitUntil) belongs to these messages too.
        await Bun.sleep(50);
        if (counted) cpuNs[v] += processCpuNs(pids[v]) - before;
      };
      // Warm-up: JIT, connections, the first learned recipient.
      for (const v of VARIANTS) await batch(v, 3, false);
      const rounds = Math.max(1, Math.ceil(n / 10));
      const perRound = Math.ceil(n / rounds);
      for (let r = 0; r < rounds; r++) for (const v of VARIANTS) await batch(v, perRound, true);
      const total = rounds * perRound;
      const cpuMs = Object.fromEntries(VARIANTS.map((v) => [v, cpuNs[v] / 1e6 / total])) as Record<WorkerdVariant, number>;
      const wallMs = Object.fromEntries(VARIANTS.map((v) => [v, median(walls[v])])) as Record<WorkerdVariant, number>;
      const row: WorkerdCpuRow = { label: size.label, bytes: size.bytes, messages: total, cpuMs, wallMs, ratio: cpuMs.healthy / cpuMs.today, failures: failures.slice(0, 5) };
      rows.push(row);
      progress(
        `workerd CPU ${size.label} (${total} each): today ${cpuMs.today.toFixed(2)} ms, healthy ${cpuMs.healthy.toFixed(2)} ms (${row.ratio.toFixed(2)}x), holding ${cpuMs.holding.toFixed(2)} ms, write-first ${cpuMs.writeFirst.toFixed(2)} ms, floor ${cpuMs.floor.toFixed(2)} ms`,
      );
    }
    // The holding path really held every message it was sent, and the healthy one none.
    const heldBy = async (v: WorkerdVariant) => ((await (await fetch(`${workers[v].url}/edge/queue`, { headers: { "X-API-Key": key } })).json()) as { held: number }).held;
    const [held, healthyHeld] = [await heldBy("holding"), await heldBy("healthy")];
    if (held !== sentToHolding) rows[0]!.failures.push(`holding: ${held} messages held in R2, ${sentToHolding} sent`);
    if (healthyHeld !== 0) rows[0]!.failures.push(`healthy: ${healthyHeld} messages held in R2, none expected`);
    return rows;
  } finally {
    await Promise.all(Object.values(workers).map((w) => w.stop()));
    await confirm.stop(true);
    await down.stop(true);
    rmSync(state, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// What each path of the edge spool costs in R2 operations and Workers requests, in workerd

/** One path's R2 operations (class A: put, list; B: get, head; delete is free) and Worker invocations, per `per`. */
export interface R2CostRow {
  path: string;
  per: string;
  A: number;
  B: number;
  free: number;
  invocations: number;
}

/**
 * worker.ts in wrangler dev behind bench/r2-counting-worker.ts (the same code, its bucket
 * counted), in front of a stub host that confirms, answers 503 (down), defers one mailbox (its
 * LMTP server's 450: full) and refuses another (422). Each path is run and divided by its count.
 */
export async function workerdR2Costs(progress: (line: string) => void, backlog = 200): Promise<R2CostRow[]> {
  const key = `bench-r2-${crypto.randomUUID().replace(/-/g, "")}`;
  const FULL = "full@kuma8088.com";
  const GONE = "gone@kuma8088.com";
  let down = false;
  let received = 0;
  const host = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      await req.arrayBuffer();
      const to = req.headers.get("x-envelope-to") ?? "";
      if (down) return Response.json({ status: "deferred", error: "lmtp_unavailable", message: "temporary failure" }, { status: 503 });
      received++;
      if (to === FULL) return Response.json({ status: "deferred", message: "temporary failure", recipients: [{ address: to, code: 450, enhanced: "4.2.2", reply: "450 4.2.2 Mailbox full" }] }, { status: 503 });
      if (to === GONE) return Response.json({ status: "rejected", error: "lmtp_rejected", message: "550 5.1.1 User unknown", recipients: [{ address: to, code: 550, enhanced: "5.1.1", reply: "550 5.1.1 User unknown" }] }, { status: 422 });
      return Response.json({ status: "success", message: "Email delivered to LMTP", recipients: [{ address: to, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Saved" }] });
    },
  });
  const state = mkdtempSync(join(OUT_DIR, "workerd-r2-"));
  let w: WranglerDev | null = null;
  try {
    w = await startWranglerDev({
      vars: { API_KEY: key, DELL_API_ENDPOINT: `http://127.0.0.1:${host.port}/api/v1/inbound-mail`, POSTMASTER: RECIPIENT },
      persistTo: state,
      main: join(ROOT, "bench", "r2-counting-worker.ts"),
      readyTimeoutMs: 120_000,
    });
    const url = w.url;
    const make = messageFactory("workerd-r2", 2 * 1024);
    let index = 0;
    const send = async (to: string) => {
      const res = await fetch(`${url}/cdn-cgi/handler/email?${new URLSearchParams({ from: SENDER, to })}`, { method: "POST", body: make(index++) });
      await res.text();
      if (res.status !== 200) throw new Error(`email() to ${to}: HTTP ${res.status}`);
    };
    const cron = async () => void (await (await fetch(`${url}/cdn-cgi/handler/scheduled`)).text());
    const counts = async (reset: boolean) => (await (await fetch(`${url}/bench/r2`, { method: reset ? "POST" : "GET" })).json()) as Omit<R2CostRow, "path" | "per">;
    const settle = () => Bun.sleep(300); // what email() does after answering (waitUntil)
    const rows: R2CostRow[] = [];
    const measure = async (path: string, per: string, n: number, run: () => Promise<void>) => {
      await settle(); // the previous step's work after its answer is not this one's
      await counts(true);
      await run();
      await settle();
      const c = await counts(true);
      const row = { path, per, A: c.A / n, B: c.B / n, free: c.free / n, invocations: c.invocations / n };
      rows.push(row);
      progress(`workerd R2: ${path}: A ${row.A.toFixed(2)}, B ${row.B.toFixed(2)}, delete ${row.free.toFixed(2)}, requests ${row.invocations.toFixed(2)} per ${per}`);
    };
    const learn = await fetch(`${url}/edge/known`, { method: "POST", headers: { "x-api-key": key, "content-type": "application/json" }, body: JSON.stringify({ addresses: [RECIPIENT, FULL, GONE] }) });
    if (!learn.ok) throw new Error(`POST /edge/known: HTTP ${learn.status}`);
    await send(RECIPIENT); // the isolate warm: its caches as in production after the first message

    await measure("healthy, nothing held", "message", 50, async () => {
      for (let i = 0; i < 50; i++) await send(RECIPIENT);
    });
    await measure("cron, nothing held", "run", 5, async () => {
      for (let i = 0; i < 5; i++) await cron();
    });
    down = true;
    await measure("holding (the host answers 503)", "message", 50, async () => {
      for (let i = 0; i < 50; i++) await send(RECIPIENT);
    });
    await measure("cron, host down, mail held (the probe)", "run", 5, async () => {
      for (let i = 0; i < 5; i++) await cron();
    });
    for (let i = 50; i < backlog; i++) await send(RECIPIENT);
    down = false;
    received = 0;
    await measure(`draining a backlog of ${backlog} (one cron run, chained)`, "backlog", 1, async () => {
      await cron();
      const deadline = Date.now() + 120_000;
      while (received < backlog && Date.now() < deadline) await Bun.sleep(100);
      if (received < backlog) throw new Error(`the backlog: ${received} of ${backlog} reached the host`);
      await Bun.sleep(500); // the last run's end
    });
    await send(FULL); // held: the host defers it
    await send(RECIPIENT); // its drain offers it once more: deferred, 5 minutes
    await measure("healthy, while one message the host defers is held", "message", 50, async () => {
      for (let i = 0; i < 50; i++) await send(RECIPIENT);
    });
    down = true;
    await send(GONE);
    down = false;
    await measure("a cron run giving up on one (refused: failed/, the notice queued)", "run", 1, cron);
    await measure("GET /edge/queue", "call", 5, async () => {
      for (let i = 0; i < 5; i++) await (await fetch(`${url}/edge/queue`, { headers: { "x-api-key": key } })).text();
    });
    return rows;
  } finally {
    await w?.stop();
    await host.stop(true);
    rmSync(state, { recursive: true, force: true });
  }
}

if (import.meta.main && process.argv[2] === "r2") {
  mkdirSync(OUT_DIR, { recursive: true });
  const rows = await workerdR2Costs(console.log, Number(process.argv[3] ?? 200));
  console.log(JSON.stringify(rows, null, 2));
}
