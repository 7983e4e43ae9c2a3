// The edge spool's own HTTP face (the Worker's fetch() under /edge/, with the key): GET
// /edge/queue and /edge/metrics show what is held and what failed, POST /edge/flush drains now,
// POST /edge/retry/:id puts a failed message back (a malformed id: 400), POST /edge/known records
// the host's mailboxes as known. `bun run edge-queue` calls these. POST /edge/drain is the
// Worker's own: the next run of a drain, started through its binding to itself
// (edge/drain-runner.ts). /edge/metrics also asks the host's /health (edge_host_up). Every body and
// parameter goes through the design card's validator (shared/validate.ts).

import { Hono, type Context } from "hono";
import { HTTPException } from "hono/http-exception";
import { z } from "zod";
import { addressProblem } from "../shared/contract.ts";
import type { EdgeListing, EdgeRow } from "../shared/edge-listing.ts";
import type { LogWriter } from "../shared/log.ts";
import { apiKey } from "../shared/middleware/api-key.ts";
import { PROMETHEUS_CONTENT_TYPE, metric } from "../shared/prometheus.ts";
import { valid } from "../shared/validate.ts";
import type { WorkerConfig } from "./config.ts";
import { DRAIN_PATH } from "./drain-runner.ts";
import { MAX_LINKS, type DrainSummary } from "./drain.ts";
import { hostReachable } from "./host-probe.ts";
import { EdgeSpool, isId, type HeldMessage } from "./spool.ts";

/** How the app runs a drain: an operator's flush now, or a chained run handed this drain's lock. */
export type RunDrain = (chain?: { lock: string; link: number }) => Promise<DrainSummary>;

/** POST /edge/retry/:id takes an id of the edge spool's form (20250101T000000000Z-0a1b2c3d). */
const RetryParams = z.object({ id: z.string().refine(isId, { message: "is not an edge spool id (ids from GET /edge/queue)" }) });

/** What POST /edge/drain takes: the lock handed over and the run's place in its drain. */
const ChainedRun = z.object({ lock: z.string().min(1).max(200), link: z.number().int().min(1).max(MAX_LINKS) });

/** What POST /edge/known takes: the host's mailboxes, each checked as an envelope address is. */
const KnownAddresses = z.object({
  addresses: z
    .array(z.string().refine((a) => addressProblem(a) === null, { error: (i) => `${JSON.stringify(String(i.input).slice(0, 80))} ${addressProblem(String(i.input))}` }))
    .min(1, "needs at least one address"),
});
/** Of each request's subrequests, what POST /edge/known keeps for itself (one put per address). */
const KNOWN_RESERVE = 2;

/** The edge spool's HTTP face, behind the key. */
export function edgeQueueApp(config: WorkerConfig, runDrain: RunDrain, log: LogWriter) {
  const app = new Hono();
  app.use("*", apiKey([config.apiKey], (c: Context, message: string) => c.json({ status: "error", error: "unauthorized", message }, 401)));
  app.use("*", async (c, next) => {
    if (!config.spool) return c.json({ status: "error", error: "no_edge_spool", message: "no R2 bucket is bound as EDGE_SPOOL" }, 404);
    await next();
  });
  const spool = () => new EdgeSpool(config.spool!);

  app.get("/edge/queue", async (c) => c.json(await edgeListing(spool())));
  app.get("/edge/metrics", async (c) => {
    const [l, up] = await Promise.all([edgeListing(spool()), hostReachable(config)]);
    const lines = [
      ...metric("edge_spool_messages", "gauge", "Messages held at the edge for the host.", l.held),
      ...metric("edge_spool_oldest_age_seconds", "gauge", "Age of the oldest held message.", l.oldest_held_age_seconds ?? 0),
      ...metric("edge_spool_failed_messages", "gauge", "Messages the edge gave up on (failed/).", l.failed),
      ...metric("edge_host_up", "gauge", "1 if the Worker reached the host's /health (DELL_API_ENDPOINT's origin) when scraped, 0 if not.", up ? 1 : 0),
    ];
    return c.text(lines.join("\n") + "\n", 200, { "content-type": PROMETHEUS_CONTENT_TYPE });
  });
  app.post("/edge/flush", async (c) => c.json({ status: "ok", ...(await runDrain()) }));
  app.post(DRAIN_PATH, valid("json", ChainedRun), async (c) => {
    const run = c.req.valid("json");
    // Answered at once: the previous run ends, and this one runs after the answer (waitUntil).
    await afterAnswer(c, runDrain(run));
    return c.json({ status: "started", link: run.link }, 202);
  });
  app.post("/edge/known", valid("json", KnownAddresses), async (c) => {
    const addresses = [...new Set(c.req.valid("json").addresses.map((a) => a.toLowerCase()))];
    const max = config.subrequests - KNOWN_RESERVE;
    if (addresses.length > max) {
      return c.json({ status: "error", error: "too_many", message: `at most ${max} addresses per request (EDGE_SPOOL_SUBREQUESTS)`, max_per_request: max }, 413);
    }
    const recorded = await spool().record(addresses);
    log({ event: "edge_known_recorded", count: recorded });
    return c.json({ status: "ok", recorded });
  });
  app.post("/edge/retry/:id", valid("param", RetryParams), async (c) => {
    const { id } = c.req.valid("param");
    if (!(await spool().retryFailed(id))) return c.json({ status: "error", error: "not_found", message: `no failed message ${JSON.stringify(id)}` }, 404);
    log({ event: "edge_retry_failed", id });
    return c.json({ status: "ok", id, message: "back in the edge queue; the next drain delivers it" });
  });
  app.notFound((c) => c.json({ status: "error", error: "not_found", message: `no route for ${c.req.method} ${c.req.path}` }, 404));
  // A body the validator could not even parse (malformed JSON) is answered like any other bad input.
  app.onError((err, c) => {
    if (err instanceof HTTPException && err.status === 400) return c.json({ status: "error", error: "invalid_request", message: err.message }, 400);
    if (err instanceof HTTPException) return err.getResponse();
    log({ event: "edge_spool_error", during: `${c.req.method} ${c.req.path}`, error: err.message });
    return c.json({ status: "error", error: "internal_error", message: `the edge spool could not do it: ${err.message}` }, 500);
  });
  return app;
}

/** In workerd, after the answer (ctx.waitUntil); in Bun (tests), before it. */
async function afterAnswer(c: Context, work: Promise<unknown>): Promise<void> {
  let ctx: { waitUntil(p: Promise<unknown>): void } | undefined;
  try {
    ctx = c.executionCtx;
  } catch {
    ctx = undefined; // Hono throws when the runtime gave no context
  }
  const logged = work.catch(() => {}); // the run logs its own failures
  if (ctx) ctx.waitUntil(logged);
  else await logged;
}

async function edgeListing(spool: EdgeSpool): Promise<EdgeListing> {
  const now = Date.now();
  const [{ messages, complete }, failed] = await Promise.all([spool.held(10), spool.failed()]);
  const row = (m: HeldMessage): EdgeRow => ({
    id: m.id,
    kind: m.kind,
    from: m.from === "" ? "<>" : m.from,
    to: m.to,
    size: m.size,
    age_seconds: Math.round((now - m.received) / 1000),
    attempts: m.attempts,
    next_attempt: m.next ? new Date(m.next).toISOString() : null,
    last_reply: m.lastReply || m.reason,
  });
  return {
    held: messages.length,
    oldest_held_age_seconds: messages.length ? Math.round((now - Math.min(...messages.map((m) => m.received))) / 1000) : null,
    failed: failed.length,
    complete,
    messages: messages.map(row),
    failed_messages: failed.map((f) => ({ ...row(f), why: f.why, failed_at: new Date(f.failed).toISOString() })),
  };
}
