// GET /status: the host's state as one page (status-page.ts), behind the key given as the HTTP
// Basic password (any user name), so that a browser on a phone can ask for it. Without the key:
// 401 with WWW-Authenticate and nothing of the state. Each request takes a fresh snapshot: the
// counters, the spool as it is on disk, and the edge's listing when EDGE_URL is set.

import { Hono } from "hono";
import { basicAuth } from "hono/basic-auth";
import { z } from "zod";
import { keyMatcher } from "../shared/middleware/api-key.ts";
import { valid } from "../shared/validate.ts";
import { fetchEdgeQueue } from "./edge-client.ts";
import type { LastAnswer } from "./last-answer.ts";
import type { Counter, Metrics } from "./metrics.ts";
import type { Spool } from "./spool.ts";
import { renderStatus, type SpoolSnapshot, type StatusSnapshot } from "./status-page.ts";

/** The counts the page shows, as the operator names them. */
const COUNTS: [Counter, string][] = [
  ["delivered", "delivered"],
  ["rejected", "refused"],
  ["deferred", "deferred (503)"],
  ["queued", "queued (202)"],
  ["duplicates", "duplicates"],
  ["spool_delivered", "delivered from the spool"],
  ["spool_failed", "given up on (failed/)"],
  ["unknown_outcome", "outcome unknown"],
];

export interface StatusSources {
  apiKeys: readonly string[];
  metrics: Metrics;
  lastAnswer: LastAnswer;
  target: string;
  spool: Spool | null;
  edgeUrl?: string;
  startedAt?: number;
}

const StatusQuery = z.object({
  limit: z.coerce.number({ error: "must be a number" }).int("must be a whole number").min(1, "must be at least 1").max(5000, "must be at most 5000").default(200),
});

export function statusApp(src: StatusSources) {
  const startedAt = src.startedAt ?? Date.now();
  const matches = keyMatcher(src.apiKeys);
  const edgeKeys = src.apiKeys.map((k, i): [string, string] => [`key ${i + 1}`, k]);
  const app = new Hono();
  app.get(
    "/status",
    basicAuth({
      verifyUser: (_user, password) => matches(password),
      realm: "mail-relay",
      // An object is answered as JSON (a string would go out as application/octet-stream).
      invalidUserMessage: { status: "error", error: "unauthorized", message: "give the key as the password (any user name)" },
    }),
    valid("query", StatusQuery),
    async (c) => {
      const { limit } = c.req.valid("query");
      const now = Date.now();
      const [spool, edge] = await Promise.all([src.spool ? spoolSnapshot(src.spool, limit) : null, src.edgeUrl ? fetchEdgeQueue(src.edgeUrl, edgeKeys, 3_000) : null]);
      const snapshot: StatusSnapshot = {
        now,
        startedAt,
        target: src.target,
        lastAnswer: src.lastAnswer.get(),
        counts: COUNTS.map(([counter, label]) => ({ counter, label, sinceStart: src.metrics.get(counter), lastHour: src.metrics.lastHour(counter, now) })),
        spool,
        edge,
      };
      c.header("cache-control", "no-store");
      // No script runs on this page, whatever a value might carry.
      c.header("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'");
      c.header("x-content-type-options", "nosniff");
      return c.html(renderStatus(snapshot));
    },
  );
  return app;
}

async function spoolSnapshot(spool: Spool, limit: number): Promise<SpoolSnapshot> {
  try {
    const [queue, failed] = await Promise.all([spool.scan("queue"), spool.scan("failed")]);
    return {
      queued: queue.entries,
      failed: failed.entries,
      unreadable: [...queue.unreadable.map((entry) => ({ area: "queue", entry })), ...failed.unreadable.map((entry) => ({ area: "failed", entry }))],
      limit,
    };
  } catch (e) {
    return { queued: [], failed: [], unreadable: [], limit, error: `the spool cannot be listed: ${(e as Error).message}` };
  }
}
