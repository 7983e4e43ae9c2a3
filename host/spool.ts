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
// as unreadable and left where it is, for the operator. Files and folders are the owner's only
// (0600, 0700): they hold who wrote to whom.

import { chmodSync, closeSync, constants, fsyncSync, mkdirSync, openSync, readdirSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { lstat, open, readdir, rename, rm, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { MAX_RECIPIENTS } from "../shared/contract.ts";

/** A file the CLI drops into the spool directory; the running host's deliverer watches for it. */
export const FLUSH_REQUEST = "flush-requested";
const ID_RE = /^[0-9a-z]{8,40}$/;
const STATE_RE = /^[0-9a-z]{8,40}\.state$/;

/** Whether `s` can name a message in the spool (and so never a path). */
export function isSpoolId(s: string): boolean {
  return ID_RE.test(s);
}

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

/** The state of a message not tried yet (or put back by the operator): due now. */
export function freshState(remaining: string[]): SpoolState {
  return { attempts: 0, next_at: 0, last_reply: null, remaining };
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
}

export type SpoolArea = "queue" | "failed";

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
    const probe = join(this.tmp, `write-test-${process.pid}`);
    const fd = openSync(probe, "w", 0o600);
    try {
      const bytes = new TextEncoder().encode("the spool takes writes\n");
      if (writeSync(fd, bytes) !== bytes.byteLength) throw new Error("short write in tmp/ (disk full?)");
      fsyncSync(fd);
    } finally {
      closeSync(fd);
      rmSync(probe, { force: true });
    }
    return { discarded };
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
   * What an area holds, oldest first: the messages, and every other entry (except state files) as
   * unreadable with its problem. Only reads: nothing is moved, written or followed.
   */
  async scan(area: SpoolArea = "queue"): Promise<SpoolListing> {
    const dir = this.area(area);
    const names = (await readdir(dir)).filter((n) => !STATE_RE.test(n)).sort();
    const listing: SpoolListing = { entries: [], unreadable: [] };
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
    // The state is bookkeeping (see the top): a missing or damaged one means "not tried yet".
    const saved = await readJson(join(dir, `${id}.state`));
    const state = isState(saved) ? saved : freshState(header.to);
    return { header, state };
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
    await writeFile(tmp, JSON.stringify(state), { mode: 0o600 });
    await rename(tmp, join(dir, `${id}.state`));
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
  private phase: Phase = { is: "held", chunks: [] };
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
    if (this.phase.is === "held" && this.bytes <= HELD_BYTES) {
      this.phase.chunks.push(chunk);
      return this.ready as Promise<void>;
    }
    const p = this.ready.then(async () => {
      if (this.phase.is !== "held" && this.phase.is !== "writing") return; // failed, or over
      try {
        await writeFully(await this.file(), chunk, at);
      } catch (e) {
        this.phase = { is: "failed", error: e as Error, fh: this.phase.is === "writing" ? this.phase.fh : null };
      }
    });
    this.ready = p;
    return p;
  }

  /** tmp/<id>, created on first need with what was held so far. */
  private async file(): Promise<FileHandle> {
    if (this.phase.is === "writing") return this.phase.fh;
    if (this.phase.is !== "held") throw new SpoolWriteError(`spool file already ${this.phase.is}`);
    const held = this.phase.chunks;
    let fh: FileHandle;
    try {
      fh = await this.openFile(this.path, "wx", 0o600);
    } catch (e) {
      throw new SpoolWriteError(`spool not writable: ${(e as Error).message}`);
    }
    this.phase = { is: "writing", fh };
    let at = HEADER_RESERVED;
    for (const c of held) {
      await writeFully(fh, c, at);
      at += c.byteLength;
    }
    return fh;
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
    if (this.phase.is === "failed") throw new SpoolWriteError(`spool write failed: ${this.phase.error.message}`);
    if (this.phase.is === "held") return this.phase.chunks.length === 1 ? this.phase.chunks[0]! : Buffer.concat(this.phase.chunks);
    return Bun.file(this.path).slice(HEADER_RESERVED, HEADER_RESERVED + this.bytes).stream();
  }

  /** Durable from here on: only now may the sender be told 2xx. */
  async commit(meta: Omit<SpoolHeader, "id" | "size">): Promise<SpoolHeader> {
    await this.ready;
    if (this.phase.is === "failed") {
      const { error } = this.phase;
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${error.message}`);
    }
    const header: SpoolHeader = { id: this.id, size: this.bytes, ...meta };
    try {
      const line = encodeHeader(header);
      const fh = await this.file();
      await writeFully(fh, line, 0);
      await writeFully(fh, HEADER_END, HEADER_RESERVED - 1);
      await fh.sync();
      this.phase = { is: "closed" };
      await fh.close();
      await this.spool.publish(this.path, this.id);
      this.phase = { is: "committed" };
    } catch (e) {
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${(e as Error).message}`);
    }
    return header;
  }

  /** Forgets the message (never acknowledged). After a commit there is nothing to discard. */
  async discard(): Promise<void> {
    await this.ready;
    const was = this.phase;
    if (was.is === "committed" || was.is === "discarded") return;
    this.phase = { is: "discarded" };
    const fh = was.is === "writing" || was.is === "failed" ? was.fh : null;
    if (fh) await fh.close().catch(() => {});
    // Nothing reached the disk while the message was held, or when tmp/<id> could not be opened.
    if (was.is === "held" || (was.is === "failed" && !fh)) return;
    await rm(this.path, { force: true }).catch(() => {});
  }
}

/**
 * Where a StagedMessage is: held in memory (the first HELD_BYTES), then written to tmp/<id>
 * (the file open), "failed" once a write did not complete (only discard() is left), "closed"
 * while commit() publishes the fsynced file, and at last committed or discarded.
 */
type Phase =
  | { is: "held"; chunks: Uint8Array[] }
  | { is: "writing"; fh: FileHandle }
  | { is: "failed"; error: Error; fh: FileHandle | null }
  | { is: "closed" }
  | { is: "committed" }
  | { is: "discarded" };

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

// The header has a fixed reserved space so the body can be written first, at its final offset,
// while it streams; the envelope is filled in at commit. Layout, in bytes:
//
//   [0, n)                       "RELAY-SPOOL 2 " + the header as JSON (UTF-8) + "\n"
//   [n, HEADER_RESERVED - 1)     zeros, never written (a hole in the file: no disk used)
//   HEADER_RESERVED - 1          "\n"
//   HEADER_RESERVED ...          the message, exactly as received
//
// Everything is measured in bytes: JSON.stringify writes non-ASCII characters as they are (1 to 3
// bytes per UTF-16 code unit in UTF-8), and a lone surrogate or a control character as a 6-byte
// "\uXXXX" escape, so a header is at most 6 bytes per code unit of its strings. The reserved space
// holds the largest envelope the contract allows at that worst rate: 100 recipients and the sender
// of 254 code units each (contract.ts, addressProblem), a Message-ID of 998 (message-headers.ts)
// and a request id of 255 (hono's requestId). A header that does not fit anyway is refused at
// commit (SpoolWriteError: the sender gets 503), never written over the message.
const MAGIC = "RELAY-SPOOL 2 ";
const MAX_ADDRESS_UNITS = 254;
const MAX_MESSAGE_ID_UNITS = 998;
const MAX_REQUEST_ID_UNITS = 255;
const jsonStringBytes = (units: number) => 2 + 6 * units;
const HEADER_MAX_BYTES =
  MAGIC.length +
  (MAX_RECIPIENTS + 1) * (jsonStringBytes(MAX_ADDRESS_UNITS) + 1) +
  jsonStringBytes(MAX_MESSAGE_ID_UNITS) +
  jsonStringBytes(MAX_REQUEST_ID_UNITS) +
  512 + // field names, the id, numbers, punctuation
  2; // the line's "\n" and the final "\n"
/** 160 KiB. */
export const HEADER_RESERVED = Math.ceil(HEADER_MAX_BYTES / 4096) * 4096;
const HEADER_END = new Uint8Array([0x0a]);

// Files written before the header was sized in bytes: 32 KiB, the JSON padded with spaces up to
// a "\n" in the last byte. Still read, so that an upgrade delivers what an older host spooled.
const MAGIC_V1 = "RELAY-SPOOL 1 ";
const HEADER_RESERVED_V1 = 32 * 1024;

/** How much of a message is held in memory before it goes to tmp/ (per delivery under way). */
export const HELD_BYTES = 1024 * 1024;

/** The header's bytes from offset 0 (the "\n" at HEADER_RESERVED - 1 is written apart). */
export function encodeHeader(h: SpoolHeader): Uint8Array {
  const line = new TextEncoder().encode(`${MAGIC}${JSON.stringify(h)}\n`);
  if (line.byteLength > HEADER_RESERVED - 1) throw new SpoolWriteError(`spool header too large: ${line.byteLength} bytes, at most ${HEADER_RESERVED - 1}`);
  return line;
}

const NO_FOLLOW = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** Why a path is not a regular file (never following a link), or null. ENOENT passes through. */
async function notAFile(path: string): Promise<string | null> {
  const info = await lstat(path);
  if (info.isFile()) return null;
  if (info.isSymbolicLink()) return "a symbolic link, not a spool file (not followed)";
  if (info.isDirectory()) return "a directory, not a spool file";
  return "not a regular file";
}

async function readAt(fh: FileHandle, position: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return buf.subarray(0, got);
}

const startsWith = (bytes: Uint8Array, ascii: string) => bytes.byteLength >= ascii.length && Buffer.from(bytes.buffer, bytes.byteOffset, ascii.length).toString("latin1") === ascii;

/**
 * Reads and checks a spool file's header; every way it can be wrong is an Error saying which.
 * `bodyAt`: where the message starts, which depends on the file's version (HEADER_RESERVED, or
 * 32 KiB in a file an older host wrote).
 */
async function readHeader(path: string, id: string): Promise<{ header: SpoolHeader; bodyAt: number }> {
  const problem = await notAFile(path);
  if (problem) throw new Error(problem);
  const fh = await open(path, NO_FOLLOW);
  try {
    const { size } = await fh.stat();
    let head = await readAt(fh, 0, Math.min(size, 4096));
    const version = startsWith(head, MAGIC) ? 2 : startsWith(head, MAGIC_V1) ? 1 : 0;
    if (!version) throw new Error("not a spool file (no spool header)");
    const reserved = version === 2 ? HEADER_RESERVED : HEADER_RESERVED_V1;
    if (size < reserved) throw new Error(`truncated inside its header (${size} of at least ${reserved} bytes)`);
    let end = head.indexOf(0x0a);
    if (end === -1) {
      head = await readAt(fh, 0, reserved);
      end = head.indexOf(0x0a);
    }
    // The line ends inside the reserved space, and its last byte is the "\n" that closes it.
    const last = end === reserved - 1 ? 0x0a : (await readAt(fh, reserved - 1, 1))[0];
    if (end === -1 || last !== 0x0a || (version === 1 && end !== reserved - 1)) throw new Error("damaged header (it overruns its reserved space)");
    let json = head.subarray(version === 2 ? MAGIC.length : MAGIC_V1.length, end);
    if (version === 1) while (json.byteLength && json[json.byteLength - 1] === 0x20) json = json.subarray(0, -1);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
    } catch (e) {
      throw new Error(`damaged header (${(e as Error).message})`);
    }
    const bad = headerProblem(header, id);
    if (bad) throw new Error(`damaged header (${bad})`);
    const h = header as SpoolHeader;
    if (size !== reserved + h.size) throw new Error(`truncated: ${size - reserved} of ${h.size} bytes`);
    return { header: h, bodyAt: reserved };
  } finally {
    await fh.close();
  }
}

function headerProblem(h: unknown, id: string): string | null {
  if (typeof h !== "object" || h === null) return "not an object";
  const o = h as Record<string, unknown>;
  if (o.id !== id) return `its id is ${JSON.stringify(o.id)}, not the file's name`;
  if (typeof o.from !== "string") return "no sender";
  if (!Array.isArray(o.to) || o.to.length === 0 || !o.to.every((t) => typeof t === "string")) return "no recipients";
  if (!Number.isSafeInteger(o.size) || (o.size as number) < 0) return "no size";
  if (typeof o.received_at !== "number") return "no arrival time";
  if (o.message_id !== undefined && o.message_id !== null && typeof o.message_id !== "string") return "a Message-ID that is not a string";
  if (o.request_id !== undefined && typeof o.request_id !== "string") return "a request id that is not a string";
  return null;
}

function isState(s: unknown): s is SpoolState {
  if (typeof s !== "object" || s === null) return false;
  const o = s as Record<string, unknown>;
  return (
    typeof o.attempts === "number" &&
    typeof o.next_at === "number" &&
    (o.last_reply === null || typeof o.last_reply === "string") &&
    Array.isArray(o.remaining) &&
    o.remaining.every((r) => typeof r === "string")
  );
}

/** A small JSON file (a state file), not following links; undefined if it cannot be read. */
async function readJson(path: string): Promise<unknown> {
  try {
    if (await notAFile(path)) return undefined;
    const fh = await open(path, NO_FOLLOW);
    try {
      return JSON.parse(await fh.readFile("utf8"));
    } finally {
      await fh.close();
    }
  } catch {
    return undefined;
  }
}
