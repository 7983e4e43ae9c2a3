// The durable spool: messages the host has acknowledged (202) but Dovecot has not taken yet.
// The directory is the truth, as in Postfix's queue:
//
//   tmp/<id>          being written; never acknowledged. Left over after a crash: discarded, logged.
//   queue/<id>        one message: a header (magic + JSON envelope) in a fixed reserved space, then
//                     the exact bytes.
//   queue/<id>.state  retry bookkeeping (attempts, next attempt, last reply); rewritten, not fsynced:
//                     losing it only means an early retry.
//   failed/<id>       given up on (too old, or refused permanently), with failed/<id>.state saying why.
//
// A message is acknowledged only after: written to tmp/, fsynced, renamed into queue/, and the
// queue/ directory fsynced (Maildir's discipline), so a crash at any point either leaves a whole
// message in queue/ or one that was never acknowledged.
//
// Reading never changes the spool: a file in queue/ or failed/ that cannot be read as a spool file
// (damaged, foreign, a directory, a symbolic link, which is never followed) is reported by scan()
// as unreadable and left where it is, for the operator. A read that fails for another reason (out
// of file descriptors, an I/O error) says nothing about the file: scan() reports it apart, as not
// readable now, to be read again. Files and folders are the owner's only
// (0600, 0700): they hold who wrote to whom.

import { chmodSync, closeSync, fsyncSync, mkdirSync, openSync, readdirSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { lstat, readdir, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { SpoolFileDamaged, freshState, isState, readHeader, readJson, type SpoolHeader, type SpoolState } from "./spool-file.ts";
import { StagedMessage } from "./staged-message.ts";

/** A file the CLI drops into the spool directory; the running host's deliverer watches for it. */
export const FLUSH_REQUEST = "flush-requested";
const ID_RE = /^[0-9a-z]{8,40}$/;
const STATE_RE = /^[0-9a-z]{8,40}\.state$/;

/** Whether `s` can name a message in the spool (and so never a path). */
export function isSpoolId(s: string): boolean {
  return ID_RE.test(s);
}
export interface SpoolEntry {
  header: SpoolHeader;
  state: SpoolState;
}

/** Something in queue/ or failed/ that is not a readable spool file: an incident for the operator. */
export interface UnreadableEntry {
  name: string;
  problem: string;
  /** Why it was put in failed/, when its state file says so. */
  reason?: string;
}

export interface SpoolListing {
  entries: SpoolEntry[];
  unreadable: UnreadableEntry[];
  /** Files whose read failed for a reason that may pass (EMFILE, EIO): nothing known about them yet. */
  notReadNow: { name: string; problem: string }[];
}
export type SpoolArea = "queue" | "failed";
function newId(): string {
  // Time first so that ids sort by arrival; random tail so concurrent writers never collide.
  const rnd = crypto.getRandomValues(new Uint8Array(8));
  return Date.now().toString(36).padStart(9, "0") + Array.from(rnd, (b) => b.toString(36).padStart(2, "0")).join("");
}

function fsyncDir(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
export class Spool {
  readonly tmp: string;
  readonly queue: string;
  readonly failed: string;

  constructor(readonly dir: string) {
    this.tmp = join(dir, "tmp");
    this.queue = join(dir, "queue");
    this.failed = join(dir, "failed");
  }

  /**
   * Creates the folders (owner only) and clears tmp/. Whatever is in tmp/ was never acknowledged
   * (the sender was answered 503 or nothing, and retries), so it is removed; each one is reported.
   * Then proves that tmp/ takes a written, fsynced file: a spool on a full or read-only disk
   * throws here, at start-up, instead of at the first message that needs it.
   */
  prepare(): { discarded: string[] } {
    for (const d of [this.tmp, this.queue, this.failed]) {
      mkdirSync(d, { recursive: true, mode: 0o700 });
      // Folders made by an older version were 0755. One this process does not own keeps its mode.
      try {
        chmodSync(d, 0o700);
      } catch {}
    }
    const discarded = readdirSync(this.tmp);
    for (const f of discarded) rmSync(join(this.tmp, f), { recursive: true, force: true });
    this.proveWritable(`write-test-${process.pid}`);
    return { discarded };
  }

  /**
   * Writes and fsyncs a small file in tmp/ under `name`, then removes it; throws when the disk
   * does not take it (full, read-only, not ours). Also the doctor's check, under a name of its own.
   */
  proveWritable(name: string): void {
    const probe = join(this.tmp, name);
    try {
      const fd = openSync(probe, "w", 0o600);
      try {
        const bytes = new TextEncoder().encode("the spool takes writes\n");
        if (writeSync(fd, bytes) !== bytes.byteLength) throw new Error("short write in tmp/ (disk full?)");
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    } finally {
      rmSync(probe, { force: true });
    }
  }

  /** Asks a running host to attempt every queued message now (`queue flush`, `queue retry`). */
  requestFlush(): void {
    writeFileSync(join(this.dir, FLUSH_REQUEST), String(Date.now()), { mode: 0o600 });
  }

  /**
   * Starts a message that may have to be spooled. Nothing touches the disk yet: see StagedMessage.
   * A spool that cannot be written shows at commit(), as SpoolWriteError.
   */
  stage(): StagedMessage {
    const id = newId();
    return new StagedMessage(this, id, join(this.tmp, id));
  }

  /**
   * What an area holds, oldest first: the messages, every other entry (except state files) as
   * unreadable with its problem, and the files that could not be read just now. Only reads:
   * nothing is moved, written or followed.
   */
  async scan(area: SpoolArea = "queue"): Promise<SpoolListing> {
    const dir = this.area(area);
    const names = (await readdir(dir)).filter((n) => !STATE_RE.test(n)).sort();
    const listing: SpoolListing = { entries: [], unreadable: [], notReadNow: [] };
    for (const name of names) {
      if (!ID_RE.test(name)) {
        listing.unreadable.push({ name, problem: "not a spool file (its name is not a spool id)" });
        continue;
      }
      try {
        listing.entries.push(await this.read(name, area));
      } catch (e) {
        // Gone since readdir (delivered and removed meanwhile): nothing to say about it.
        if ((e as NodeJS.ErrnoException).code === "ENOENT") continue;
        if (!(e instanceof SpoolFileDamaged)) {
          listing.notReadNow.push({ name, problem: (e as Error).message });
          continue;
        }
        const reason = ((await readJson(join(dir, `${name}.state`))) as Partial<SpoolState> | undefined)?.reason;
        listing.unreadable.push({ name, problem: (e as Error).message, ...(typeof reason === "string" ? { reason } : {}) });
      }
    }
    return listing;
  }

  /** Every readable message in an area, oldest first (see scan() for the rest). */
  async list(area: SpoolArea = "queue"): Promise<SpoolEntry[]> {
    return (await this.scan(area)).entries;
  }

  async read(id: string, area: SpoolArea = "queue"): Promise<SpoolEntry> {
    if (!ID_RE.test(id)) throw new Error(`not a spool id: ${JSON.stringify(id)}`);
    const dir = this.area(area);
    const { header } = await readHeader(join(dir, id), id);
    // The state is bookkeeping (see the top): a missing or damaged one means "not tried yet"
    // (recipients delivered before are known from the record of deliveries, delivered-log.ts).
    const saved = await readJson(join(dir, `${id}.state`));
    if (isState(saved)) return { header, state: saved };
    const state = freshState(header.to);
    return { header, state: area === "failed" ? { ...state, reason: "not known: its state file is missing or damaged" } : state };
  }

  private area(area: SpoolArea): string {
    return area === "queue" ? this.queue : this.failed;
  }

  /** The message's exact bytes, streamed from disk. */
  async body(id: string): Promise<ReadableStream<Uint8Array>> {
    const path = join(this.queue, id);
    const { bodyAt } = await readHeader(path, id);
    return Bun.file(path).slice(bodyAt).stream();
  }

  async saveState(id: string, state: SpoolState, area: SpoolArea = "queue"): Promise<void> {
    const dir = this.area(area);
    const tmp = join(this.tmp, `${id}.state.${Math.random().toString(36).slice(2)}`);
    try {
      await writeFile(tmp, JSON.stringify(state), { mode: 0o600 });
      await rename(tmp, join(dir, `${id}.state`));
    } catch (e) {
      // On a full disk the file is created and its write fails: left behind, each retry of each
      // queued message would add one, until the inodes run out.
      await rm(tmp, { force: true }).catch(() => {});
      throw e;
    }
  }

  /** Delivered: the message leaves the spool. (If this is lost in a crash, it is delivered again: a duplicate, never a loss.) */
  async remove(id: string): Promise<void> {
    await rm(join(this.queue, `${id}.state`), { force: true });
    await rm(join(this.queue, id), { force: true });
  }

  /** Given up on: kept in failed/ with the reason, never deleted silently. */
  async moveToFailed(id: string, reason: string, state?: SpoolState): Promise<void> {
    const s = state ?? (await this.read(id).then((e) => e.state).catch(() => freshState([])));
    await this.saveState(id, { ...s, reason }, "failed");
    try {
      await rename(join(this.queue, id), join(this.failed, id));
    } catch (e) {
      // No message to go with it (removed meanwhile): leave no reason without a message.
      await rm(join(this.failed, `${id}.state`), { force: true });
      throw e;
    }
    await rm(join(this.queue, `${id}.state`), { force: true });
    fsyncDir(this.failed);
  }

  /** Operator: put a failed message back in the queue for an immediate attempt. */
  async retryFailed(id: string): Promise<void> {
    const { header, state } = await this.read(id, "failed").catch((e: NodeJS.ErrnoException) => {
      throw new Error(e.code === "ENOENT" ? `no message ${id} in failed/` : `${id} in failed/ cannot be read: ${e.message}`);
    });
    // Only the recipients it failed for (not those it was delivered to before it gave up).
    const remaining = state.remaining.length ? state.remaining : header.to;
    await this.saveState(id, freshState(remaining));
    await rename(join(this.failed, id), join(this.queue, id));
    await rm(join(this.failed, `${id}.state`), { force: true });
    fsyncDir(this.queue);
  }

  /**
   * Operator: deletes the messages in failed/ (readable or not) with their state files. A link is
   * removed itself, never what it points to; directories and names that are not the spool's are
   * left alone and reported.
   */
  async purgeFailed(): Promise<{ removed: string[]; skipped: { name: string; why: string }[] }> {
    const removed: string[] = [];
    const skipped: { name: string; why: string }[] = [];
    for (const name of (await readdir(this.failed)).sort()) {
      const isState = STATE_RE.test(name);
      if (!isState && !ID_RE.test(name)) {
        skipped.push({ name, why: "not a spool file (its name is not a spool id)" });
        continue;
      }
      const path = join(this.failed, name);
      const info = await lstat(path).catch((e: NodeJS.ErrnoException) => (e.code === "ENOENT" ? null : Promise.reject(e)));
      if (!info) continue;
      if (info.isDirectory()) {
        skipped.push({ name, why: "a directory (the spool never makes one here)" });
        continue;
      }
      await rm(path, { force: true });
      if (!isState) removed.push(name);
    }
    return { removed, skipped };
  }

  /** Commit step shared by StagedMessage: fsync'd file renamed into queue/, then the directory fsynced. */
  async publish(tmpPath: string, id: string): Promise<void> {
    const path = join(this.queue, id);
    await rename(tmpPath, path);
    try {
      fsyncDir(this.queue);
    } catch (e) {
      // Not known to be durable, so not acknowledged (503, the sender retries): it must not be
      // delivered from queue/ as well.
      await rm(path, { force: true }).catch(() => {});
      throw e;
    }
  }
}
