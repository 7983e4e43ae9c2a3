// One spool file on disk (spool.ts says which folder it is in): the header's layout in bytes,
// writing it, reading and checking it back, and the state file beside it. Reading never follows
// a symbolic link.

import { constants } from "node:fs";
import { lstat, open, type FileHandle } from "node:fs/promises";
import { MAX_RECIPIENTS } from "../shared/contract.ts";

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
export class SpoolWriteError extends Error {
  override name = "SpoolWriteError";
}

/**
 * What was read is not a whole spool file (damaged, truncated, foreign, a link, a directory): an
 * incident for the operator, never retried. Any other error of a read (EMFILE, ENFILE, EIO, ...)
 * says nothing about the file and may pass: reading it is tried again.
 */
export class SpoolFileDamaged extends Error {
  override name = "SpoolFileDamaged";
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
export const HEADER_END = new Uint8Array([0x0a]);

// Files written before the header was sized in bytes: 32 KiB, the JSON padded with spaces up to
// a "\n" in the last byte. Still read, so that an upgrade delivers what an older host spooled.
const MAGIC_V1 = "RELAY-SPOOL 1 ";
const HEADER_RESERVED_V1 = 32 * 1024;
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
 * Reads and checks a spool file's header; every way it can be wrong is a SpoolFileDamaged saying
 * which (a failed read is thrown as it is).
 * `bodyAt`: where the message starts, which depends on the file's version (HEADER_RESERVED, or
 * 32 KiB in a file an older host wrote).
 */
export async function readHeader(path: string, id: string): Promise<{ header: SpoolHeader; bodyAt: number }> {
  const problem = await notAFile(path);
  if (problem) throw new SpoolFileDamaged(problem);
  const fh = await open(path, NO_FOLLOW).catch((e: NodeJS.ErrnoException) => {
    // Replaced by a link since lstat(): O_NOFOLLOW refuses it.
    throw e.code === "ELOOP" ? new SpoolFileDamaged("a symbolic link, not a spool file (not followed)") : e;
  });
  try {
    const { size } = await fh.stat();
    let head = await readAt(fh, 0, Math.min(size, 4096));
    const version = startsWith(head, MAGIC) ? 2 : startsWith(head, MAGIC_V1) ? 1 : 0;
    if (!version) throw new SpoolFileDamaged("not a spool file (no spool header)");
    const reserved = version === 2 ? HEADER_RESERVED : HEADER_RESERVED_V1;
    if (size < reserved) throw new SpoolFileDamaged(`truncated inside its header (${size} of at least ${reserved} bytes)`);
    let end = head.indexOf(0x0a);
    if (end === -1) {
      head = await readAt(fh, 0, reserved);
      end = head.indexOf(0x0a);
    }
    // The line ends inside the reserved space, and its last byte is the "\n" that closes it.
    const last = end === reserved - 1 ? 0x0a : (await readAt(fh, reserved - 1, 1))[0];
    if (end === -1 || last !== 0x0a || (version === 1 && end !== reserved - 1)) throw new SpoolFileDamaged("damaged header (it overruns its reserved space)");
    let json = head.subarray(version === 2 ? MAGIC.length : MAGIC_V1.length, end);
    if (version === 1) while (json.byteLength && json[json.byteLength - 1] === 0x20) json = json.subarray(0, -1);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
    } catch (e) {
      throw new SpoolFileDamaged(`damaged header (${(e as Error).message})`);
    }
    const bad = headerProblem(header, id);
    if (bad) throw new SpoolFileDamaged(`damaged header (${bad})`);
    const h = header as SpoolHeader;
    if (size !== reserved + h.size) throw new SpoolFileDamaged(`truncated: ${size - reserved} of ${h.size} bytes`);
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

/**
 * Whether a state file's JSON is a SpoolState, optional fields included: a state of another shape
 * (`refused: {}`, a `reason` that is a number) would fail whatever reads it later, after a
 * delivery, and so become a retry of a message already delivered.
 */
export function isState(s: unknown): s is SpoolState {
  if (typeof s !== "object" || s === null) return false;
  const o = s as Record<string, unknown>;
  return (
    Number.isSafeInteger(o.attempts) &&
    (o.attempts as number) >= 0 &&
    typeof o.next_at === "number" &&
    Number.isFinite(o.next_at) &&
    (o.last_reply === null || typeof o.last_reply === "string") &&
    isStringArray(o.remaining) &&
    (o.refused === undefined || (Array.isArray(o.refused) && o.refused.every((r) => typeof r === "object" && r !== null && typeof r.address === "string" && typeof r.reply === "string"))) &&
    (o.reason === undefined || typeof o.reason === "string")
  );
}

const isStringArray = (a: unknown): a is string[] => Array.isArray(a) && a.every((r) => typeof r === "string");

/** A small JSON file (a state file), not following links; undefined if it cannot be read. */
export async function readJson(path: string): Promise<unknown> {
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

/**
 * Writes all of `bytes` at `at`, or throws. On a full disk a write can take only part of what it
 * was given and report that without an error: the rest is written again (and then fails with
 * ENOSPC), never left as a hole of zeros in the message.
 */
export async function writeFully(fh: FileHandle, bytes: Uint8Array, at: number): Promise<void> {
  for (let done = 0; done < bytes.byteLength; ) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.byteLength - done, at + done);
    if (!(bytesWritten > 0)) throw new Error(`short write: ${done} of ${bytes.byteLength} bytes written`);
    done += bytesWritten;
  }
}
