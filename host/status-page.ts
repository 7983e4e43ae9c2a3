// The /status page as HTML, rendered on the server from one snapshot of the host's state: no
// script, no build step, one column on a phone. Every value goes through hono/html's template,
// which escapes it: envelopes, replies and file names come from senders and servers, and are
// shown, never interpreted. Control characters are shown as \uXXXX (queue-cli's `shown`).

import { html } from "hono/html";
import type { EdgeRow } from "../shared/edge-listing.ts";
import type { EdgeQueueAnswer } from "./edge-client.ts";
import type { TargetAnswer } from "./last-answer.ts";
import type { Counter } from "./metrics.ts";
import { age, shown } from "./queue-cli.ts";
import type { SpoolEntry, UnreadableEntry } from "./spool.ts";

export interface StatusCount {
  counter: Counter;
  label: string;
  sinceStart: number;
  lastHour: number;
}

export interface SpoolSnapshot {
  queued: SpoolEntry[];
  failed: SpoolEntry[];
  unreadable: { area: string; entry: UnreadableEntry }[];
  /** At most this many rows of each list are shown. */
  limit: number;
  /** Why the spool could not be read, if it could not. */
  error?: string;
}

export interface StatusSnapshot {
  now: number;
  startedAt: number;
  target: string;
  lastAnswer: TargetAnswer | null;
  counts: StatusCount[];
  /** null: no SPOOL_DIR. */
  spool: SpoolSnapshot | null;
  /** null: no EDGE_URL. */
  edge: EdgeQueueAnswer | null;
}

const STYLE = `
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px;max-width:60em;color:#222;background:#fff}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.ok{color:#176b1e}.bad{color:#b00020}.warn{color:#8a5a00}.muted{color:#666}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code,.id{font-family:ui-monospace,monospace;font-size:.9em;overflow-wrap:anywhere}
ul.msgs{list-style:none;padding:0;margin:0}ul.msgs li{padding:6px 0;border-bottom:1px solid #eee}
.env{overflow-wrap:anywhere}.meta{font-size:.85em;color:#666}
.reply{font-size:.9em;color:#444;overflow-wrap:anywhere}
`;

export function renderStatus(s: StatusSnapshot) {
  const attention = needsAttention(s);
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="60">
<title>mail-relay status</title>
<style>${STYLE}</style>
</head>
<body>
<h1>mail-relay <span id="summary" class="${attention.length ? "bad" : "ok"}">${attention.length ? `needs attention: ${attention.join("; ")}` : "all well"}</span></h1>
<p class="muted">as of ${new Date(s.now).toISOString()}; up ${age(s.now - s.startedAt)}</p>

<h2>Delivery target</h2>
<p><code id="target">${s.target}</code></p>
${targetAnswer(s)}

<h2>Messages</h2>
<div class="scroll"><table id="counts">
<tr><th></th><th class="n">since start</th><th class="n">last hour</th></tr>
${s.counts.map(
  (c) => html`<tr><th>${c.label}</th><td class="n" data-metric="relay_${c.counter}_total">${c.sinceStart}</td><td class="n" data-last-hour="${c.counter}">${c.lastHour}</td></tr>`,
)}
</table></div>

${spoolSection(s)}
${edgeSection(s)}
</body>
</html>`;
}

/** What the summary line names: each thing an operator should look at now. */
function needsAttention(s: StatusSnapshot): string[] {
  const out: string[] = [];
  if (s.lastAnswer && !s.lastAnswer.accepted) out.push("the delivery target's last answer was not a delivery");
  if (s.spool?.error) out.push("the spool cannot be read");
  if (s.spool?.queued.some((e) => s.now - e.header.received_at > 3_600_000)) out.push("mail waits in the spool for over an hour");
  if (s.spool?.failed.length) out.push(`${s.spool.failed.length} failed in the spool`);
  if (s.spool?.unreadable.length) out.push(`${s.spool.unreadable.length} unreadable in the spool`);
  if (s.edge?.kind === "refused" || s.edge?.kind === "error") out.push("the edge cannot be asked");
  if (s.edge?.kind === "listing") {
    const l = s.edge.listing;
    if ((l.oldest_held_age_seconds ?? 0) > 3600) out.push("the edge holds mail for over an hour");
    if (l.failed) out.push(`${l.failed} failed at the edge`);
  }
  return out;
}

function targetAnswer(s: StatusSnapshot) {
  const a = s.lastAnswer;
  if (!a) return html`<p class="muted" id="last-answer">no delivery attempted since start</p>`;
  return html`<p id="last-answer">last answer, ${age(s.now - a.at)} ago: <span class="${a.accepted ? "ok" : "bad"} reply">${shown(a.text)}</span></p>`;
}

/** One message as a short block (a table of five columns does not fit a phone). */
function messageItem(m: { id: string; from: string; to: string; ageMs: number; attempts: number; reply: string; note?: string }) {
  return html`<li><div class="env">${shown(m.from === "" ? "<>" : m.from)} → ${shown(m.to)}${m.note ?? ""}</div>
<div class="meta"><span class="id">${m.id}</span> · ${age(m.ageMs)} · ${m.attempts} attempt${m.attempts === 1 ? "" : "s"}</div>${m.reply ? html`<div class="reply">${shown(m.reply)}</div>` : ""}</li>`;
}

function spoolRows(entries: SpoolEntry[], now: number, limit: number, failed: boolean) {
  if (!entries.length) return html`<p class="muted">none</p>`;
  const items = entries.slice(0, limit).map((e) =>
    messageItem({
      id: e.header.id,
      from: e.header.from,
      to: (e.state.remaining.length ? e.state.remaining : e.header.to).join(", "),
      ageMs: now - e.header.received_at,
      attempts: e.state.attempts,
      reply: (failed ? e.state.reason : null) ?? e.state.last_reply ?? "",
    }),
  );
  return html`<ul class="msgs">${items}</ul>${entries.length > limit ? html`<p class="muted">and ${entries.length - limit} more (<code>?limit=</code> shows more)</p>` : ""}`;
}

function spoolSection(s: StatusSnapshot) {
  if (!s.spool) return html`<h2>Spool</h2><p class="muted">no spool (SPOOL_DIR is not set): what Dovecot cannot take now is answered 503, and the sender retries</p>`;
  const sp = s.spool;
  if (sp.error) return html`<h2>Spool</h2><p class="bad">${shown(sp.error)}</p>`;
  return html`<h2>Spool: <span id="spool-queued">${sp.queued.length}</span> waiting</h2>
${spoolRows(sp.queued, s.now, sp.limit, false)}
<h2>Failed: <span id="spool-failed">${sp.failed.length}</span></h2>
${spoolRows(sp.failed, s.now, sp.limit, true)}
${sp.unreadable.length ? html`<h2>Unreadable: ${sp.unreadable.length}</h2><ul>${sp.unreadable.map((u) => html`<li><code>${u.area}/${shown(u.entry.name)}</code>: ${shown(u.entry.problem)}</li>`)}</ul>` : ""}`;
}

function edgeRows(rows: EdgeRow[], failed: boolean) {
  if (!rows.length) return html`<p class="muted">none</p>`;
  const items = rows.map((r) =>
    messageItem({ id: r.id, from: r.from, to: r.to, ageMs: r.age_seconds * 1000, attempts: r.attempts, reply: failed ? `${r.why ?? ""}: ${r.last_reply}` : r.last_reply, note: r.kind === "notice" ? " (notice)" : "" }),
  );
  return html`<ul class="msgs">${items}</ul>`;
}

function edgeSection(s: StatusSnapshot) {
  const e = s.edge;
  if (!e) return "";
  if (e.kind === "refused") return html`<h2>Edge</h2><p class="bad">the Worker refused every key of this host: its API_KEY secret is not one of the host's keys</p>`;
  if (e.kind === "no_spool") return html`<h2>Edge</h2><p class="muted">the Worker has no edge spool (no R2 bucket bound as EDGE_SPOOL)</p>`;
  if (e.kind === "error") return html`<h2>Edge</h2><p class="bad">${shown(e.message)}</p>`;
  const l = e.listing;
  return html`<h2>Edge: <span id="edge-held">${l.held}</span> held${l.complete ? "" : " (more than listed)"}${l.oldest_held_age_seconds !== null ? `, oldest ${age(l.oldest_held_age_seconds * 1000)}` : ""}</h2>
${edgeRows(l.messages, false)}
<h2>Failed at the edge: <span id="edge-failed">${l.failed}</span></h2>
${edgeRows(l.failed_messages, true)}`;
}
