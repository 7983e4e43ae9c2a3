// API key check for the inbound route: X-API-Key, or Authorization: Bearer.
//
// Not hono/bearer-auth, because its answers do not fit a mail relay: it says 400 for a malformed
// Authorization header, and the edge turns 400 into a bounce. A key mix-up must never bounce mail,
// so every failure here is 401 (the edge retries). The comparison itself is Hono's
// timingSafeEqual (SHA-256 of both sides, then compared), run against every configured key so
// the time taken says nothing about which key, or how much of one, matched.

import type { Context, MiddlewareHandler } from "hono";
import { timingSafeEqual } from "hono/utils/buffer";

export function apiKey(keys: readonly string[], refuse: (c: Context, message: string) => Response): MiddlewareHandler {
  if (keys.length === 0) throw new Error("apiKey: no keys configured");
  return async (c, next) => {
    const given = c.req.header("x-api-key") ?? bearerToken(c.req.header("authorization"));
    if (!given) return refuse(c, "missing API key: send it in X-API-Key or Authorization: Bearer");
    let match = false;
    for (const key of keys) match = (await timingSafeEqual(key, given)) || match;
    if (!match) return refuse(c, "invalid API key");
    await next();
  };
}

function bearerToken(header: string | undefined): string | undefined {
  const m = header && /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m ? m[1] : undefined;
}
