// The edge spool: messages the Worker accepted while the host could not take them, kept in an R2
// bucket (binding EDGE_SPOOL) until the drain (edge/drain.ts) hands them to the host. Layout:
//   queue/<id>          the message's exact bytes; its envelope and history in customMetadata
//   queue/<id>.retry    (empty) the drain's attempts: count, next attempt, last reply
//   failed/<id>         a message given up on, bytes and everything known; kept 30 days
//   known/<address>     (empty) the host delivered mail for this address; uploaded = when last seen
//   held                (a random token) the cheap check (a HEAD, class B) that lets idle cron runs and
//                       healthy deliveries skip a LIST (class A): present from the first hold on;
//                       its metadata says whether anything is held, when the next is due, and
//                       whether the host was away at the last attempt. Written by every hold, and
//                       by a drain only conditionally (on the ETag it read before its listing), so
//                       a hold meanwhile is never overwritten and a drain cut off leaves it "held"
//   drain.lock          (a random token) one drain at a time (a conditional put), with a short lease
// Ids start with the time received, so key order is arrival order. Runtime-neutral: the R2 API
// is declared structurally here (what workerd's binding offers; tests give an in-memory one).
// Every call goes through r2(), which counts it in the invocation's Budget (edge/budget.ts) and
// by R2's price class.

import { Budget } from "./budget.ts";

export interface R2ObjectLike {
  key: string;
  size: number;
  etag: string;
  uploaded: Date;
  customMetadata?: Record<string, string>;
}
export interface R2ObjectBodyLike extends R2ObjectLike {
  body: ReadableStream<Uint8Array>;
}
export interface R2PutOptionsLike {
  customMetadata?: Record<string, string>;
  onlyIf?: { etagMatches?: string; etagDoesNotMatch?: string };
}
export interface R2BucketLike {
  head(key: string): Promise<R2ObjectLike | null>;
  get(key: string, options?: { range?: { offset?: number; length?: number } }): Promise<R2ObjectBodyLike | null>;
  put(key: string, value: ReadableStream<Uint8Array> | Uint8Array | string | null, options?: R2PutOptionsLike): Promise<R2ObjectLike | null>;
  delete(keys: string | string[]): Promise<void>;
  list(options: { prefix?: string; cursor?: string; limit?: number; include?: "customMetadata"[] }): Promise<{ objects: R2ObjectLike[]; truncated: boolean; cursor?: string }>;
}

export const MINUTE = 60_000;
export const HOUR = 60 * MINUTE;
export const DAY = 24 * HOUR;
/** An address the host accepted mail for within this long is "known": mail for it may be held. */
export const KNOWN_FOR_MS = 60 * DAY;
/** known/<address> is rewritten at most this often while mail for it keeps arriving. */
const KNOWN_REFRESH_MS = DAY;
/** failed/ keeps a message this long. */
export const FAILED_KEPT_MS = 30 * DAY;
/**
 * A message held because the host gave no answer (a timeout, a connection lost mid-request) may
 * still be on its way into Dovecot there: the host's own limit per delivery is 20 s. It is not
 * offered again before this, so that the second copy finds the first one recorded (duplicate).
 */
export const NO_ANSWER_GRACE_MS = 30_000;
/** How long the replies kept in metadata may be, before the whole is fitted into MAX_METADATA_BYTES. */
const MAX_REPLY = 400;
/**
 * R2's custom metadata per object: keys and values together, a character below U+0100 counting
 * one byte and a string with any other character two per character (local R2, miniflare,
 * refuses more; Cloudflare's limits page gives 8 KiB for all metadata, so this is the stricter).
 */
export const MAX_METADATA_BYTES = 2048;
/**
 * A held message's envelope may take this much of its metadata as written there (ASCII JSON, a
 * character outside ASCII as \uXXXX: 6 bytes); the rest is for its times and replies, which
 * are shortened to fit. A longer envelope (about 100 characters outside ASCII in each address)
 * is not held: the sender retries, as without the spool.
 */
export const MAX_ENVELOPE_METADATA = 1200;

/** What is known of a held message (queue/<id>'s metadata, with the drain's state). */
export interface HeldMessage {
  id: string;
  from: string;
  to: string;
  size: number;
  /** When the Worker accepted it (ms). */
  received: number;
  /** Start of the period EDGE_SPOOL_MAX_AGE_HOURS counts from: received, or when it was retried. */
  since: number;
  /** Why it was held: the live attempt's answer. */
  reason: string;
  /** "notice": a notice to POSTMASTER (never the subject of another notice). */
  kind: "mail" | "notice";
  /** The host gave no answer: it may have the message already (see NO_ANSWER_GRACE_MS). */
  noAnswer: boolean;
  /** For a notice: the id of the message it is about. */
  noticeFor?: string;
  attempts: number;
  /** Not attempted before this (ms), unless the host has just confirmed another message and the last failure was not this message's own. */
  next: number;
  /** The last failure was this message's own: the host was up (it answered for this message, or confirmed others in the same run). */
  specific: boolean;
  lastReply: string;
}

export interface FailedMessage extends HeldMessage {
  failed: number;
  why: "refused" | "expired";
}

/** Metadata values as ASCII JSON: R2 keeps them as HTTP header values. */
const asciiJson = (value: object) => JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
const metadataBytes = (m: Record<string, string>) => Object.entries(m).reduce((n, [k, v]) => n + k.length + v.length, 0);

/**
 * `value` as metadata that R2 takes, whatever its texts: the longest of `shortenable` is halved
 * until the whole fits. Throws only when it cannot fit with those empty (an envelope that hold()
 * would have refused).
 */
function encode<T extends object>(value: T, shortenable: (keyof T & string)[] = []): Record<string, string> {
  const v = { ...value } as Record<string, unknown>;
  for (;;) {
    const m = { m: asciiJson(v) };
    if (metadataBytes(m) <= MAX_METADATA_BYTES) return m;
    const longest = shortenable.filter((k) => typeof v[k] === "string" && (v[k] as string).length > 0).sort((a, b) => (v[b] as string).length - (v[a] as string).length)[0];
    if (!longest) throw new Error(`the edge spool's metadata would take ${metadataBytes(m)} bytes, more than R2's ${MAX_METADATA_BYTES}`);
    const text = v[longest] as string;
    v[longest] = text.length <= 8 ? "" : clip(text, Math.floor(text.length / 2));
  }
}
function decode<T>(o: R2ObjectLike): T | null {
  try {
    return JSON.parse(o.customMetadata?.m ?? "null") as T | null;
  } catch {
    return null;
  }
}

/** Why an envelope cannot be held (too long for R2's metadata), or null. */
export function envelopeTooLong(from: string, to: string): string | null {
  const bytes = asciiJson({ from, to }).length;
  return bytes > MAX_ENVELOPE_METADATA ? `the envelope takes ${bytes} bytes as R2 metadata, more than the ${MAX_ENVELOPE_METADATA} the edge spool keeps for it` : null;
}

export const clip = (s: string, n = MAX_REPLY) => (s.length > n ? `${s.slice(0, Math.max(0, n - 3))}...` : s);

export function newId(now = Date.now()): string {
  const time = new Date(now).toISOString().replace(/[-:.]/g, "");
  const rand = [...crypto.getRandomValues(new Uint8Array(4))].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${time}-${rand}`;
}

const ID = /^\d{8}T\d{9}Z-[0-9a-f]{8}$/;
export const isId = (id: string) => ID.test(id);

const queueKey = (id: string) => `queue/${id}`;
const retryKey = (id: string) => `queue/${id}.retry`;
const failedKey = (id: string) => `failed/${id}`;
const knownKey = (address: string) => `known/${address.toLowerCase()}`;
const HELD = "held";
const LOCK = "drain.lock";

/**
 * workerd's R2 put needs the length of a stream up front: FixedLengthStream tells it (and fails
 * the put if the stream ends short or runs long). Elsewhere (Bun's tests) the stream as is.
 */
export function sized(body: ReadableStream<Uint8Array>, size: number): ReadableStream<Uint8Array> {
  const Fixed = (globalThis as { FixedLengthStream?: new (n: number) => TransformStream<Uint8Array, Uint8Array> }).FixedLengthStream;
  return Fixed ? body.pipeThrough(new Fixed(size)) : body;
}

/** What the `held` marker says (its metadata), with the ETag a drain's conditional write needs. */
export interface Marker {
  etag: string;
  /** Nothing is held (a drain emptied queue/ and nothing was held since). */
  empty: boolean;
  /** When the next held message may be offered (ms); 0: now. */
  due: number;
  /** The host was away at the last attempt: the cron offers one message a minute, whatever `due`. */
  probe: boolean;
}
/** What a drain leaves in the marker when its run ends. */
export type MarkerState = { empty: true } | { empty: false; due: number; probe: boolean };

/**
 * The body of every write of `held` and drain.lock. R2's ETag is the MD5 of the body: were it
 * empty, every version would have the same ETag, and a conditional write could not tell whether
 * anyone wrote in between (a metadata change leaves it as it was).
 */
const unique = () => crypto.randomUUID();

/** A drain's hold on drain.lock: its ETag (the token a chained run takes it over with) and lease. */
export interface Lease {
  etag: string;
  until: number;
}
/** Within this much of its end, a lease is not released by a delete: another drain may own it by then. */
const LEASE_MARGIN_MS = 5_000;

/** R2's price classes: A (put, list), B (get, head); delete is free. */
export interface R2Ops {
  A: number;
  B: number;
  free: number;
}

/**
 * The bucket, with every call counted in the invocation's budget (a drain starts new work only
 * when its worst case fits) and by R2's price class.
 */
export class EdgeSpool {
  readonly ops: R2Ops = { A: 0, B: 0, free: 0 };
  /** Per bucket, the addresses this isolate has recorded in known/ lately (saves a HEAD per delivery). */
  private static knownHere = new WeakMap<R2BucketLike, Map<string, number>>();
  private readonly known: Map<string, number>;

  constructor(
    readonly bucket: R2BucketLike,
    readonly budget: Budget = new Budget(Infinity),
  ) {
    let known = EdgeSpool.knownHere.get(bucket);
    if (!known) EdgeSpool.knownHere.set(bucket, (known = new Map()));
    this.known = known;
  }

  private r2(cls: keyof R2Ops): R2BucketLike {
    this.budget.spend();
    this.ops[cls]++;
    return this.bucket;
  }

  // --- known recipients ---------------------------------------------------------------------

  /**
   * The host delivered mail for `address`: remember it. One write for a new address, then at
   * most one a day while its mail keeps coming (its 60 days count from the last); true if written.
   */
  async learn(address: string, now = Date.now()): Promise<boolean> {
    const key = address.toLowerCase();
    const seen = this.known.get(key);
    if (seen !== undefined && now - seen < KNOWN_REFRESH_MS) return false;
    const head = await this.r2("B").head(knownKey(key));
    const fresh = head !== null && now - head.uploaded.getTime() < KNOWN_REFRESH_MS;
    if (!fresh) await this.r2("A").put(knownKey(key), "");
    this.known.set(key, fresh ? head.uploaded.getTime() : now);
    return !fresh;
  }

  /** The operator's list of mailboxes (at cutover): each written as known now, one put each. */
  async record(addresses: string[], now = Date.now()): Promise<number> {
    await Promise.all(addresses.map((a) => this.r2("A").put(knownKey(a), "")));
    for (const a of addresses) this.known.set(a.toLowerCase(), now);
    return addresses.length;
  }

  /** Whether the host delivered mail for `address` within the last 60 days. */
  async isKnown(address: string, now = Date.now()): Promise<boolean> {
    const head = await this.r2("B").head(knownKey(address));
    return head !== null && now - head.uploaded.getTime() < KNOWN_FOR_MS;
  }

  // --- holding ------------------------------------------------------------------------------

  /**
   * Writes the message to queue/ (its bytes streamed), then the marker; resolves once both are
   * stored. With `id` (a notice, whose id follows from its message's): written only if absent,
   * so a give-up repeated after a cut-off run does not queue a second notice; null then.
   */
  async hold(
    body: ReadableStream<Uint8Array> | string,
    m: { from: string; to: string; size: number; reason: string; noAnswer: boolean; kind?: "mail" | "notice"; noticeFor?: string; id?: string },
    now = Date.now(),
  ): Promise<string | null> {
    const tooLong = envelopeTooLong(m.from, m.to);
    if (tooLong) throw new Error(tooLong);
    const id = m.id ?? newId(now);
    const meta = { from: m.from, to: m.to, size: m.size, received: now, since: now, reason: clip(m.reason), kind: m.kind ?? "mail", noAnswer: m.noAnswer, noticeFor: m.noticeFor };
    const stored = await this.r2("A").put(queueKey(id), typeof body === "string" ? body : sized(body, m.size), {
      customMetadata: encode(meta, ["reason"]),
      onlyIf: m.id ? { etagDoesNotMatch: "*" } : undefined,
    });
    if (!stored && m.id) return null;
    if (!stored || stored.size !== m.size) throw new Error(`the edge spool stored ${stored?.size ?? "nothing"} of ${m.size} bytes`);
    try {
      await this.markHeld(now + (m.noAnswer ? NO_ANSWER_GRACE_MS : 0));
    } catch (e) {
      // Not held after all (the caller throws: the sender sends it again). Left in queue/, the copy
      // would wait unseen behind a marker that may say "empty", then go to the host beside that one.
      await this.r2("free").delete(queueKey(id)).catch(() => {});
      throw e;
    }
    return id;
  }

  /** Something is held, due at `due`: an unconditional write, whatever a drain wrote before. */
  markHeld(due: number): Promise<unknown> {
    return this.r2("A").put(HELD, unique(), { customMetadata: { due: String(due), probe: "1" } });
  }

  /** The marker (one HEAD), or null when nothing was ever held. */
  async marker(): Promise<Marker | null> {
    const o = await this.r2("B").head(HELD);
    if (!o) return null;
    const c = o.customMetadata ?? {};
    // A marker without metadata (written before the marker carried any) means: held, due now.
    return { etag: o.etag, empty: c.empty === "1", due: Number(c.due ?? 0) || 0, probe: c.probe !== "0" };
  }

  /**
   * A drain's end: the marker set to `state`, only if nothing was held since `seen` was read
   * (before the drain's listing). A hold meanwhile wrote its own (held, due now): that one stays.
   * No write when the marker already says so.
   */
  async settleMarker(seen: Marker | null, state: MarkerState): Promise<"written" | "unchanged" | "held meanwhile"> {
    if (state.empty ? (seen === null || seen.empty) : seen !== null && !seen.empty && seen.due === state.due && seen.probe === state.probe) return "unchanged";
    const customMetadata: Record<string, string> = state.empty ? { empty: "1" } : { due: String(state.due), probe: state.probe ? "1" : "0" };
    const put = await this.r2("A").put(HELD, unique(), { customMetadata, onlyIf: seen ? { etagMatches: seen.etag } : { etagDoesNotMatch: "*" } });
    return put ? "written" : "held meanwhile";
  }

  // --- reading --------------------------------------------------------------------------------

  /**
   * Held messages, oldest first: list calls of up to 100 objects (a message and its .retry record
   * are two), at most `pages`, each further one only while `more` says so of what is listed so
   * far; `complete` when the listing reached the end of queue/. A message last on the final page
   * of an incomplete listing is left out: its .retry record, the next key, may be on the page not
   * read, and without it the message would look never tried.
   */
  async held(pages = 2, more: (soFar: HeldMessage[]) => boolean = () => true): Promise<{ messages: HeldMessage[]; complete: boolean }> {
    const msgs = new Map<string, HeldMessage>();
    const retries = new Map<string, Pick<HeldMessage, "attempts" | "next" | "lastReply" | "specific">>();
    const listed = () => {
      for (const [id, r] of retries) {
        const m = msgs.get(id);
        if (m) Object.assign(m, r, { specific: r.specific === true });
      }
      return [...msgs.values()].sort((a, b) => (a.id < b.id ? -1 : 1));
    };
    let cursor: string | undefined;
    for (let page = 0; ; page++) {
      const res = await this.r2("A").list({ prefix: "queue/", cursor, include: ["customMetadata"] });
      for (const o of res.objects) {
        const name = o.key.slice("queue/".length);
        if (name.endsWith(".retry")) {
          const r = decode<Pick<HeldMessage, "attempts" | "next" | "lastReply" | "specific">>(o);
          if (r) retries.set(name.slice(0, -".retry".length), r);
        } else {
          const meta = decode<Omit<HeldMessage, "id" | "attempts" | "next" | "lastReply" | "specific">>(o);
          // Unreadable metadata cannot be delivered (no envelope): it stays, listed with what is known.
          msgs.set(name, {
            id: name,
            ...(meta ?? { from: "?", to: "?", size: o.size, received: o.uploaded.getTime(), since: o.uploaded.getTime(), reason: "unreadable metadata", kind: "mail", noAnswer: false }),
            size: o.size,
            attempts: 0,
            next: 0,
            specific: false,
            lastReply: meta ? "" : "unreadable metadata",
          });
        }
      }
      if (!res.truncated) return { messages: listed(), complete: true };
      if (page + 1 >= pages || !more(listed())) {
        const last = res.objects.at(-1)?.key.slice("queue/".length);
        if (last && !last.endsWith(".retry")) msgs.delete(last);
        return { messages: listed(), complete: false };
      }
      cursor = res.cursor;
    }
  }

  /** failed/, oldest first: at most `pages` list calls of up to 100. */
  async failed(pages = 10): Promise<FailedMessage[]> {
    const out: FailedMessage[] = [];
    let cursor: string | undefined;
    for (let page = 0; page < pages; page++) {
      const res = await this.r2("A").list({ prefix: "failed/", cursor, include: ["customMetadata"] });
      for (const o of res.objects) {
        const meta = decode<FailedMessage>(o);
        if (meta) out.push({ ...meta, id: o.key.slice("failed/".length), size: o.size });
      }
      if (!res.truncated) break;
      cursor = res.cursor;
    }
    return out.sort((a, b) => (a.id < b.id ? -1 : 1));
  }

  body(id: string): Promise<R2ObjectBodyLike | null> {
    return this.r2("B").get(queueKey(id));
  }

  /** The first `bytes` of a held message (its header block, for a notice). */
  async head(id: string, bytes = 64 * 1024): Promise<Uint8Array | null> {
    const o = await this.r2("B").get(queueKey(id), { range: { offset: 0, length: bytes } });
    return o ? new Uint8Array(await new Response(o.body).arrayBuffer()) : null;
  }

  // --- the drain's writes ---------------------------------------------------------------------

  /** Delivered (the host's confirmation): gone from the edge. */
  delivered(id: string): Promise<void> {
    return this.r2("free").delete([queueKey(id), retryKey(id)]);
  }

  /**
   * A failed attempt: when to try again, what the host said, and whether the failure was this
   * message's own (the host was up: it waits its backoff even when the host confirms others).
   */
  async retryLater(m: HeldMessage, reply: string, next: number, specific: boolean, now = Date.now()): Promise<void> {
    await this.r2("A").put(retryKey(m.id), "", { customMetadata: encode({ attempts: m.attempts + 1, next, specific, last: now, lastReply: clip(reply) }, ["lastReply"]) });
  }

  /** Whether failed/ has a copy of message `id` (a give-up that got that far). */
  async inFailed(id: string): Promise<boolean> {
    return (await this.r2("B").head(failedKey(id))) !== null;
  }

  /** Copies the message to failed/ with everything known (it stays in queue/ until delivered() removes it). */
  async copyToFailed(m: HeldMessage, why: FailedMessage["why"], reply: string, now = Date.now()): Promise<void> {
    const body = await this.r2("B").get(queueKey(m.id));
    if (!body) return;
    const meta: Omit<FailedMessage, "id"> = { ...m, lastReply: clip(reply), failed: now, why };
    delete (meta as Partial<HeldMessage>).id;
    await this.r2("A").put(failedKey(m.id), sized(body.body, body.size), { customMetadata: encode(meta, ["lastReply", "reason"]) });
  }

  /** An operator's retry: failed/<id> goes back to queue/ with a fresh maximum age. */
  async retryFailed(id: string, now = Date.now()): Promise<boolean> {
    const o = await this.r2("B").get(failedKey(id));
    if (!o) return false;
    const meta = decode<FailedMessage>(o);
    if (!meta) return false;
    const { failed: _f, why: _w, attempts: _a, next: _n, lastReply: _l, specific: _s, ...held } = meta;
    await this.r2("A").put(queueKey(id), sized(o.body, o.size), { customMetadata: encode({ ...held, since: now, reason: clip(`retried by the operator after: ${meta.lastReply}`) }, ["reason"]) });
    await this.r2("free").delete(failedKey(id));
    await this.markHeld(now);
    return true;
  }

  /** Removes failed/ entries older than 30 days, among the first `pages` hundred. */
  async sweepFailed(now = Date.now(), pages = 10): Promise<number> {
    const old = (await this.failed(pages)).filter((f) => now - f.failed >= FAILED_KEPT_MS).map((f) => failedKey(f.id));
    if (old.length) await this.r2("free").delete(old);
    return old.length;
  }

  // --- one drain at a time --------------------------------------------------------------------

  /** Takes the drain lock for `leaseMs`; null while another drain holds an unexpired one. */
  async lock(leaseMs: number, now = Date.now()): Promise<Lease | null> {
    const current = await this.r2("B").head(LOCK);
    const until = now + leaseMs;
    const meta = { until: String(until) };
    if (current && Number(current.customMetadata?.until ?? 0) > now) return null;
    // Absent, or expired (its drain died): take it only if nobody else did meanwhile.
    const put = await this.r2("A").put(LOCK, unique(), { customMetadata: meta, onlyIf: current ? { etagMatches: current.etag } : { etagDoesNotMatch: "*" } });
    return put ? { etag: put.etag, until } : null;
  }

  /**
   * The same drain goes on (a longer run, or its next run in a fresh invocation): the lease
   * extended, only if the lock is still the one `etag` names. Null: lost (it expired and another
   * drain took it).
   */
  async renew(etag: string, leaseMs: number, now = Date.now()): Promise<Lease | null> {
    const until = now + leaseMs;
    const put = await this.r2("A").put(LOCK, unique(), { customMetadata: { until: String(until) }, onlyIf: { etagMatches: etag } });
    return put ? { etag: put.etag, until } : null;
  }

  /**
   * Released at once while the lease surely still holds (nobody else can have taken it); close
   * to its end, left to expire: a delete cannot be conditional, and could remove another's lock.
   */
  async unlock(lease: Lease, now = Date.now()): Promise<void> {
    if (now < lease.until - LEASE_MARGIN_MS) await this.r2("free").delete(LOCK);
  }
}

/** The id of the notice about message `id`: the same time, the random part inverted (one notice per message). */
export function noticeIdFor(id: string): string {
  const [time, rand] = id.split("-") as [string, string];
  return `${time}-${(~Number.parseInt(rand, 16) >>> 0).toString(16).padStart(8, "0")}`;
}
