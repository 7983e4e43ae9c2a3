// `bun run bench [--quick]`: how fast the relay delivers into Dovecot, against what lmtp.ts alone
// can do; the host's memory for a 24 MiB message; the Worker's CPU per message against the
// runbook's handler. Prints a table, writes .bench/*.json and .bench/*.svg.
//
//   bun run bench            2000 messages per throughput run (about 5-10 s each)
//   bun run bench --quick    (or BENCH_QUICK=1) a few hundred messages in all, for CI
//   BENCH_MESSAGES=N         messages per throughput run, overriding either
//   BENCH_LMTP=fake          the fake LMTP even where Dovecot is installed (every line then says so)
//   BENCH_BASELINE=<ref>     also run the host as it was at that commit, beside this one, so that
//                            before and after are measured in the same run (see baseline.ts)
//   BENCH_SPAM=0             leave out the spam filter's runs (RSPAMD_URL beside without it, spam.ts)
//
// It asserts no timing. It exits non-zero only when something failed: a delivery not answered
// 200 "success", a message missing from the mailbox, a process that would not start.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { startBackend, type Backend } from "./backend.ts";
import { checkoutBaseline, type Baseline } from "./baseline.ts";
import { closedLoop, type LoadResult, type Operation } from "./load.ts";
import { bigMessage, WARMUP_MESSAGES, type MemoryResult } from "./memory.ts";
import { streamOf } from "../tests/support/streams.ts";
import { RECIPIENT, SENDER, messageFactory, streamedMessage } from "./messages.ts";
import { ceilingOp, ceilingPool, jsonBodies, relayJsonOp, relayRawOp } from "./paths.ts";
import { dovecotVersion, machine, memStatus } from "./proc.ts";
import { marker, renderTable, writeOutputs, type ComparisonRow, type PathName, type RatioRow, type Results, type Target, type ThroughputRun } from "./report.ts";
import { OUT_DIR, spawnServer, type ServerChild } from "./server-child.ts";
import { spamFilterRuns, type SpamRun } from "./spam.ts";
import { workerCpu, type WorkerCpuRow } from "./worker-cpu.ts";
import { workerdCpu, workerdR2Costs, type R2CostRow, type WorkerdCpuRow } from "./worker-workerd.ts";

const quick = process.argv.includes("--quick") || process.env.BENCH_QUICK === "1";
const PER_RUN = Number(process.env.BENCH_MESSAGES) || (quick ? 40 : 2000);
const CONCURRENCY = [1, 8] as const;
/**
 * Messages sent before each measured run. The JIT keeps compiling a host's hot paths for its first
 * few hundred requests; with only a handful, whichever host runs first (this one, beside a
 * baseline) paid for that in the CPU columns: 0.54 against 0.50 ms per message cold, 0.44 against
 * 0.44 warm, for the same two hosts.
 */
const warmupFor = (concurrency: number) => (quick ? concurrency * 3 : Math.max(concurrency * 3, 300));
const MESSAGE_BYTES = 10 * 1024;
const BIG_BYTES = 24 * 1024 * 1024;
const CPU_ITERATIONS = quick ? [40, 8, 2] : [200, 30, 5];
/** Messages per variant in workerd, 10 KB and 1 MB. */
const WORKERD_MESSAGES = quick ? [20, 10] : [200, 100];
const API_KEY = `bench-${crypto.randomUUID().replace(/-/g, "")}${crypto.randomUUID().replace(/-/g, "")}`;

const startedAt = new Date().toISOString();
const failures: string[] = [];
const notes: string[] = [];

// BENCH_LMTP=fake runs against the fake LMTP even where Dovecot is installed (to see that mode).
const backend: Backend = await startBackend(process.env.BENCH_LMTP === "fake" ? "fake" : "auto");
const mark = marker(backend.kind);
// Straight to stderr: the Worker CPU phase silences console.* while it measures.
const progress = (line: string) => void process.stderr.write(mark(`.. ${line}`) + "\n");
progress(
  backend.kind === "dovecot"
    ? `Dovecot ${backend.version} on ${backend.host}:${backend.port}`
    : `${process.env.BENCH_LMTP === "fake" ? "BENCH_LMTP=fake" : "no dovecot binary"}: using the FAKE LMTP on ${backend.host}:${backend.port}; every number below is against it`,
);

const runs: ThroughputRun[] = [];
let memory: MemoryResult | null = null;
let bigCeilingMs: number | null = null;
let spamRuns: SpamRun[] = [];
let cpuRows: WorkerCpuRow[] = [];
let workerdRows: WorkerdCpuRow[] = [];
let r2Rows: R2CostRow[] = [];

/**
 * One run of `what`: clears the mailbox, warms the path up (connections, JIT), clears again, runs,
 * counts what was stored; what failed goes to `failures`. `op` gets a tag per message set: one
 * starting with "warm" for the warm-up (messagesFor builds as many as it needs), `run-...` for the run.
 */
async function measure(what: string, order: number, concurrency: number, op: (tag: string) => Promise<Operation> | Operation, serverPid?: number): Promise<{ result: LoadResult; stored: number }> {
  await backend.clear();
  const warm = await closedLoop(warmupFor(concurrency), concurrency, await op(`warm-${concurrency}-${order}`));
  for (const x of warm.failures.slice(0, 3)) failures.push(`warm-up of ${what} (concurrency ${concurrency}) message ${x.index}: ${x.detail}`);
  await backend.clear();
  const result: LoadResult = await closedLoop(PER_RUN, concurrency, await op(`run-${concurrency}-${order}`), { serverPid });
  const stored = await backend.count();
  for (const x of result.failures.slice(0, 5)) failures.push(`${what} (concurrency ${concurrency}) message ${x.index}: ${x.detail}`);
  if (result.failures.length > 5) failures.push(`${what} (concurrency ${concurrency}): ${result.failures.length - 5} more failed deliveries`);
  if (stored !== result.ok) failures.push(`${what} (concurrency ${concurrency}): ${result.ok} deliveries answered OK but ${stored} messages are in the mailbox`);
  // The JSON keeps the first few failures, not thousands of copies of the same one.
  return { result: { ...result, failures: result.failures.slice(0, 10) }, stored };
}

async function measured(order: number, label: string, path: PathName, concurrency: number, op: (tag: string) => Promise<Operation>, serverPid?: number) {
  const { result, stored } = await measure(path, order, concurrency, op, serverPid);
  runs.push({ order, label, path, concurrency, stored, result });
  progress(
    `c=${concurrency} #${order} ${path}${path === "ceiling" ? ` ${label}` : ""}: ${result.perSecond.toFixed(0)} msg/s, p50 ${result.p50Ms.toFixed(2)} ms, p99 ${result.p99Ms.toFixed(2)} ms, stored ${stored}/${PER_RUN}`,
  );
}

/** The messages of one run (or, for a tag starting with "warm", of its warm-up), built before the clock starts. */
function messagesFor(tag: string, concurrency: number): Uint8Array<ArrayBuffer>[] {
  const make = messageFactory(tag, MESSAGE_BYTES);
  return Array.from({ length: tag.startsWith("warm") ? warmupFor(concurrency) : PER_RUN }, (_, i) => make(i));
}

// The host runs as the container runs it: with a spool (and its SQLite record of deliveries).
mkdirSync(OUT_DIR, { recursive: true });
const spoolRoot = mkdtempSync(join(OUT_DIR, "spool-"));
const spoolDir = (name: string) => join(spoolRoot, name);

let server: ServerChild | null = null;
let before: ServerChild | null = null;
let baseline: Baseline | null = null;
try {
  // --- 1-4: throughput, ceiling / relay rfc822 / relay JSON / ceiling at each concurrency -----
  server = await spawnServer({ apiKey: API_KEY, lmtpHost: backend.host, lmtpPort: backend.port, name: "relay", spoolDir: spoolDir("relay") });
  progress(`host: server.ts child pid ${server.pid} at ${server.url} (access log: ${server.logPath})`);
  if (process.env.BENCH_BASELINE) {
    baseline = checkoutBaseline(process.env.BENCH_BASELINE);
    before = await spawnServer({ apiKey: API_KEY, lmtpHost: backend.host, lmtpPort: backend.port, name: "baseline", spoolDir: spoolDir("baseline"), cwd: baseline.dir });
    progress(`baseline host: ${baseline.ref} (${baseline.sha.slice(0, 12)}) pid ${before.pid} at ${before.url}`);
  }
  const srv = server;
  const old = before;
  for (const c of CONCURRENCY) {
    const pool = ceilingPool(backend.host, backend.port, c);
    try {
      const ceiling = async (tag: string) => ceilingOp(pool, messagesFor(tag, c));
      const raw = (host: ServerChild) => async (tag: string) => relayRawOp(host.url, API_KEY, messagesFor(tag, c));
      const json = (host: ServerChild) => async (tag: string) => relayJsonOp(host.url, API_KEY, jsonBodies(messagesFor(tag, c)));
      await measured(1, "A", "ceiling", c, ceiling);
      await measured(2, "", "relay-raw", c, raw(srv), srv.pid);
      // The baseline runs between the two runs of each body (A B B A), so drift hits both alike.
      if (old) await measured(3, "", "baseline-raw", c, raw(old), old.pid);
      if (old) await measured(4, "", "baseline-json", c, json(old), old.pid);
      await measured(5, "", "relay-json", c, json(srv), srv.pid);
      await measured(6, "B", "ceiling", c, ceiling);
    } finally {
      await pool.close();
    }
  }
  const rss = memStatus(srv.pid);
  notes.push(`host after the throughput runs: RSS ${(rss.rss / 1048576).toFixed(1)} MiB, VmHWM ${(rss.hwm / 1048576).toFixed(1)} MiB`);
  await srv.stop();
  server = null;
} catch (e) {
  failures.push(`throughput: ${(e as Error).stack ?? e}`);
} finally {
  await before?.stop();
}

// --- 4b: the spam filter: the host with RSPAMD_URL beside the same host without it -------------
if (process.env.BENCH_SPAM !== "0") {
  spamRuns = await spamFilterRuns({ backend, apiKey: API_KEY, perRun: PER_RUN, concurrency: CONCURRENCY, measure, messagesFor, spoolDir, progress, failures });
}

// --- 5: one 24 MiB message ------------------------------------------------------------------
try {
  await backend.clear();
  const pool = ceilingPool(backend.host, backend.port, 1);
  try {
    const t0 = performance.now();
    const replies = await pool.deliver({ from: SENDER, to: [RECIPIENT] }, streamOf(streamedMessage("big-ceiling", BIG_BYTES)), BIG_BYTES);
    bigCeilingMs = performance.now() - t0;
    if (replies.some((r) => r.code !== 250)) failures.push(`24 MiB ceiling: LMTP answered ${replies.map((r) => `${r.code} ${r.text}`).join("; ")}`);
  } finally {
    await pool.close();
  }
  progress(`24 MiB, lmtp.ts direct: ${bigCeilingMs.toFixed(0)} ms`);
  await backend.clear();
  // A fresh host: its idle level is not raised by the throughput runs.
  server = await spawnServer({ apiKey: API_KEY, lmtpHost: backend.host, lmtpPort: backend.port, name: "memory", spoolDir: spoolDir("memory") });
  memory = await bigMessage({ url: server.url, pid: server.pid, apiKey: API_KEY, bytes: BIG_BYTES });
  if (memory.failure) failures.push(`24 MiB through the host: ${memory.failure}`);
  const stored = await backend.count();
  if (stored !== WARMUP_MESSAGES + 1) failures.push(`24 MiB through the host: expected ${WARMUP_MESSAGES + 1} messages in the mailbox (warm-up included), found ${stored}`);
  progress(`24 MiB through the host: ${memory.ms.toFixed(0)} ms, peak ${(memory.aboveIdle / 1048576).toFixed(1)} MiB above idle (${memory.multiple.toFixed(2)}x)`);
  await server.stop();
  server = null;
  await backend.clear();
} catch (e) {
  failures.push(`24 MiB: ${(e as Error).stack ?? e}`);
} finally {
  await server?.stop();
  server = null;
  rmSync(spoolRoot, { recursive: true, force: true });
}

// --- 6: the Worker's CPU per message ---------------------------------------------------------
try {
  cpuRows = await workerCpu(CPU_ITERATIONS, progress);
  for (const row of cpuRows) for (const x of row.failures) failures.push(`worker CPU ${row.label}: ${x}`);
} catch (e) {
  failures.push(`worker CPU: ${(e as Error).stack ?? e}`);
}

// --- 7: the Worker's CPU per message in workerd, today's and the edge spool's paths -----------
try {
  workerdRows = await workerdCpu(WORKERD_MESSAGES, progress);
  for (const row of workerdRows) for (const x of row.failures) failures.push(`workerd CPU ${row.label}: ${x}`);
} catch (e) {
  failures.push(`workerd CPU: ${(e as Error).stack ?? e}`);
}

// --- 8: what each path of the edge spool costs in R2 operations and Workers requests, in workerd
try {
  r2Rows = await workerdR2Costs(progress, quick ? 40 : 200);
} catch (e) {
  failures.push(`workerd R2 costs: ${(e as Error).stack ?? e}`);
}

await backend.dispose().catch((e: Error) => failures.push(`stopping the LMTP server: ${e.message}`));

// --- 4, 7: ratios and targets ------------------------------------------------------------------
const ratios: RatioRow[] = CONCURRENCY.map((c) => {
  const at = (p: PathName) => runs.filter((r) => r.concurrency === c && r.path === p).map((r) => r.result.perSecond);
  const ceilingRuns = at("ceiling");
  const ceilingMean = ceilingRuns.length ? ceilingRuns.reduce((s, x) => s + x, 0) / ceilingRuns.length : NaN;
  const relayRaw = at("relay-raw")[0] ?? NaN;
  const relayJson = at("relay-json")[0] ?? NaN;
  return { concurrency: c, ceilingRuns, ceilingMean, relayRaw, relayJson, rawRatio: relayRaw / ceilingMean, jsonRatio: relayJson / ceilingMean };
}).filter((r) => r.ceilingRuns.length > 0);

/** This host against the baseline host, per body and concurrency (BENCH_BASELINE only). */
const comparison: ComparisonRow[] = baseline
  ? CONCURRENCY.flatMap((c) =>
      (["raw", "json"] as const).map((body) => {
        const run = (p: PathName) => runs.find((r) => r.concurrency === c && r.path === p)?.result;
        const now = run(body === "raw" ? "relay-raw" : "relay-json");
        const was = run(body === "raw" ? "baseline-raw" : "baseline-json");
        return {
          concurrency: c,
          body,
          perSecond: now?.perSecond ?? NaN,
          basePerSecond: was?.perSecond ?? NaN,
          hostCpuMs: now?.cpu.serverMsPerMessage ?? NaN,
          baseHostCpuMs: was?.cpu.serverMsPerMessage ?? NaN,
          p99Ms: now?.p99Ms ?? NaN,
          baseP99Ms: was?.p99Ms ?? NaN,
        };
      }),
    )
  : [];

const targets: Target[] = [];
const ratioTarget = (c: number, want: number, which: "rawRatio" | "jsonRatio", what: string, note?: string) => {
  const row = ratios.find((r) => r.concurrency === c);
  const v = row ? row[which] : NaN;
  targets.push({ name: `${what} / ceiling, concurrency ${c}`, target: `>= ${want.toFixed(2)}`, measured: Number.isFinite(v) ? v.toFixed(3) : "-", met: Number.isFinite(v) ? v >= want : null, note });
};
ratioTarget(8, 0.9, "rawRatio", "relay rfc822");
ratioTarget(1, 0.85, "rawRatio", "relay rfc822");
ratioTarget(8, 0.9, "jsonRatio", "relay JSON");
ratioTarget(1, 0.85, "jsonRatio", "relay JSON");
targets.push(
  memory
    ? {
        name: "24 MiB: host peak RSS above idle",
        target: "< 2.00x message",
        measured: `${memory.multiple.toFixed(2)}x (${(memory.aboveIdle / 1048576).toFixed(1)} MiB)`,
        met: memory.multiple < 2,
      }
    : { name: "24 MiB: host peak RSS above idle", target: "< 2.00x message", measured: "-", met: null },
);
const cpu25 = cpuRows.find((r) => r.label === "25 MB");
const cpu1 = cpuRows.find((r) => r.label === "1 MB");
targets.push({
  name: "Worker CPU at 25 MB: runbook / worker.ts",
  target: ">= 10x",
  measured: cpu25 ? `${cpu25.ratio.toFixed(1)}x` : "-",
  met: cpu25 ? cpu25.ratio >= 10 : null,
});
targets.push({
  name: "Worker CPU at 1 MB: worker.ts",
  target: "< 2 ms",
  measured: cpu1 ? `${cpu1.streamedCpuMs.toFixed(2)} ms` : "-",
  met: cpu1 ? cpu1.streamedCpuMs < 2 : null,
});

for (const row of workerdRows) {
  targets.push({
    name: `Worker CPU in workerd at ${row.label}: healthy path / today's worker.ts`,
    target: "<= 1.20x",
    measured: Number.isFinite(row.ratio) ? `${row.ratio.toFixed(2)}x (${row.cpuMs.healthy.toFixed(2)} / ${row.cpuMs.today.toFixed(2)} ms)` : "-",
    met: Number.isFinite(row.ratio) ? row.ratio <= 1.2 : null,
  });
}

notes.push(
  `one ${machine(null, backend.kind).cores}-core machine runs everything: the bench's HTTP client, the host and ${backend.kind === "dovecot" ? "Dovecot's lmtp processes (which fsync each message)" : "the fake LMTP"} share the cores, so relay runs pay for the client too`,
);
notes.push("worker CPU: console output of both handlers is silenced while measured; both read the sink's answer");

const results: Results = {
  startedAt,
  mode: quick ? "quick" : "full",
  lmtp: backend.kind,
  machine: machine(dovecotVersion(), backend.kind),
  messageBytes: MESSAGE_BYTES,
  messagesPerRun: PER_RUN,
  runs,
  ratios,
  ...(baseline ? { baseline: { ref: baseline.ref, sha: baseline.sha, comparison } } : {}),
  spamFilter: spamRuns,
  big: { ceilingMs: bigCeilingMs, memory },
  workerCpu: cpuRows,
  workerdCpu: workerdRows,
  r2Costs: r2Rows,
  targets,
  failures,
  notes,
  ...(backend.kind === "fake" ? { warning: "measured against the FAKE LMTP (smtp-server in the bench process), not Dovecot" } : {}),
};

const files = writeOutputs(OUT_DIR, results);
console.log(renderTable(results));
console.log(mark(`wrote ${files.json} and ${files.svg} (also .bench/latest.json, latest.svg)`));
process.exit(failures.length ? 1 : 0);
