// `bun run edge-queue list|flush|retry ID`: the edge spool from the operator's shell, through the
// Worker's own HTTP face (GET /edge/queue, POST /edge/flush, POST /edge/retry/ID), in the style of
// `server.ts queue`. EDGE_URL is the Worker's URL (https://mailserver-inbound-relay.<account>.workers.dev)
// and API_KEY its key (the host's).

const USAGE = "usage: EDGE_URL=https://<the Worker> API_KEY=<key> bun run edge-queue list|flush|retry ID";

interface Row {
  id: string;
  kind: string;
  from: string;
  to: string;
  size: number;
  age_seconds: number;
  attempts: number;
  next_attempt: string | null;
  last_reply: string;
  why?: string;
}

function age(s: number): string {
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

function row(r: Row): string {
  const next = r.next_attempt && Date.parse(r.next_attempt) > Date.now() ? ` next in ${age(Math.round((Date.parse(r.next_attempt) - Date.now()) / 1000))}` : "";
  const kind = r.kind === "notice" ? " (notice)" : "";
  const why = r.why ? ` ${r.why}` : "";
  return `${r.id}  ${age(r.age_seconds).padStart(6)}  ${String(r.size).padStart(9)}  ${r.from} -> ${r.to}${kind}  attempts ${r.attempts}${next}${why}${r.last_reply ? `\n    ${r.last_reply}` : ""}`;
}

export async function edgeQueue(args: string[], env: Record<string, string | undefined>, out: (line: string) => void = console.log): Promise<number> {
  const [cmd, id] = args;
  const base = env.EDGE_URL?.replace(/\/+$/, "");
  if (!base || !env.API_KEY || !["list", "flush", "retry"].includes(cmd ?? "") || (cmd === "retry" && !id)) {
    console.error(USAGE);
    return 2;
  }
  const call = async (method: string, path: string) => {
    const res = await fetch(`${base}${path}`, { method, headers: { "X-API-Key": env.API_KEY! } });
    const body = (await res.json().catch(() => null)) as Record<string, unknown> | null;
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${String(body?.message ?? "")}`.trim());
    return body!;
  };
  try {
    if (cmd === "list") {
      const l = await call("GET", "/edge/queue");
      const held = l.messages as Row[];
      const failed = l.failed_messages as Row[];
      out(`held: ${l.held}${l.oldest_held_age_seconds != null ? ` (oldest ${age(l.oldest_held_age_seconds as number)})` : ""}${l.complete ? "" : " (more than listed)"}`);
      for (const r of held) out(row(r));
      out(`failed: ${l.failed}`);
      for (const r of failed) out(row(r));
    } else if (cmd === "flush") {
      const s = await call("POST", "/edge/flush");
      out(s.state === "busy" ? "another drain is running; it delivers what is held" : `delivered ${s.delivered}, retried ${s.retried}, failed ${s.failed}, still held ${s.remaining}`);
    } else {
      await call("POST", `/edge/retry/${encodeURIComponent(id!)}`);
      out(`${id} is back in the edge queue (\`bun run edge-queue flush\` delivers it now)`);
    }
    return 0;
  } catch (e) {
    console.error((e as Error).message);
    return 1;
  }
}

if (import.meta.main) process.exit(await edgeQueue(process.argv.slice(2), process.env));
