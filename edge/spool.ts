// The edge spool: messages the Worker accepted while the host could not take them, kept in an R2
// bucket (binding EDGE_SPOOL) until the drain (edge/drain.ts) hands them to the host. Layout:
//   queue/<id>          the message's exact bytes; its envelope and history in customMetadata
//   queue/<id>.retry    (empty) the drain's attempts: count, next attempt, last reply
//   failed/<id>         a message given up on, bytes and everything known; kept 30 days
//   known/<address>     (empty) the host accepted mail for this address; uploaded = when last seen
//   held                (empty) present while queue/ may hold something: the cheap check (a HEAD,
//                       class B) that lets idle cron runs and healthy deliveries skip a LIST (class A)
//   drain.lock          (empty) one drain at a time (a conditional put), with a lease
// Ids start with the time received, so key order is arrival order. Runtime-neutral: the R2 API
// is declared structurally here (what workerd's binding offers; tests give an in-memory one).

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
/** How long the replies kept in metadata may be (R2 allows 2 KiB of metadata per object). */
const MAX_REPLY = 400;

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
  /** Not attempted before this (ms), unless the host has just confirmed another message. */
  next: number;
  lastReply: string;
}

export interface FailedMessage extends HeldMessage {
  failed: number;
  why: "refused" | "expired";
}

/** Metadata values as ASCII JSON: R2 keeps them as HTTP header values. */
function encode(value: object): Record<string, string> {
  return { m: JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`) };
}
function decode<T>(o: R2ObjectLike): T | null {
  try {
    return JSON.parse(o.customMetadata?.m ?? "null") as T | null;
  } catch {
    return null;
  }
}

export const clip = (s: string, n = MAX_REPLY) => (s.length > n ? `${s.slice(0, n - 3)}...` : s);

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

/**
 * The bucket, with a count of the calls made through it: a run of the drain stops starting new
 * work before it reaches the free plan's 50 subrequests per invocation.
 */
export class EdgeSpool {
  calls = 0;
  /** Per bucket, the addresses this isolate has recorded in known/ lately (saves a HEAD per delivery). */
  private static knownHere = new WeakMap<R2BucketLike, Map<string, number>>();
  private readonly known: Map<string, number>;

  constructor(readonly bucket: R2BucketLike) {
    let known = EdgeSpool.knownHere.get(bucket);
    if (!known) EdgeSpool.knownHere.set(bucket, (known = new Map()));
    this.known = known;
  }

  private r2(): R2BucketLike {
    this.calls++;
    return this.bucket;
  }

  // --- known recipients ---------------------------------------------------------------------

  /**
   * The host accepted mail for `address` (2xx): remember it. One write for a new address, then
   * at most one a day while its mail keeps coming (its 60 days count from the last); true if written.
   */
  async learn(address: string, now = Date.now()): Promise<boolean> {
    const key = address.toLowerCase();
    const seen = this.known.get(key);
    if (seen !== undefined && now - seen < KNOWN_REFRESH_MS) return false;
    const head = await this.r2().head(knownKey(key));
    const fresh = head !== null && now - head.uploaded.getTime() < KNOWN_REFRESH_MS;
    if (!fresh) await this.r2().put(knownKey(key), "");
    this.known.set(key, fresh ? head.uploaded.getTime() : now);
    return !fresh;
  }

  /** Whether the host accepted mail for `address` within the last 60 days. */
  async isKnown(address: string, now = Date.now()): Promise<boolean> {
    const head = await this.r2().head(knownKey(address));
    return head !== null && now - head.uploaded.getTime() < KNOWN_FOR_MS;
  }

  // --- holding ------------------------------------------------------------------------------

  /** Writes the message to queue/ (its bytes streamed), then the marker; resolves once both are stored. */
  async hold(
    body: ReadableStream<Uint8Array> | string,
    m: { from: string; to: string; size: number; reason: string; noAnswer: boolean; kind?: "mail" | "notice"; noticeFor?: string },
    now = Date.now(),
  ): Promise<string> {
    const id = newId(now);
    const meta = { from: m.from, to: m.to, size: m.size, received: now, since: now, reason: clip(m.reason), kind: m.kind ?? "mail", noAnswer: m.noAnswer, noticeFor: m.noticeFor };
    const stored = await this.r2().put(queueKey(id), typeof body === "string" ? body : sized(body, m.size), { customMetadata: encode(meta) });
    if (!stored || stored.size !== m.size) throw new Error(`the edge spool stored ${stored?.size ?? "nothing"} of ${m.size} bytes`);
    await this.markHeld();
    return id;
  }

  markHeld(): Promise<unknown> {
    return this.r2().put(HELD, "");
  }

  async mayHold(): Promise<boolean> {
    return (await this.r2().head(HELD)) !== null;
  }

  /** Before a drain lists queue/: whatever is held after this delete is found by the list, or set the marker again. */
  clearHeld(): Promise<void> {
    return this.r2().delete(HELD);
  }

  // --- reading --------------------------------------------------------------------------------

  /** Held messages, oldest first (at most `pages` list calls of 100). */
  async held(pages = 2): Promise<{ messages: HeldMessage[]; complete: boolean }> {
    const msgs = new Map<string, HeldMessage>();
    const retries = new Map<string, Pick<HeldMessage, "attempts" | "next" | "lastReply">>();
    let cursor: string | undefined;
    let complete = false;
    for (let page = 0; page < pages; page++) {
      const res = await this.r2().list({ prefix: "queue/", cursor, include: ["customMetadata"] });
      for (const o of res.objects) {
        const name = o.key.slice("queue/".length);
        if (name.endsWith(".retry")) {
          const r = decode<Pick<HeldMessage, "attempts" | "next" | "lastReply">>(o);
          if (r) retries.set(name.slice(0, -".retry".length), r);
        } else {
          const meta = decode<Omit<HeldMessage, "id" | "attempts" | "next" | "lastReply">>(o);
          // Unreadable metadata cannot be delivered (no envelope): it stays, listed with what is known.
          msgs.set(name, {
            id: name,
            ...(meta ?? { from: "?", to: "?", size: o.size, received: o.uploaded.getTime(), since: o.uploaded.getTime(), reason: "unreadable metadata", kind: "mail", noAnswer: false }),
            size: o.size,
            attempts: 0,
            next: 0,
            lastReply: meta ? "" : "unreadable metadata",
          });
        }
      }
      if (!res.truncated) {
        complete = true;
        break;
      }
      cursor = res.cursor;
    }
    for (const [id, r] of retries) {
      const m = msgs.get(id);
      if (m) Object.assign(m, r);
    }
    return { messages: [...msgs.values()].sort((a, b) => (a.id < b.id ? -1 : 1)), complete };
  }

  async failed(): Promise<FailedMessage[]> {
    const out: FailedMessage[] = [];
    let cursor: string | undefined;
    for (let page = 0; page < 10; page++) {
      const res = await this.r2().list({ prefix: "failed/", cursor, include: ["customMetadata"] });
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
    return this.r2().get(queueKey(id));
  }

  /** The first `bytes` of a held message (its header block, for a notice). */
  async head(id: string, bytes = 64 * 1024): Promise<Uint8Array | null> {
    const o = await this.r2().get(queueKey(id), { range: { offset: 0, length: bytes } });
    return o ? new Uint8Array(await new Response(o.body).arrayBuffer()) : null;
  }

  // --- the drain's writes ---------------------------------------------------------------------

  /** Delivered (the host's confirmation): gone from the edge. */
  delivered(id: string): Promise<void> {
    return this.r2().delete([queueKey(id), retryKey(id)]);
  }

  /** A failed attempt: when to try again and what the host said. */
  async retryLater(m: HeldMessage, reply: string, next: number, now = Date.now()): Promise<void> {
    await this.r2().put(retryKey(m.id), "", { customMetadata: encode({ attempts: m.attempts + 1, next, last: now, lastReply: clip(reply) }) });
  }

  /** Copies the message to failed/ with everything known, then removes it from queue/. */
  async moveToFailed(m: HeldMessage, why: FailedMessage["why"], reply: string, now = Date.now()): Promise<void> {
    const body = await this.r2().get(queueKey(m.id));
    if (body) {
      const meta: Omit<FailedMessage, "id"> = { ...m, lastReply: clip(reply), failed: now, why };
      delete (meta as Partial<HeldMessage>).id;
      await this.r2().put(failedKey(m.id), sized(body.body, body.size), { customMetadata: encode(meta) });
    }
    await this.delivered(m.id);
  }

  /** An operator's retry: failed/<id> goes back to queue/ with a fresh maximum age. */
  async retryFailed(id: string, now = Date.now()): Promise<boolean> {
    const o = await this.r2().get(failedKey(id));
    if (!o) return false;
    const meta = decode<FailedMessage>(o);
    if (!meta) return false;
    const { failed: _f, why: _w, attempts: _a, next: _n, lastReply: _l, ...held } = meta;
    await this.r2().put(queueKey(id), sized(o.body, o.size), { customMetadata: encode({ ...held, since: now, reason: `retried by the operator after: ${meta.lastReply}`.slice(0, MAX_REPLY) }) });
    await this.r2().delete(failedKey(id));
    await this.markHeld();
    return true;
  }

  /** Removes failed/ entries older than 30 days. */
  async sweepFailed(now = Date.now()): Promise<number> {
    const old = (await this.failed()).filter((f) => now - f.failed >= FAILED_KEPT_MS).map((f) => failedKey(f.id));
    if (old.length) await this.r2().delete(old);
    return old.length;
  }

  // --- one drain at a time --------------------------------------------------------------------

  /** Takes the drain lock for `leaseMs`; false while another drain holds an unexpired one. */
  async lock(leaseMs: number, now = Date.now()): Promise<boolean> {
    const current = await this.r2().head(LOCK);
    const meta = { until: String(now + leaseMs) };
    if (!current) return (await this.r2().put(LOCK, "", { customMetadata: meta, onlyIf: { etagDoesNotMatch: "*" } })) !== null;
    if (Number(current.customMetadata?.until ?? 0) > now) return false;
    // Expired (its drain died): take it over only if nobody else did meanwhile.
    return (await this.r2().put(LOCK, "", { customMetadata: meta, onlyIf: { etagMatches: current.etag } })) !== null;
  }

  unlock(): Promise<void> {
    return this.r2().delete(LOCK);
  }
}
