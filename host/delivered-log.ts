// What the host knows it has delivered: (Message-ID, recipient, SHA-256 of the message bytes) for
// 6 days, recorded after Dovecot's 250; a message without a Message-ID is recorded by the other
// two, and counts only for a repeat that waited for it, or for the spool's own retry (repeats.ts). A repeat of the same bytes (the Worker retrying after a
// lost HTTP answer) is answered "duplicate" instead of being delivered twice; a different message
// that reuses a Message-ID has another digest and is delivered. Kept in SQLite beside the spool so
// it survives restarts; in memory when there is no spool. Best effort by design: losing a record
// costs a duplicate, never a message, so a record that cannot be written (a full disk) is logged
// and counted, and delivery goes on.

import { Database } from "bun:sqlite";
import { chmodSync, closeSync, existsSync, openSync } from "node:fs";
import { mailboxKey } from "../shared/contract.ts";

/**
 * Longer than anything may come again: the edge holds mail for up to 5 days
 * (EDGE_SPOOL_MAX_AGE_HOURS) and offers again what the host may have delivered without an answer.
 */
export const DEDUPE_WINDOW_MS = 6 * 24 * 60 * 60 * 1000;

export interface DeliveredLog {
  /** `messageId` null: the message has none. */
  has(messageId: string | null, recipient: string, sha256: string): boolean;
  add(messageId: string | null, recipient: string, sha256: string): void;
  /** Writes what is held in memory now (before a step that must not run ahead of the record). */
  flush(): void;
  close(): void;
}

/**
 * The recipient as Dovecot finds its mailbox (ASCII letters folded, nothing else: see mailboxKey);
 * toLowerCase() folded the Kelvin sign into "k", and a message to another user was taken for a
 * repeat. No Message-ID is "", which no Message-ID field gives (peekHeaders ignores an empty one).
 */
const keyOf = (messageId: string | null, recipient: string, sha256: string) => `${messageId ?? ""}\u0000${mailboxKey(recipient)}\u0000${sha256}`;

/** How long records wait in memory before they are written, together, in one transaction. */
const FLUSH_EVERY_MS = 250;
/** After a failed write, the next try (the records wait in memory meanwhile). */
const RETRY_AFTER_MS = 5_000;
/** Records kept in memory while they cannot be written; past this the oldest are forgotten. */
const MAX_PENDING = 100_000;

export interface DeliveredLogOptions {
  windowMs?: number;
  /** A read or write of the file failed (logged and counted by the host; never thrown). */
  onError?: (e: Error, during: "write" | "read" | "prune") => void;
}

export function openDeliveredLog(path: string | null, opts: DeliveredLogOptions = {}): DeliveredLog {
  const windowMs = opts.windowMs ?? DEDUPE_WINDOW_MS;
  const onError = opts.onError ?? (() => {});
  // Owner only, like the spool (it says who got mail). SQLite gives -wal and -shm the main file's mode.
  if (path) {
    closeSync(openSync(path, "a", 0o600));
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
  }
  const db = new Database(path ?? ":memory:", { create: true });
  db.run("PRAGMA journal_mode = WAL");
  db.run("PRAGMA synchronous = NORMAL");
  // The table before this one keyed records by (Message-ID, recipient, size): a different message
  // with the same Message-ID and no size (a chunked request) matched it and was never delivered.
  // Its rows say nothing about content: none is read again, and the table goes (housekeeping
  // only, so a disk too full for it does not stop the host).
  try {
    db.run("DROP TABLE IF EXISTS delivered");
  } catch (e) {
    onError(e as Error, "prune");
  }
  db.run("CREATE TABLE IF NOT EXISTS delivered_sha256 (key TEXT PRIMARY KEY, at INTEGER NOT NULL)");
  db.run("CREATE INDEX IF NOT EXISTS delivered_sha256_at ON delivered_sha256 (at)");
  const find = db.query<{ at: number }, [string]>("SELECT at FROM delivered_sha256 WHERE key = ?");
  const put = db.query("INSERT OR REPLACE INTO delivered_sha256 (key, at) VALUES (?, ?)");
  const prune = db.query("DELETE FROM delivered_sha256 WHERE at < ?");
  let lastPrune = 0;

  // A write per delivery cost more host CPU than the rest of the delivery's bookkeeping; records
  // are kept in memory for a moment and written in one transaction. A crash loses at most that
  // moment's records: a possible duplicate later, never a message.
  const pending = new Map<string, number>();
  let timer: Timer | null = null;
  const writeAll = db.transaction((rows: [string, number][]) => {
    for (const [key, at] of rows) put.run(key, at);
  });
  const later = (ms: number) => {
    timer = setTimeout(flush, ms);
    timer.unref?.();
  };
  function flush(): void {
    if (timer) clearTimeout(timer);
    timer = null;
    if (pending.size === 0) return;
    const rows = [...pending];
    try {
      writeAll(rows);
    } catch (e) {
      // A full disk: the records stay in memory (has() still sees them) and are tried again later.
      onError(e as Error, "write");
      for (const key of [...pending.keys()].slice(0, Math.max(0, pending.size - MAX_PENDING))) pending.delete(key);
      later(RETRY_AFTER_MS);
      return;
    }
    for (const [key, at] of rows) if (pending.get(key) === at) pending.delete(key);
    const now = Date.now();
    if (now - lastPrune > 60_000) {
      lastPrune = now;
      try {
        prune.run(now - windowMs);
      } catch (e) {
        onError(e as Error, "prune");
      }
    }
  }

  return {
    has(messageId, recipient, sha256) {
      const key = keyOf(messageId, recipient, sha256);
      let at = pending.get(key);
      if (at === undefined) {
        try {
          at = find.get(key)?.at;
        } catch (e) {
          onError(e as Error, "read"); // not known: delivered again, a duplicate at worst
        }
      }
      return at !== undefined && at >= Date.now() - windowMs;
    },
    add(messageId, recipient, sha256) {
      const key = keyOf(messageId, recipient, sha256);
      pending.delete(key); // re-inserted last: the oldest go first when too many wait
      pending.set(key, Date.now());
      if (!timer) later(FLUSH_EVERY_MS);
    },
    flush,
    close() {
      flush();
      if (timer) clearTimeout(timer);
      timer = null;
      db.close();
    },
  };
}
