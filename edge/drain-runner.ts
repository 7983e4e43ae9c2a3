// Runs the edge spool's drain for the Worker: one run (edge/drain.ts) in this invocation, within
// what the invocation may spend (EDGE_SPOOL_SUBREQUESTS), and, while the host confirms, the next
// run at once in a fresh invocation with a budget of its own: a POST /edge/drain to the Worker
// itself through its service binding SELF, which answers 202 and runs it after answering. So a
// backlog reaches the host within a minute of its return instead of ten messages per cron run.
// Why a service binding rather than a Durable Object alarm or a Queue: docs/edge-spool.md.

import { Budget } from "./budget.ts";
import type { FetchBinding, WorkerConfig } from "./config.ts";
import { drain, type DrainSummary, type DrainTrigger } from "./drain.ts";
import { sendHeld } from "./forward.ts";
import { EdgeSpool } from "./spool.ts";

/** Where a chained run is started (the Worker's own route, behind the key). */
export const DRAIN_PATH = "/edge/drain";

export interface RunOptions {
  /** What this invocation has spent already (email() its live delivery); a fresh one otherwise. */
  budget?: Budget;
  /** For a chained run: the lock handed over and its place in the drain. */
  lock?: string;
  link?: number;
  log: (line: Record<string, unknown>) => void;
}

export async function runDrain(config: WorkerConfig, trigger: DrainTrigger, opts: RunOptions): Promise<DrainSummary> {
  const budget = opts.budget ?? new Budget(config.subrequests);
  const started = Date.now();
  const self = config.self;
  const summary = await drain(new EdgeSpool(config.spool!, budget), budget, {
    trigger,
    send: sendHeld(config),
    maxAgeMs: config.maxAgeMs,
    postmaster: config.postmaster,
    log: opts.log,
    lock: opts.lock,
    link: opts.link,
    next: self ? (lock, link) => startNextRun(self, config.apiKey, lock, link) : undefined,
  });
  if (summary.state !== "idle") opts.log({ event: "edge_drain", ...summary, ms: Date.now() - started });
  return summary;
}

/** The next run of a drain, in a fresh invocation of this Worker; true once it has taken over. */
async function startNextRun(self: FetchBinding, apiKey: string, lock: string, link: number): Promise<boolean> {
  const res = await self.fetch(`https://edge${DRAIN_PATH}`, {
    method: "POST",
    headers: { "x-api-key": apiKey, "content-type": "application/json" },
    body: JSON.stringify({ lock, link }),
  });
  await res.body?.cancel();
  return res.status === 202;
}
