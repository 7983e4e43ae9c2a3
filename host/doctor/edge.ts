// EDGE_URL, the Worker: GET /edge/queue with the key says what the edge holds and whether the
// Worker's key is one of the host's (401: they differ); its /edge/metrics says whether the Worker
// reaches the host (edge_host_up). The Access service token goes along, when it is set, for a
// Worker's URL behind Access too.

import { fetchEdgeQueue } from "../edge-client.ts";
import { age } from "../queue-cli.ts";
import type { DoctorContext, DoctorPart, Finding } from "./finding.ts";
import { get } from "../http-get.ts";
import { accessHeaders } from "./http-probe.ts";

const HOUR_S = 3600;

export const edge: DoctorPart = {
  name: "edge",
  async run(ctx) {
    const edgeUrl = ctx.config?.edgeUrl;
    if (!edgeUrl) return [{ part: "edge", status: "skip", found: ctx.config ? "EDGE_URL is not set: the Worker is not asked" : "the host's settings do not parse (see configuration)" }];
    const answer = await fetchEdgeQueue(edgeUrl, ctx.keys, ctx.timeoutMs, accessHeaders(ctx.serviceToken));
    if (answer.kind === "refused") {
      return [{ part: "edge", status: "fail", found: "the Worker answered 401 to every key of the host: the Worker's and the host's keys differ", fix: "`bunx wrangler secret put API_KEY` with the host's API_KEY (during a rotation, any key of API_KEYS)" }];
    }
    if (answer.kind === "error") {
      return [{ part: "edge", status: "fail", found: answer.message, fix: "EDGE_URL is the Worker's own URL (https://<name>.<account>.workers.dev); `bunx wrangler deploy` puts it there" }];
    }
    if (answer.kind === "no_spool") return [{ part: "edge", status: "skip", found: "the Worker has no edge spool (no EDGE_SPOOL bucket): it holds no mail while the host is away" }];
    const l = answer.listing;
    const findings: Finding[] = [];
    const held = `${l.held} held${l.complete ? "" : "+"}${l.oldest_held_age_seconds !== null ? `, the oldest for ${age(l.oldest_held_age_seconds * 1000)}` : ""} (asked with ${answer.keyName})`;
    if ((l.oldest_held_age_seconds ?? 0) > HOUR_S) findings.push({ part: "edge", status: "warn", found: `${held}: the host has not taken it for over an hour`, fix: "`bun run edge-queue list` shows the host's last answer; `bun run edge-queue flush` once it is fixed" });
    else findings.push({ part: "edge", status: "ok", found: held });
    if (l.failed) findings.push({ part: "edge", status: "warn", found: `${l.failed} failed at the edge (POSTMASTER was sent a notice)`, fix: "`bun run edge-queue list`, then `bun run edge-queue retry ID` once fixed" });
    findings.push(await hostFromEdge(edgeUrl, answer.keyName, ctx));
    return findings;
  },
};

/** edge_host_up from the Worker's /edge/metrics: can the Worker reach the host now? */
async function hostFromEdge(edgeUrl: string, keyName: string, ctx: DoctorContext): Promise<Finding> {
  const key = ctx.keys.find(([n]) => n === keyName)![1];
  const a = await get(new URL("/edge/metrics", edgeUrl), ctx.timeoutMs, { ...accessHeaders(ctx.serviceToken), "x-api-key": key });
  const up = typeof a === "string" ? null : /^edge_host_up (\d)$/m.exec(a.text)?.[1];
  if (up === "1") return { part: "edge", status: "ok", found: "the Worker reaches the host (edge_host_up 1)" };
  if (up === "0") return { part: "edge", status: "fail", found: "the Worker cannot reach the host: GET /health through its DELL_API_ENDPOINT fails (edge_host_up 0)", fix: "the public-url check says where the path breaks; the Worker's DELL_API_ENDPOINT must be PUBLIC_URL" };
  return { part: "edge", status: "warn", found: "the Worker's /edge/metrics has no edge_host_up (an older Worker?)", fix: "`bunx wrangler deploy` this version" };
}
