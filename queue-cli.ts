// `bun run server.ts queue ...`: the operator's view of the spool (Postfix's mailq/postqueue).
//   list            what waits, and what failed, with ages, attempts and last replies
//   flush           ask the running host to attempt everything now
//   retry ID        put a failed message back into the queue (and flush)
//   purge-failed    delete everything in failed/ (after reading it)

import { Spool, type SpoolEntry } from "./spool.ts";

function age(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

function row(e: SpoolEntry): string {
  const h = e.header;
  const from = h.from === "" ? "<>" : h.from;
  const next = e.state.next_at > Date.now() ? ` next in ${age(e.state.next_at - Date.now())}` : "";
  const why = e.state.reason ?? e.state.last_reply ?? "";
  return `${h.id}  ${age(Date.now() - h.received_at).padStart(6)}  ${String(h.size).padStart(9)}  ${from} -> ${e.state.remaining.join(", ")}  attempts ${e.state.attempts}${next}${why ? `\n    ${why}` : ""}`;
}

export async function queueCommand(dir: string | undefined, args: string[]): Promise<number> {
  if (!dir) {
    console.error("SPOOL_DIR is not set: there is no spool to look at");
    return 2;
  }
  const spool = new Spool(dir);
  const [cmd, id] = args;
  switch (cmd) {
    case "list": {
      const queued = await spool.list("queue");
      const failed = await spool.list("failed");
      console.log(`queued: ${queued.length}`);
      for (const e of queued) console.log(row(e));
      console.log(`failed: ${failed.length}`);
      for (const e of failed) console.log(row(e));
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
      await spool.retryFailed(id);
      spool.requestFlush();
      console.log(`${id} is back in the queue`);
      return 0;
    case "purge-failed":
      console.log(`removed ${await spool.purgeFailed()} failed message(s)`);
      return 0;
    default:
      console.error("usage: bun run server.ts queue list|flush|retry ID|purge-failed");
      return 2;
  }
}
