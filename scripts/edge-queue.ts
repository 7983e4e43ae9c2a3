// `bun run edge-queue list|flush|retry ID|learn ADDRESS...`: the edge spool from the operator's
// shell, through the Worker's own HTTP face (GET /edge/queue, POST /edge/flush, POST
// /edge/retry/ID, POST /edge/known), in the style of `server.ts queue`. EDGE_URL is the Worker's
// URL (https://mailserver-inbound-relay.<account>.workers.dev) and API_KEY its key (the host's).
// `learn -` reads the addresses from stdin, one or more per line, so that at cutover
//   doveadm user '*' | bun run edge-queue learn -
// makes every mailbox known at the edge (held, not thrown back, while the host is away).

import { addressProblem } from "../shared/contract.ts";

const USAGE = "usage: EDGE_URL=https://<the Worker> API_KEY=<key> bun run edge-queue list|flush|retry ID|learn ADDRESS...|learn -";
/** Addresses per POST /edge/known at first; the Worker answers 413 with its own maximum when that is less. */
const LEARN_BATCH = 48;

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

/** The addresses `learn` was given (its arguments, or stdin's words for "-"), each once: the edge keeps them in lower case. */
async function learnArguments(args: string[], stdin: () => Promise<string>): Promise<string[]> {
  const words = args.length === 1 && args[0] === "-" ? (await stdin()).split(/\s+/) : args;
  return [...new Set(words.filter(Boolean).map((w) => w.toLowerCase()))];
}

export async function edgeQueue(
  args: string[],
  env: Record<string, string | undefined>,
  out: (line: string) => void = console.log,
  stdin: () => Promise<string> = () => Bun.stdin.text(),
): Promise<number> {
  const [cmd, id] = args;
  const base = env.EDGE_URL?.replace(/\/+$/, "");
  if (!base || !env.API_KEY || !["list", "flush", "retry", "learn"].includes(cmd ?? "") || ((cmd === "retry" || cmd === "learn") && !id)) {
    console.error(USAGE);
    return 2;
  }
  class HttpError extends Error {
    constructor(
      readonly status: number,
      readonly body: Record<string, unknown> | null,
      message: string,
    ) {
      super(message);
    }
  }
  const call = async (method: string, path: string, json?: unknown) => {
    const headers: Record<string, string> = { "X-API-Key": env.API_KEY! };
    if (json !== undefined) headers["content-type"] = "application/json";
    const res = await fetch(`${base}${path}`, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
    const body = (await res.json().catch(() => null)) as Record<string, unknown> | null;
    if (!res.ok) throw new HttpError(res.status, body, `${method} ${path}: HTTP ${res.status} ${String(body?.message ?? "")}`.trim());
    return body!;
  };
  if (cmd === "learn") {
    const addresses = await learnArguments(args.slice(1), stdin);
    // All checked before any is sent: a typo in the list records nothing.
    const bad = addresses.map((a) => [a, addressProblem(a)] as const).filter(([, p]) => p !== null);
    if (bad.length || addresses.length === 0) {
      for (const [a, p] of bad.slice(0, 10)) console.error(`${JSON.stringify(a.slice(0, 80))} ${p}`);
      console.error(addresses.length === 0 ? "no addresses given" : `${bad.length} of ${addresses.length} are not addresses; nothing was recorded`);
      return 1;
    }
    let batch = LEARN_BATCH;
    let recorded = 0;
    try {
      for (let at = 0; at < addresses.length; ) {
        const chunk = addresses.slice(at, at + batch);
        try {
          recorded += Number((await call("POST", "/edge/known", { addresses: chunk })).recorded ?? 0);
          at += chunk.length;
        } catch (e) {
          const max = e instanceof HttpError && e.status === 413 ? Number(e.body?.max_per_request) : NaN;
          if (!(max > 0 && max < batch)) throw e;
          batch = max;
        }
      }
    } catch (e) {
      console.error(`${(e as Error).message} (${recorded} of ${addresses.length} recorded before)`);
      return 1;
    }
    out(`${recorded} addresses are known at the edge: mail for them is held while the host is away (for 60 days, renewed by each delivery)`);
    return 0;
  }
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
      const goesOn = s.chained ? " (the drain goes on in the background: `bun run edge-queue list` shows it)" : "";
      out(s.state === "busy" ? "another drain is running; it delivers what is held" : `delivered ${s.delivered}, retried ${s.retried}, failed ${s.failed}, still held ${s.remaining}${goesOn}`);
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
