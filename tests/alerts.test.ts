// examples/prometheus (alert rules, their unit tests, the scrape config) checked by Prometheus' own
// promtool (Debian's `prometheus`), and examples/grafana's dashboard: every metric either one
// queries is one the host's /metrics or the edge's /edge/metrics really writes.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { workerConfig } from "../edge/config.ts";
import { edgeQueueApp } from "../edge/queue-http.ts";
import { Metrics } from "../host/metrics.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const ROOT = join(import.meta.dir, "..");
const PROM = join(ROOT, "examples", "prometheus");
const KEY = "alerts-test-key-0123456789abcdefghijklmnop";

function promtool(args: string[], cwd = PROM): { code: number; out: string } {
  const bin = Bun.which("promtool");
  if (!bin) throw new Error("promtool is not installed: apt-get install -y prometheus (scripts/setup.sh does)"); // a failure, never a skip
  const p = Bun.spawnSync([bin, ...args], { cwd, stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode ?? -1, out: p.stdout.toString() + p.stderr.toString() };
}

/** Metric names an expression reads (the relay's and the edge's, and `up`). */
export function metricsIn(expr: string): string[] {
  return [...new Set(expr.match(/\b(?:relay|edge)_[a-z0-9_]+\b|\bup\b(?=\{)/g) ?? [])];
}

/** Every metric name the host and the edge write. */
let written: Set<string>;
beforeAll(async () => {
  const host = new Metrics(() => ({ queued: 0, failed: 0, unreadable: 0, oldestAgeSeconds: 0 })).render();
  const edgeApp = edgeQueueApp(workerConfig({ DELL_API_ENDPOINT: "http://127.0.0.1:9/api/v1/inbound-mail", API_KEY: KEY, POSTMASTER: "postmaster@example.com", EDGE_SPOOL: new MemoryR2() }), async () => ({ trigger: "flush", link: 1, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: true, chained: false, subrequests: 0, r2: { A: 0, B: 0, free: 0 } }), () => {});
  const edge = await (await edgeApp.request("/edge/metrics", { headers: { "x-api-key": KEY } })).text();
  written = new Set([...`${host}\n${edge}`.split("\n")].filter((l) => l && !l.startsWith("#")).map((l) => l.split(/[{ ]/)[0]!));
  written.add("up"); // Prometheus' own, per scrape job
});

describe("alert rules", () => {
  test("promtool check rules: valid", () => {
    const r = promtool(["check", "rules", "alerts.yml"]);
    expect(r.out).toContain("SUCCESS: 9 rules found");
    expect(r.code).toBe(0);
  });

  test("promtool test rules: every alert fires when it should and not before", () => {
    const r = promtool(["test", "rules", "alerts.test.yml"]);
    expect(r.out).toContain("SUCCESS");
    expect(r.code).toBe(0);
  });

  test("the unit tests see each alert fire at least once", async () => {
    const rules = Bun.YAML.parse(await readFile(join(PROM, "alerts.yml"), "utf8")) as { groups: { rules: { alert: string }[] }[] };
    const tests = Bun.YAML.parse(await readFile(join(PROM, "alerts.test.yml"), "utf8")) as { tests: { alert_rule_test: { alertname: string; exp_alerts: unknown[] }[] }[] };
    const fired = new Set(tests.tests.flatMap((t) => t.alert_rule_test.filter((a) => a.exp_alerts.length).map((a) => a.alertname)));
    const names = rules.groups.flatMap((g) => g.rules.map((r) => r.alert));
    expect(names).toEqual(expect.arrayContaining(["MailRelaySpoolOld", "MailRelaySpoolFailed", "MailRelayUnknownOutcome", "MailRelaySpoolWriteErrors", "MailRelayEdgeHolding", "MailRelayEdgeFailed", "MailRelayHostUnreachableFromEdge"]));
    expect(names.filter((n) => !fired.has(n))).toEqual([]);
  });

  test("every metric a rule reads is written by the host or the edge", async () => {
    const rules = Bun.YAML.parse(await readFile(join(PROM, "alerts.yml"), "utf8")) as { groups: { rules: { expr: string }[] }[] };
    const used = rules.groups.flatMap((g) => g.rules.flatMap((r) => metricsIn(r.expr)));
    expect(used.length).toBeGreaterThan(8);
    expect(used.filter((m) => !written.has(m))).toEqual([]);
  });

  test("the scrape config is valid (promtool check config, with its key file in place)", async () => {
    const dir = await mkdtemp("/tmp/prom-config-");
    try {
      const keyFile = join(dir, "mail-relay.key");
      await writeFile(keyFile, KEY, { mode: 0o600 });
      const config = (await readFile(join(PROM, "prometheus.yml"), "utf8")).replaceAll("/etc/prometheus/mail-relay.key", keyFile);
      await writeFile(join(dir, "prometheus.yml"), config);
      await writeFile(join(dir, "alerts.yml"), await readFile(join(PROM, "alerts.yml")));
      const r = promtool(["check", "config", "prometheus.yml"], dir);
      expect(r.out).toContain("SUCCESS");
      expect(r.code).toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("the Grafana dashboard", () => {
  test("every metric a panel queries is written by the host or the edge, and each alert's metric has a panel", async () => {
    const dash = JSON.parse(await readFile(join(ROOT, "examples", "grafana", "mail-relay.json"), "utf8")) as { panels: { title: string; targets: { expr: string }[] }[] };
    const used = new Set(dash.panels.flatMap((p) => p.targets.flatMap((t) => metricsIn(t.expr))));
    expect([...used].filter((m) => !written.has(m))).toEqual([]);
    for (const m of ["relay_spool_oldest_age_seconds", "relay_spool_failed_messages", "relay_unknown_outcome_total", "relay_spool_write_errors_total", "edge_spool_oldest_age_seconds", "edge_host_up"]) expect(used).toContain(m);
  });

  test("the check finds a name that nothing writes", () => {
    expect(metricsIn('rate(relay_deliverd_total[5m]) + up{job="x"}').filter((m) => !written.has(m))).toEqual(["relay_deliverd_total"]);
  });
});
