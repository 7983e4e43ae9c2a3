// `bun run server.ts queue ...`: the operator's view of the spool (Postfix's mailq/postqueue).
//   list            what waits, what failed, and what cannot be read, with ages, attempts and replies
//   flush           ask the running host to attempt everything now
//   retry ID        put a failed message back into the queue (and flush)
//   purge-failed    delete everything in failed/ (after reading it)
// `list` only reads. Every error is one line on stderr: exit code 2 for a wrong command line, 1 when
// the spool could not do what was asked.

import { Spool, isSpoolId, type SpoolEntry, type UnreadableEntry } from "./spool.ts";

const USAGE = "usage: bun run server.ts queue list|flush|retry ID|purge-failed";

export function age(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

/**
 * Text from the envelope, a reply or a file name, safe to print: controls (C0, DEL and C1, which a
 * terminal may take as an escape sequence), line separators and lone surrogates as \uXXXX.
 */
export function shown(s: string): string {
  return s.replace(/[\x00-\x1f\x7f-\x9f\u2028\u2029]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

function row(e: SpoolEntry): string {
  const h = e.header;
  const from = h.from === "" ? "<>" : h.from;
  const next = e.state.next_at > Date.now() ? ` next in ${age(e.state.next_at - Date.now())}` : "";
  const why = e.state.reason ?? e.state.last_reply ?? "";
  return shown(`${h.id}  ${age(Date.now() - h.received_at).padStart(6)}  ${String(h.size).padStart(9)}  ${from} -> ${e.state.remaining.join(", ")}  attempts ${e.state.attempts}${next}`) + (why ? `\n    ${shown(why)}` : "");
}

function unreadableRow(area: string, u: UnreadableEntry): string {
  return shown(`${area}/${u.name}  ${u.problem}`) + (u.reason ? `\n    ${shown(u.reason)}` : "");
}

/** One line, whatever the error carried. */
function oneLine(e: unknown): string {
  return shown(String((e as Error)?.message ?? e).replace(/\s*\n\s*/g, " "));
}

export async function queueCommand(dir: string | undefined, args: string[]): Promise<number> {
  if (!dir) {
    console.error("SPOOL_DIR is not set: there is no spool to look at");
    return 2;
  }
  const spool = new Spool(dir);
  const [cmd, id, ...extra] = args;
  if (extra.length || (cmd !== "retry" && id !== undefined)) {
    console.error(USAGE);
    return 2;
  }
  try {
    switch (cmd) {
      case "list": {
        const queued = await spool.scan("queue");
        const failed = await spool.scan("failed");
        console.log(`queued: ${queued.entries.length}`);
        for (const e of queued.entries) console.log(row(e));
        console.log(`failed: ${failed.entries.length}`);
        for (const e of failed.entries) console.log(row(e));
        const unreadable = queued.unreadable.length + failed.unreadable.length;
        console.log(`unreadable: ${unreadable}${unreadable ? " (never delivered as they are: repair or remove them by hand)" : ""}`);
        for (const u of queued.unreadable) console.log(unreadableRow("queue", u));
        for (const u of failed.unreadable) console.log(unreadableRow("failed", u));
        // A read that failed for a reason that passes (out of file descriptors): nothing wrong is
        // known of these files, and the host reads them again.
        const notNow = [...queued.notReadNow.map((u) => ["queue", u] as const), ...failed.notReadNow.map((u) => ["failed", u] as const)];
        if (notNow.length) console.log(`not readable just now: ${notNow.length} (not known to be damaged: run it again)`);
        for (const [area, u] of notNow) console.log(unreadableRow(area, u));
        return 0;
      }
      case "flush":
        spool.requestFlush();
        console.log("flush requested: the running host attempts every queued message now");
        return 0;
      case "retry":
        if (!id) {
          console.error("usage: queue retry ID (ids from `queue list`)");
          return 2;
        }
        if (!isSpoolId(id)) {
          console.error(`queue retry: ${JSON.stringify(id)} is not a spool id (ids from \`queue list\`)`);
          return 2;
        }
        await spool.retryFailed(id);
        spool.requestFlush();
        console.log(`${id} is back in the queue`);
        return 0;
      case "purge-failed": {
        const { removed, skipped } = await spool.purgeFailed();
        console.log(`removed ${removed.length} failed message(s)${removed.length ? `: ${removed.join(", ")}` : ""}`);
        for (const s of skipped) console.log(`left in failed/: ${shown(s.name)}: ${s.why}`);
        return 0;
      }
      default:
        console.error(USAGE);
        return 2;
    }
  } catch (e) {
    console.error(`queue ${cmd}: ${oneLine(e)} (SPOOL_DIR=${dir})`);
    return 1;
  }
}
