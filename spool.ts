// The durable spool: messages the host has acknowledged (202) but Dovecot has not taken yet.
// The directory is the truth, as in Postfix's queue:
//
//   tmp/<id>          being written; never acknowledged. Left over after a crash: discarded, logged.
//   queue/<id>        one message: a header line (magic + JSON envelope) then the exact bytes.
//   queue/<id>.state  retry bookkeeping (attempts, next attempt, last reply); rewritten, not fsynced:
//                     losing it only means an early retry.
//   failed/<id>       given up on (too old, or refused permanently), with failed/<id>.state saying why.
//
// A message is acknowledged only after: written to tmp/, fsynced, renamed into queue/, and the
// queue/ directory fsynced (Maildir's discipline), so a crash at any point either leaves a whole
// message in queue/ or one that was never acknowledged.

import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { open, readFile, readdir, rename, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";

const MAGIC = "RELAY-SPOOL 1 ";
/** A file the CLI drops into the spool directory; the running host's deliverer watches for it. */
export const FLUSH_REQUEST = "flush-requested";
const ID_RE = /^[0-9a-z]{8,40}$/;

export interface SpooledEnvelope {
  from: string;
  to: string[];
}

/** Written once with the message; never changes. */
export interface SpoolHeader extends SpooledEnvelope {
  id: string;
  received_at: number;
  size: number;
  request_id?: string;
  message_id?: string | null;
  /** SHA-256 of the message bytes (hex): with message_id, the record of its delivery (delivered-log.ts). */
  sha256?: string;
}

/** Retry bookkeeping; changes with each attempt. */
export interface SpoolState {
  attempts: number;
  next_at: number;
  last_reply: string | null;
  /** Recipients still to deliver (a subset of the header's `to` after partial success). */
  remaining: string[];
  /** Recipients refused for good (5xx) while others were still to do. */
  refused?: { address: string; reply: string }[];
  /** Why a message is in failed/. */
  reason?: string;
}

export interface SpoolEntry {
  header: SpoolHeader;
  state: SpoolState;
}

export class SpoolWriteError extends Error {
  override name = "SpoolWriteError";
}

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
   * Creates the folders and clears tmp/. Whatever is in tmp/ was never acknowledged (the
   * sender was answered 503 or nothing, and retries), so it is removed; each one is reported.
   */
  prepare(): { discarded: string[] } {
    for (const d of [this.tmp, this.queue, this.failed]) mkdirSync(d, { recursive: true });
    const discarded = readdirSync(this.tmp);
    for (const f of discarded) rmSync(join(this.tmp, f), { force: true });
    return { discarded };
  }

  /** Asks a running host to attempt every queued message now (`queue flush`, `queue retry`). */
  requestFlush(): void {
    writeFileSync(join(this.dir, FLUSH_REQUEST), String(Date.now()));
  }

  /**
   * Starts a message that may have to be spooled. Nothing touches the disk yet: see StagedMessage.
   * A spool that cannot be written shows at commit(), as SpoolWriteError.
   */
  stage(): StagedMessage {
    const id = newId();
    return new StagedMessage(this, id, join(this.tmp, id));
  }

  /** Every queued message, oldest first. Files that do not parse are moved to failed/. */
  async list(area: "queue" | "failed" = "queue"): Promise<SpoolEntry[]> {
    const dir = area === "queue" ? this.queue : this.failed;
    const names = (await readdir(dir)).filter((n) => ID_RE.test(n)).sort();
    const out: SpoolEntry[] = [];
    for (const id of names) {
      const entry = await this.read(id, area).catch(async (e: NodeJS.ErrnoException) => {
        // Gone since readdir (delivered and removed meanwhile): nothing to say about it.
        if (e.code === "ENOENT") return null;
        if (area === "queue") await this.moveToFailed(id, `unreadable spool file: ${e.message}`).catch(() => {});
        return null;
      });
      if (entry) out.push(entry);
    }
    return out;
  }

  async read(id: string, area: "queue" | "failed" = "queue"): Promise<SpoolEntry> {
    const dir = area === "queue" ? this.queue : this.failed;
    const { header } = await readHeader(join(dir, id));
    const state = await readFile(join(dir, `${id}.state`), "utf8")
      .then((s) => JSON.parse(s) as SpoolState)
      .catch(() => ({ attempts: 0, next_at: 0, last_reply: null, remaining: header.to }));
    return { header, state };
  }

  /** The message's exact bytes, streamed from disk. */
  async body(id: string): Promise<ReadableStream<Uint8Array>> {
    const path = join(this.queue, id);
    const { offset } = await readHeader(path);
    return Bun.file(path).slice(offset).stream();
  }

  async saveState(id: string, state: SpoolState, area: "queue" | "failed" = "queue"): Promise<void> {
    const dir = area === "queue" ? this.queue : this.failed;
    const tmp = join(this.tmp, `${id}.state.${Math.random().toString(36).slice(2)}`);
    await writeFile(tmp, JSON.stringify(state));
    await rename(tmp, join(dir, `${id}.state`));
  }

  /** Delivered: the message leaves the spool. (If this is lost in a crash, it is delivered again: a duplicate, never a loss.) */
  async remove(id: string): Promise<void> {
    await rm(join(this.queue, `${id}.state`), { force: true });
    await rm(join(this.queue, id), { force: true });
  }

  /** Given up on: kept in failed/ with the reason, never deleted silently. */
  async moveToFailed(id: string, reason: string, state?: SpoolState): Promise<void> {
    const s = state ?? (await this.read(id).then((e) => e.state).catch(() => ({ attempts: 0, next_at: 0, last_reply: null, remaining: [] })));
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
    if (!ID_RE.test(id)) throw new Error(`not a spool id: ${id}`);
    const { header, state } = await this.read(id, "failed");
    // Only the recipients it failed for (not those it was delivered to before it gave up).
    const remaining = state.remaining.length ? state.remaining : header.to;
    await this.saveState(id, { attempts: 0, next_at: 0, last_reply: null, remaining });
    await rename(join(this.failed, id), join(this.queue, id));
    await rm(join(this.failed, `${id}.state`), { force: true });
    fsyncDir(this.queue);
  }

  async purgeFailed(): Promise<number> {
    const names = (await readdir(this.failed)).filter((n) => ID_RE.test(n));
    for (const id of names) {
      await rm(join(this.failed, id), { force: true });
      await rm(join(this.failed, `${id}.state`), { force: true });
    }
    return names.length;
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

/** How a StagedMessage opens its file (node:fs/promises' open; tests hand in a faulty one). */
export type OpenFile = (path: string, flags: string, mode: number) => Promise<FileHandle>;

/**
 * A message being received, before the host tries LMTP, kept so that it can be spooled if LMTP
 * fails. The first HELD_BYTES stay in memory; a larger message goes on into tmp/<id> as it
 * arrives (memory stays bounded). Most messages are delivered at once and small, so most never
 * touch the disk here. content() gives the bytes back for LMTP; commit() makes them durable and
 * visible in queue/; discard() forgets them.
 */
export class StagedMessage {
  private bytes = 0;
  /** The chunks so far, while the message is held in memory; null once it is in tmp/. */
  private held: Uint8Array[] | null = [];
  private fh: FileHandle | null = null;
  private failed: Error | null = null;
  /** The file is closed (committed, or being given up). */
  private closed = false;
  private committed = false;
  private discarded = false;
  private ready: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly spool: Spool,
    readonly id: string,
    private readonly path: string,
    private readonly openFile: OpenFile = open,
  ) {}

  /** Appends a chunk (in order). A write error is remembered and surfaces at commit(). */
  write(chunk: Uint8Array): Promise<void> {
    const at = HEADER_RESERVED + this.bytes;
    this.bytes += chunk.byteLength;
    if (this.held && this.bytes <= HELD_BYTES) {
      this.held.push(chunk);
      return this.ready as Promise<void>;
    }
    const p = this.ready.then(async () => {
      if (this.failed) return;
      try {
        await writeFully(await this.file(), chunk, at);
      } catch (e) {
        this.failed = e as Error;
      }
    });
    this.ready = p;
    return p;
  }

  /** tmp/<id>, created on first need with what was held so far. */
  private async file(): Promise<FileHandle> {
    if (this.fh) return this.fh;
    const held = this.held ?? [];
    this.held = null;
    try {
      this.fh = await this.openFile(this.path, "wx", 0o600);
    } catch (e) {
      throw new SpoolWriteError(`spool not writable: ${(e as Error).message}`);
    }
    let at = HEADER_RESERVED;
    for (const c of held) {
      await writeFully(this.fh, c, at);
      at += c.byteLength;
    }
    return this.fh;
  }

  get size(): number {
    return this.bytes;
  }

  /**
   * Everything written so far, for LMTP: the bytes themselves when they are held in memory,
   * otherwise a stream of them from tmp/. A message that could not be written to tmp/ cannot be
   * delivered either (it is not held anywhere): SpoolWriteError.
   */
  async content(): Promise<Uint8Array | ReadableStream<Uint8Array>> {
    await this.ready;
    if (this.failed) throw new SpoolWriteError(`spool write failed: ${this.failed.message}`);
    if (this.held) return this.held.length === 1 ? this.held[0]! : Buffer.concat(this.held);
    return Bun.file(this.path).slice(HEADER_RESERVED, HEADER_RESERVED + this.bytes).stream();
  }

  /** Durable from here on: only now may the sender be told 2xx. */
  async commit(meta: Omit<SpoolHeader, "id" | "size">): Promise<SpoolHeader> {
    await this.ready;
    if (this.failed) {
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${this.failed.message}`);
    }
    const header: SpoolHeader = { id: this.id, size: this.bytes, ...meta };
    try {
      const line = encodeHeader(header);
      const fh = await this.file();
      await writeFully(fh, line, 0);
      await fh.sync();
      this.closed = true;
      await fh.close();
      await this.spool.publish(this.path, this.id);
      this.committed = true;
    } catch (e) {
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${(e as Error).message}`);
    }
    return header;
  }

  /** Forgets the message (never acknowledged). After a commit there is nothing to discard. */
  async discard(): Promise<void> {
    if (this.committed || this.discarded) return;
    this.discarded = true;
    await this.ready;
    this.held = null;
    if (!this.fh) return; // never reached the disk
    if (!this.closed) {
      this.closed = true;
      await this.fh.close().catch(() => {});
    }
    await rm(this.path, { force: true }).catch(() => {});
  }
}

/**
 * Writes all of `bytes` at `at`, or throws. On a full disk a write can take only part of what it
 * was given and report that without an error: the rest is written again (and then fails with
 * ENOSPC), never left as a hole of zeros in the message.
 */
async function writeFully(fh: FileHandle, bytes: Uint8Array, at: number): Promise<void> {
  for (let done = 0; done < bytes.byteLength; ) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.byteLength - done, at + done);
    if (!(bytesWritten > 0)) throw new Error(`short write: ${done} of ${bytes.byteLength} bytes written`);
    done += bytesWritten;
  }
}

// The header line is padded with spaces to a fixed size so the body can be written first, at its
// final offset, while it streams; the envelope is filled in at commit. 32 KiB holds the largest
// envelope the contract allows (100 recipients of 254 characters).
const HEADER_RESERVED = 32 * 1024;

/** How much of a message is held in memory before it goes to tmp/ (per delivery under way). */
export const HELD_BYTES = 1024 * 1024;

function encodeHeader(h: SpoolHeader): Uint8Array {
  const json = JSON.stringify(h);
  const line = MAGIC + json;
  if (line.length + 1 > HEADER_RESERVED) throw new SpoolWriteError("spool header too large");
  return new TextEncoder().encode(line.padEnd(HEADER_RESERVED - 1, " ") + "\n");
}

async function readHeader(path: string): Promise<{ header: SpoolHeader; offset: number }> {
  const fh = await open(path, "r");
  try {
    const buf = new Uint8Array(HEADER_RESERVED);
    const { bytesRead } = await fh.read(buf, 0, HEADER_RESERVED, 0);
    const text = new TextDecoder().decode(buf.subarray(0, bytesRead));
    if (!text.startsWith(MAGIC) || text[HEADER_RESERVED - 1] !== "\n") throw new Error("not a spool file");
    const header = JSON.parse(text.slice(MAGIC.length, HEADER_RESERVED - 1).trimEnd()) as SpoolHeader;
    const { size } = await stat(path);
    if (size !== HEADER_RESERVED + header.size) throw new Error(`truncated: ${size - HEADER_RESERVED} of ${header.size} bytes`);
    return { header, offset: HEADER_RESERVED };
  } finally {
    await fh.close();
  }
}
