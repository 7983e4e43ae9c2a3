// The bench's outputs: a table for the terminal, a JSON file and an SVG chart under .bench/.
// With the fake LMTP every line of the table (and the chart's title, and the JSON) says so.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { LoadResult } from "./load.ts";
import type { MemoryResult } from "./memory.ts";
import type { Machine } from "./proc.ts";
import type { SpamRun } from "./spam.ts";
import type { WorkerCpuRow } from "./worker-cpu.ts";
import { BASELINE, type R2CostRow, type WorkerdCpuRow } from "./worker-workerd.ts";

export type PathName = "ceiling" | "relay-raw" | "relay-json" | "baseline-raw" | "baseline-json";

export interface ThroughputRun {
  order: number;
  label: string;
  path: PathName;
  concurrency: number;
  /** Messages counted in the mailbox after the run (must equal n). */
  stored: number;
  result: LoadResult;
}

export interface RatioRow {
  concurrency: number;
  ceilingRuns: number[];
  ceilingMean: number;
  relayRaw: number;
  relayJson: number;
  rawRatio: number;
  jsonRatio: number;
}

/** One body at one concurrency: this host and the baseline host, measured in the same run. */
export interface ComparisonRow {
  concurrency: number;
  body: "raw" | "json";
  perSecond: number;
  basePerSecond: number;
  hostCpuMs: number;
  baseHostCpuMs: number;
  p99Ms: number;
  baseP99Ms: number;
}

export interface Target {
  name: string;
  target: string;
  measured: string;
  met: boolean | null;
  note?: string;
}

export interface Results {
  startedAt: string;
  mode: "quick" | "full";
  lmtp: "dovecot" | "fake";
  machine: Machine;
  messageBytes: number;
  messagesPerRun: number;
  runs: ThroughputRun[];
  ratios: RatioRow[];
  /** BENCH_BASELINE: the host at another commit, run beside this one. */
  baseline?: { ref: string; sha: string; comparison: ComparisonRow[] };
  /** The host with RSPAMD_URL beside the same host without it (bench/spam.ts). */
  spamFilter?: SpamRun[];
  big: { ceilingMs: number | null; memory: MemoryResult | null };
  workerCpu: WorkerCpuRow[];
  /** The Worker in workerd: today's worker.ts, the edge spool's healthy and holding paths, the alternative, the floor. */
  workerdCpu: WorkerdCpuRow[];
  /** The edge spool's paths in workerd: R2 operations by class and Worker invocations. */
  r2Costs?: R2CostRow[];
  targets: Target[];
  failures: string[];
  notes: string[];
  /** Present when the numbers are not Dovecot's. */
  warning?: string;
}

export const FAKE_MARK = "[fake LMTP]";

const mib = (b: number) => `${(b / 1024 / 1024).toFixed(1)} MiB`;
const f = (x: number | null | undefined, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "-" : x.toFixed(d));
const pad = (s: string, n: number) => (s.length >= n ? s : s + " ".repeat(n - s.length));
const lpad = (s: string, n: number) => (s.length >= n ? s : " ".repeat(n - s.length) + s);

export const PATH_LABEL: Record<PathName, string> = {
  ceiling: "ceiling: lmtp.ts -> LMTP",
  "relay-raw": "relay: HTTP rfc822 -> host",
  "relay-json": "relay: HTTP JSON -> host",
  "baseline-raw": "baseline: HTTP rfc822 -> host",
  "baseline-json": "baseline: HTTP JSON -> host",
};

/** Prefixes a line with the fake marker when the bench runs against the fake LMTP. */
export function marker(lmtp: "dovecot" | "fake"): (line: string) => string {
  return lmtp === "fake" ? (line) => `${FAKE_MARK} ${line}` : (line) => line;
}

function table(rows: string[][], align: ("l" | "r")[]): string[] {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? "").length)));
  return rows.map((r) => r.map((cell, c) => (align[c] === "r" ? lpad(cell, widths[c]!) : pad(cell, widths[c]!))).join("  ").trimEnd());
}

export function renderTable(r: Results): string {
  const out: string[] = [];
  const m = r.machine;
  const backend = r.lmtp === "dovecot" ? `real Dovecot ${m.dovecot ?? "?"}` : "FAKE LMTP (smtp-server in the bench process), NOT Dovecot";
  out.push(`mail relay bench: ${r.mode} run, ${r.startedAt}, into ${backend}`);
  out.push(`machine: ${m.cores} cores, ${m.cpuModel}, ${(m.memoryBytes / 2 ** 30).toFixed(1)} GiB RAM, Linux ${m.kernel}, Bun ${m.bun}, Dovecot ${m.dovecot ?? "not installed"}`);
  out.push(`load: ${r.messagesPerRun} messages of ${r.messageBytes} bytes per run, closed loop; order per concurrency: ceiling, relay rfc822, ${r.baseline ? "baseline rfc822, baseline JSON, " : ""}relay JSON, ceiling`);
  out.push("host: server.ts in its own process with a spool (SPOOL_DIR), as the container runs it");
  out.push("");

  out.push("Throughput (10 KB messages)");
  const head = ["conc", "#", "path", "msgs", "stored", "msg/s", "p50 ms", "p99 ms", "max ms", "cpu ms/msg: bench", "host", "machine", "busy"];
  const rows = [head];
  for (const run of r.runs) {
    const x = run.result;
    rows.push([
      String(run.concurrency),
      String(run.order),
      `${PATH_LABEL[run.path]}${run.path === "ceiling" ? ` (${run.label})` : ""}`,
      String(x.n),
      String(run.stored),
      f(x.perSecond, 0),
      f(x.p50Ms, 2),
      f(x.p99Ms, 2),
      f(x.maxMs, 1),
      f(x.cpu.benchMsPerMessage, 3),
      f(x.cpu.serverMsPerMessage, 3),
      f(x.cpu.machineMsPerMessage, 3),
      `${f(x.cpu.machineBusy * 100, 0)}%`,
    ]);
  }
  out.push(...table(rows, ["r", "r", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"]));
  out.push("  (cpu: bench = this process, host = server.ts child, machine = all cores incl. Dovecot; busy = share of all cores)");
  out.push("");

  out.push("Relay / ceiling (ceiling = mean of its two runs)");
  const rr = [["conc", "ceiling msg/s (runs; mean)", "rfc822 msg/s", "rfc822/ceiling", "JSON msg/s", "JSON/ceiling"]];
  for (const x of r.ratios) {
    rr.push([
      String(x.concurrency),
      `${x.ceilingRuns.map((v) => f(v, 0)).join(", ")}; ${f(x.ceilingMean, 0)}`,
      f(x.relayRaw, 0),
      f(x.rawRatio, 3),
      f(x.relayJson, 0),
      f(x.jsonRatio, 3),
    ]);
  }
  out.push(...table(rr, ["r", "r", "r", "r", "r", "r"]));
  out.push("");

  if (r.baseline) {
    out.push(`This host / baseline host (${r.baseline.ref} = ${r.baseline.sha.slice(0, 12)}), same run`);
    const br = [["conc", "body", "msg/s now", "baseline", "now/baseline", "host cpu ms/msg now", "baseline", "p99 ms now", "baseline"]];
    for (const x of r.baseline.comparison) {
      br.push([String(x.concurrency), x.body === "raw" ? "rfc822" : "JSON", f(x.perSecond, 0), f(x.basePerSecond, 0), f(x.perSecond / x.basePerSecond, 3), f(x.hostCpuMs, 3), f(x.baseHostCpuMs, 3), f(x.p99Ms, 2), f(x.baseP99Ms, 2)]);
    }
    out.push(...table(br, ["r", "l", "r", "r", "r", "r", "r", "r", "r"]));
    out.push("");
  }

  if (r.spamFilter?.length) {
    out.push("Spam filter: relay rfc822 with RSPAMD_URL (a private rspamd) beside the same host without it, same run; per concurrency: without, with, with, without");
    const sr = [["conc", "RSPAMD_URL", "msg/s (runs)", "mean", "p50 ms (runs)", "p99 ms (runs)", "host cpu ms/msg", "machine cpu ms/msg"]];
    for (const c of [...new Set(r.spamFilter.map((x) => x.concurrency))]) {
      for (const on of [false, true]) {
        const xs = r.spamFilter.filter((x) => x.concurrency === c && x.rspamd === on).map((x) => x.result);
        const mean = (g: (x: LoadResult) => number) => xs.reduce((s, x) => s + g(x), 0) / Math.max(1, xs.length);
        const each = (g: (x: LoadResult) => number, d: number) => xs.map((x) => f(g(x), d)).join(", ");
        sr.push([String(c), on ? "set" : "unset", each((x) => x.perSecond, 0), f(mean((x) => x.perSecond), 0), each((x) => x.p50Ms, 2), each((x) => x.p99Ms, 2), f(mean((x) => x.cpu.serverMsPerMessage ?? NaN), 3), f(mean((x) => x.cpu.machineMsPerMessage ?? NaN), 3)]);
      }
    }
    out.push(...table(sr, ["r", "l", "r", "r", "r", "r", "r", "r"]));
    out.push("  (machine cpu includes rspamd's own; each message carries Email Routing's Received, so the host looks the sender's name up and rspamd checks its SPF)");
    out.push("");
  }

  const mem = r.big.memory;
  out.push("24 MiB message (streamed from a generator, Content-Length set)");
  if (r.big.ceilingMs !== null) out.push(`  ceiling, lmtp.ts direct:      ${f(r.big.ceilingMs, 0)} ms`);
  if (mem) {
    out.push(`  through the host (own process): ${f(mem.ms, 0)} ms, HTTP ${mem.status}${mem.failure ? ` FAILED: ${mem.failure}` : ""}`);
    out.push(
      `  host RSS: idle ${mib(mem.idleRss)} (VmHWM since start ${mib(mem.idleHwm)}), peak ${mib(mem.peakHwm ?? mem.peakSampled)} ` +
        `(${mem.source}${mem.peakHwm !== null ? `; 10 ms samples peak ${mib(mem.peakSampled)}` : ""}), after ${mib(mem.rssAfter)}`,
    );
    out.push(`  peak above idle: ${mib(mem.aboveIdle)} = ${f(mem.multiple, 2)}x the message`);
  } else out.push("  not measured");
  out.push("");

  out.push("Worker CPU per message (median of process.cpuUsage() around email(); sink in another process)");
  out.push("  caveat: Bun's JavaScriptCore, not workerd's V8; the absolute numbers are indicative only");
  const wr = [["size", "iters", "worker.ts email() ms", "runbook buffer-decode-JSON ms", "runbook/worker", "fetch floor ms: buffer", "stream", "wall ms: worker", "runbook"]];
  for (const w of r.workerCpu) {
    wr.push([w.label, String(w.iterations), f(w.streamedCpuMs, 3), f(w.runbookCpuMs, 3), `${f(w.ratio, 1)}x`, f(w.floorCpuMs, 3), f(w.streamFloorCpuMs, 3), f(w.streamedWallMs, 2), f(w.runbookWallMs, 2)]);
  }
  out.push(...table(wr, ["l", "r", "r", "r", "r", "r", "r", "r"]));
  out.push("  (fetch floor: one fetch() of the same bytes to the same sink, no handler, from one buffer and from a stream of 64 KiB chunks as email() gets them here: the cost of sending in this runtime)");
  out.push("");

  out.push(`Worker CPU per message in workerd (wrangler dev; the Worker runtime's process, every thread, /proc schedstat; mean over the run)`);
  const kr = [["size", "n", `today (${BASELINE}) ms`, "healthy ms", "healthy/today", "holding ms", "write-first ms", "floor ms", "wall ms: today", "healthy", "holding", "write-first"]];
  for (const w of r.workerdCpu) {
    const c = w.cpuMs;
    kr.push([w.label, String(w.messages), f(c.today, 2), f(c.healthy, 2), `${f(w.ratio, 2)}x`, f(c.holding, 2), f(c.writeFirst, 2), f(c.floor, 2), f(w.wallMs.today, 1), f(w.wallMs.healthy, 1), f(w.wallMs.holding, 1), f(w.wallMs.writeFirst, 1)]);
  }
  out.push(...table(kr, ["l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"]));
  out.push("  (healthy: the host takes every message; holding: it answers 503 and each message goes to the local R2, whose simulation runs in the same process;");
  out.push("   write-first: the alternative design, R2 first and delivered from there; floor: an email() that only reads the message, the local runtime's own share)");
  out.push("");

  if (r.r2Costs?.length) {
    out.push("The edge spool in workerd: R2 operations (A: put, list; B: get, head; delete is free) and Workers requests (invocations)");
    const cr = [["path", "per", "class A", "class B", "delete", "requests"]];
    for (const c of r.r2Costs) cr.push([c.path, c.per, f(c.A, 2), f(c.B, 2), f(c.free, 2), f(c.invocations, 2)]);
    out.push(...table(cr, ["l", "l", "r", "r", "r", "r"]));
    out.push("");
  }

  out.push("Targets (measured as is; never tuned to)");
  const tr = [["target", "wanted", "measured", "result"]];
  for (const t of r.targets) tr.push([t.name, t.target, t.measured, t.met === null ? "n/a" : t.met ? "met" : "NOT MET"]);
  out.push(...table(tr, ["l", "l", "r", "l"]));
  for (const t of r.targets) if (t.note) out.push(`  ${t.name}: ${t.note}`);
  out.push("");

  for (const n of r.notes) out.push(`note: ${n}`);
  if (r.failures.length) {
    out.push(`FAILURES (${r.failures.length}): the numbers above are not valid`);
    for (const x of r.failures.slice(0, 20)) out.push(`  ${x}`);
  } else out.push("all deliveries answered 200 \"success\" and every message was found in the mailbox");

  const mark = marker(r.lmtp);
  return out.map(mark).join("\n");
}

export function renderSvg(r: Results): string {
  const W = 820;
  const H = 420;
  const left = 70;
  const right = 20;
  const top = 72;
  const bottom = 70;
  const plotH = H - top - bottom;
  const plotW = W - left - right;
  const series: { key: "ceiling" | "raw" | "json"; label: string; color: string }[] = [
    { key: "ceiling", label: "ceiling: lmtp.ts direct (mean of 2)", color: "#4e79a7" },
    { key: "raw", label: "relay: HTTP message/rfc822", color: "#f28e2b" },
    { key: "json", label: "relay: HTTP JSON (runbook)", color: "#59a14f" },
  ];
  const value = (x: RatioRow, k: "ceiling" | "raw" | "json") => (k === "ceiling" ? x.ceilingMean : k === "raw" ? x.relayRaw : x.relayJson);
  const max = Math.max(1, ...r.ratios.flatMap((x) => [...x.ceilingRuns, x.relayRaw, x.relayJson]).filter((v) => Number.isFinite(v)));
  const step = niceStep(max / 5);
  const yMax = Math.ceil(max / step) * step;
  const y = (v: number) => top + plotH - (v / yMax) * plotH;
  const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const parts: string[] = [];
  const fake = r.lmtp === "fake" ? ` ${FAKE_MARK}` : "";
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  parts.push(`<rect width="${W}" height="${H}" fill="#fff"/>`);
  parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">${esc(`Messages/s into ${r.lmtp === "dovecot" ? "Dovecot" : "a FAKE LMTP"}, ${r.messageBytes} B messages${fake}`)}</text>`);
  parts.push(
    `<text x="${W / 2}" y="38" text-anchor="middle" fill="#555" font-size="11">${esc(`${r.machine.cores} cores ${r.machine.cpuModel}, ${(r.machine.memoryBytes / 2 ** 30).toFixed(0)} GiB, Bun ${r.machine.bun}, Dovecot ${r.machine.dovecot ?? "-"}`)}</text>`,
  );
  parts.push(`<text x="${W / 2}" y="52" text-anchor="middle" fill="#555" font-size="11">${esc(`${r.mode} run ${r.startedAt}, ${r.messagesPerRun} messages per run, closed loop${fake}`)}</text>`);
  for (let v = 0; v <= yMax + 1e-9; v += step) {
    parts.push(`<line x1="${left}" x2="${W - right}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}" stroke="#ddd"/>`);
    parts.push(`<text x="${left - 6}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end" fill="#333">${v}</text>`);
  }
  parts.push(`<text x="16" y="${top + plotH / 2}" transform="rotate(-90 16 ${top + plotH / 2})" text-anchor="middle">messages/s</text>`);
  const groups = r.ratios.length || 1;
  const groupW = plotW / groups;
  const barW = Math.min(70, (groupW * 0.75) / series.length);
  r.ratios.forEach((row, g) => {
    const gx = left + g * groupW + (groupW - barW * series.length) / 2;
    series.forEach((s, i) => {
      const v = value(row, s.key);
      if (!Number.isFinite(v)) return;
      const x = gx + i * barW;
      parts.push(`<rect x="${x.toFixed(1)}" y="${y(v).toFixed(1)}" width="${(barW - 6).toFixed(1)}" height="${(top + plotH - y(v)).toFixed(1)}" fill="${s.color}"/>`);
      const labelAt = s.key === "ceiling" ? Math.max(v, ...row.ceilingRuns) : v; // above the dashed ticks too
      parts.push(`<text x="${(x + (barW - 6) / 2).toFixed(1)}" y="${(y(labelAt) - 5).toFixed(1)}" text-anchor="middle">${Math.round(v)}</text>`);
      if (s.key === "ceiling") {
        // The two ceiling runs, as ticks: their spread is the drift of the machine during the run.
        for (const c of row.ceilingRuns) parts.push(`<line x1="${x.toFixed(1)}" x2="${(x + barW - 6).toFixed(1)}" y1="${y(c).toFixed(1)}" y2="${y(c).toFixed(1)}" stroke="#1b2a3a" stroke-width="2" stroke-dasharray="4 2"/>`);
      } else {
        const ratio = s.key === "raw" ? row.rawRatio : row.jsonRatio;
        parts.push(`<text x="${(x + (barW - 6) / 2).toFixed(1)}" y="${(top + plotH - 6).toFixed(1)}" text-anchor="middle" fill="#fff" font-size="11">${f(ratio, 2)}x</text>`);
      }
    });
    parts.push(`<text x="${(left + g * groupW + groupW / 2).toFixed(1)}" y="${top + plotH + 18}" text-anchor="middle" font-weight="bold">concurrency ${row.concurrency}</text>`);
  });
  parts.push(`<line x1="${left}" x2="${W - right}" y1="${top + plotH}" y2="${top + plotH}" stroke="#333"/>`);
  let lx = left;
  for (const s of series) {
    parts.push(`<rect x="${lx}" y="${H - 36}" width="12" height="12" fill="${s.color}"/>`);
    parts.push(`<text x="${lx + 16}" y="${H - 26}">${esc(s.label)}</text>`);
    lx += 16 + s.label.length * 6.4 + 18;
  }
  parts.push(`<text x="${W - right}" y="${H - 6}" text-anchor="end" fill="#777" font-size="10">dashed: the two ceiling runs; white: relay/ceiling</text>`);
  parts.push(`</svg>`);
  return parts.join("\n") + "\n";
}

function niceStep(raw: number): number {
  const p = 10 ** Math.floor(Math.log10(Math.max(raw, 1e-9)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

export function writeOutputs(dir: string, r: Results): { json: string; svg: string } {
  mkdirSync(dir, { recursive: true });
  const stamp = r.startedAt.replace(/[:.]/g, "-");
  const json = join(dir, `bench-${r.mode}-${stamp}.json`);
  const svg = join(dir, `bench-${r.mode}-${stamp}.svg`);
  const jsonText = JSON.stringify(r, null, 2) + "\n";
  const svgText = renderSvg(r);
  writeFileSync(json, jsonText);
  writeFileSync(svg, svgText);
  writeFileSync(join(dir, "latest.json"), jsonText);
  writeFileSync(join(dir, "latest.svg"), svgText);
  return { json, svg };
}
