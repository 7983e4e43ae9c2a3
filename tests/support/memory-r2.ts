// An R2 bucket in memory, for running the edge spool's code in Bun: the subset of workerd's R2
// binding that edge/spool.ts uses, with its conditional puts, its list pages (100 keys when
// metadata is included), range reads, ETags that are the body's MD5 as R2's are, and local R2's
// limit on custom metadata (2,048, counted as miniflare counts it); it counts operations by R2's price classes, and can freeze (a Worker
// cut off in the middle: from its n-th call on, nothing answers).

import type { R2BucketLike, R2ObjectBodyLike, R2ObjectLike, R2PutOptionsLike } from "../../edge/spool.ts";

/** Local R2's limit (miniflare's R2Limits.MAX_METADATA_SIZE), keys and values together. */
const MAX_METADATA_SIZE = 2048;
/** As miniflare's serialisedLength: one per character, two per character if any is above U+00FF. */
function metadataSize(m: Record<string, string> | undefined): number {
  const length = (x: string) => ([...x].some((c) => c.charCodeAt(0) >= 256) ? x.length * 2 : x.length);
  return Object.entries(m ?? {}).reduce((n, [k, v]) => n + length(k) + length(v), 0);
}

interface Stored {
  bytes: Uint8Array;
  meta: R2ObjectLike;
}

export class MemoryR2 implements R2BucketLike {
  readonly objects = new Map<string, Stored>();
  /** Operations by class: A (put, list), B (get, head), free (delete). */
  ops = { A: 0, B: 0, free: 0 };
  /** Every call, in order: "put queue/...", "head held", ... */
  calls: string[] = [];
  /** The time objects are stamped with (tests move it). */
  now = () => Date.now();
  /** Makes the next puts whose key starts with this fail (a full or unreachable bucket). */
  failPuts: string | null = null;
  /** From the first call this says yes to (given as in `calls`, "get queue/..."), no call answers: the invocation was cut off. */
  freezeWhen: ((call: string) => boolean) | null = null;
  private frozen = false;

  private async count(cls: "A" | "B" | "free", what: string) {
    if (this.frozen || this.freezeWhen?.(what)) {
      this.frozen = true;
      await new Promise(() => {});
    }
    this.ops[cls]++;
    this.calls.push(what);
  }

  /** Answers again (the calls frozen before stay unanswered: their invocation is gone). */
  thaw() {
    this.freezeWhen = null;
    this.frozen = false;
  }

  resetCounts() {
    this.ops = { A: 0, B: 0, free: 0 };
    this.calls = [];
  }

  async head(key: string): Promise<R2ObjectLike | null> {
    await this.count("B", `head ${key}`);
    return this.objects.get(key)?.meta ?? null;
  }

  async get(key: string, options?: { range?: { offset?: number; length?: number } }): Promise<R2ObjectBodyLike | null> {
    await this.count("B", `get ${key}`);
    const o = this.objects.get(key);
    if (!o) return null;
    const offset = options?.range?.offset ?? 0;
    const bytes = o.bytes.subarray(offset, options?.range?.length === undefined ? undefined : offset + options.range.length);
    let at = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(c) {
        if (at >= bytes.length) return c.close();
        c.enqueue(bytes.slice(at, at + 64 * 1024));
        at += 64 * 1024;
      },
    });
    return { ...o.meta, body };
  }

  async put(key: string, value: ReadableStream<Uint8Array> | Uint8Array | string | null, options?: R2PutOptionsLike): Promise<R2ObjectLike | null> {
    await this.count("A", `put ${key}`);
    if (this.failPuts !== null && key.startsWith(this.failPuts)) throw new Error("put: We encountered an internal error. Please try again.");
    if (metadataSize(options?.customMetadata) > MAX_METADATA_SIZE) throw new Error("put: Your metadata headers exceed the maximum allowed metadata size. (10012)");
    const bytes =
      value === null ? new Uint8Array() : typeof value === "string" ? new TextEncoder().encode(value) : value instanceof Uint8Array ? value : new Uint8Array(await new Response(value).arrayBuffer());
    const current = this.objects.get(key);
    const cond = options?.onlyIf;
    if (cond?.etagDoesNotMatch === "*" && current) return null;
    if (cond?.etagMatches !== undefined && current?.meta.etag !== cond.etagMatches) return null;
    // As R2's: the MD5 of the body, so the same bytes written again keep the same ETag.
    const etag = new Bun.CryptoHasher("md5").update(bytes).digest("hex");
    const meta: R2ObjectLike = { key, size: bytes.length, etag, uploaded: new Date(this.now()), customMetadata: { ...options?.customMetadata } };
    this.objects.set(key, { bytes: new Uint8Array(bytes), meta });
    return meta;
  }

  async delete(keys: string | string[]): Promise<void> {
    const list = Array.isArray(keys) ? keys : [keys];
    await this.count("free", `delete ${list.join(",")}`);
    for (const k of list) this.objects.delete(k);
  }

  async list(options: { prefix?: string; cursor?: string; limit?: number; include?: "customMetadata"[] }) {
    await this.count("A", `list ${options.prefix ?? ""}`);
    const limit = Math.min(options.limit ?? 1000, options.include?.length ? 100 : 1000);
    const keys = [...this.objects.keys()].filter((k) => k.startsWith(options.prefix ?? "") && (options.cursor === undefined || k > options.cursor)).sort();
    const page = keys.slice(0, limit);
    const objects = page.map((k) => {
      const m = this.objects.get(k)!.meta;
      return options.include?.includes("customMetadata") ? m : { ...m, customMetadata: undefined };
    });
    const truncated = keys.length > limit;
    return { objects, truncated, cursor: truncated ? page[page.length - 1] : undefined };
  }

  bytesOf(key: string): Uint8Array | undefined {
    return this.objects.get(key)?.bytes;
  }

  keys(prefix = ""): string[] {
    return [...this.objects.keys()].filter((k) => k.startsWith(prefix)).sort();
  }
}
