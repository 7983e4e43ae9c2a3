// API key check for the inbound route: X-API-Key, or Authorization: Bearer.
//
// Not hono/bearer-auth, because its answers do not fit a mail relay: it says 400 for a malformed
// Authorization header, and the edge turns 400 into a bounce. A key mix-up must never bounce mail,
// so every failure here is 401 (the edge retries).
//
// The comparison is constant-time on SHA-256 digests: the configured keys are hashed once, the
// key presented once per request, and the digest compared with every configured one without
// stopping early, so the time taken says nothing about which key, or how much of one, matched
// (hashing first also hides the keys' lengths). Web Crypto only: the Worker runs this too.

import type { Context, MiddlewareHandler } from "hono";

export function apiKey(keys: readonly string[], refuse: (c: Context, message: string) => Response): MiddlewareHandler {
  const check = keyCheck(keys);
  return async (c, next) => {
    const result = await check(c);
    if (result === "missing") return refuse(c, "missing API key: send it in X-API-Key or Authorization: Bearer");
    if (result === "invalid") return refuse(c, "invalid API key");
    await next();
  };
}

/** The same check without an answer, for routes that say less to a caller without the key (/ready). */
export function keyCheck(keys: readonly string[]): (c: Context) => Promise<"valid" | "missing" | "invalid"> {
  const matches = keyMatcher(keys);
  return async (c) => {
    const given = c.req.header("x-api-key") ?? bearerToken(c.req.header("authorization"));
    if (!given) return "missing";
    return (await matches(given)) ? "valid" : "invalid";
  };
}

/** Whether a presented secret is one of the keys, in constant time (see the top); also /status's Basic password. */
export function keyMatcher(keys: readonly string[]): (given: string) => Promise<boolean> {
  if (keys.length === 0) throw new Error("apiKey: no keys configured");
  let digests: Promise<Uint8Array[]> | null = null;
  return async (given) => {
    digests ??= Promise.all(keys.map(sha256));
    const presented = await sha256(given);
    let match = false;
    for (const d of await digests) match = sameBytes(d, presented) || match;
    return match;
  };
}

async function sha256(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

/** Every byte is looked at, whatever differs: no early exit. */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ (b[i] ?? 0);
  return diff === 0;
}

function bearerToken(header: string | undefined): string | undefined {
  const m = header && /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m ? m[1] : undefined;
}
