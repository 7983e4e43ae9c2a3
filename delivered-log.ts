// What the host knows it has delivered: (Message-ID, recipient, size) for 24 hours, recorded after
// Dovecot's 250. A repeat of the same message (the Worker retrying after a lost HTTP answer) is
// answered "duplicate" instead of being delivered twice. Kept in SQLite beside the spool so it
// survives restarts; in memory when there is no spool. Best effort by design: losing a record
// costs a duplicate, never a message.

import { Database } from "bun:sqlite";
import { chmodSync, closeSync, existsSync, openSync } from "node:fs";

export const DEDUPE_WINDOW_MS = 24 * 60 * 60 * 1000;

export interface DeliveredLog {
  has(messageId: string, recipient: string, size: number | null): boolean;
  add(messageId: string, recipient: string, size: number | null): void;
  close(): void;
}

const keyOf = (messageId: string, recipient: string, size: number | null) => `${messageId}\u0000${recipient.toLowerCase()}\u0000${size ?? ""}`;

/** How long records wait in memory before they are written, together, in one transaction. */
const FLUSH_EVERY_MS = 250;

export function openDeliveredLog(path: string | null, windowMs = DEDUPE_WINDOW_MS): DeliveredLog {
  // Owner only, like the spool (it says who got mail). SQLite gives -wal and -shm the main file's mode.
  if (path) {
    closeSync(openSync(path, "a", 0o600));
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
  }
  const db = new Database(path ?? ":memory:", { create: true });
  db.run("PRAGMA journal_mode = WAL");
  db.run("PRAGMA synchronous = NORMAL");
  db.run("CREATE TABLE IF NOT EXISTS delivered (key TEXT PRIMARY KEY, at INTEGER NOT NULL)");
  db.run("CREATE INDEX IF NOT EXISTS delivered_at ON delivered (at)");
  const find = db.query<{ at: number }, [string]>("SELECT at FROM delivered WHERE key = ?");
  const put = db.query("INSERT OR REPLACE INTO delivered (key, at) VALUES (?, ?)");
  const prune = db.query("DELETE FROM delivered WHERE at < ?");
  let lastPrune = 0;

  // A write per delivery cost more host CPU than the rest of the delivery's bookkeeping; records
  // are kept in memory for a moment and written in one transaction. A crash loses at most that
  // moment's records: a possible duplicate later, never a message.
  const pending = new Map<string, number>();
  let timer: Timer | null = null;
  const writeAll = db.transaction((rows: [string, number][]) => {
    for (const [key, at] of rows) put.run(key, at);
  });
  const flush = () => {
    if (timer) clearTimeout(timer);
    timer = null;
    if (pending.size === 0) return;
    const rows = [...pending];
    pending.clear();
    writeAll(rows);
    const now = Date.now();
    if (now - lastPrune > 60_000) {
      lastPrune = now;
      prune.run(now - windowMs);
    }
  };

  return {
    has(messageId, recipient, size) {
      const key = keyOf(messageId, recipient, size);
      const at = pending.get(key) ?? find.get(key)?.at;
      return at !== undefined && at >= Date.now() - windowMs;
    },
    add(messageId, recipient, size) {
      pending.set(keyOf(messageId, recipient, size), Date.now());
      if (!timer) {
        timer = setTimeout(flush, FLUSH_EVERY_MS);
        timer.unref?.();
      }
    },
    close() {
      flush();
      db.close();
    },
  };
}
