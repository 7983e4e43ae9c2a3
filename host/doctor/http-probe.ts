// What the doctor makes of an answer from in front of the host, and the headers that carry the
// Worker's Access service token. The GET itself is the host's own (../http-get.ts).

import type { Answer } from "../http-get.ts";
import type { ServiceToken } from "./finding.ts";

/** What a non-2xx answer from something in front of the host most likely means. */
export function inFront(a: Answer): string {
  if (a.status >= 300 && a.status < 400) {
    const access = /cloudflareaccess\.com/i.test(a.location ?? "");
    return `a redirect (${a.status}) to ${a.location ? withoutQuery(a.location) : "nowhere"}${access ? ": Cloudflare Access asks for a login" : ""}`;
  }
  if (a.status === 404) return "404: nothing is routed there (cloudflared's catch-all rule, or a path that is not the relay's)";
  if ([502, 503, 504, 521, 522, 523, 524, 530].includes(a.status)) return `${a.status}: Cloudflare or cloudflared cannot reach the host (the container is down, the tunnel not connected, or its ingress names the wrong service)`;
  return `HTTP ${a.status}`;
}

/** A URL without its query (Access's login URL carries a long one), and not past 200 characters. */
function withoutQuery(location: string): string {
  return location.replace(/[?#].*$/s, "").replace(/[\x00-\x1f\x7f]/g, "").slice(0, 200);
}

/** The headers that carry the Worker's Access service token (edge/forward.ts sends the same two), or none. */
export function accessHeaders(token: ServiceToken | undefined): Record<string, string> {
  return token ? { "cf-access-client-id": token.id, "cf-access-client-secret": token.secret } : {};
}
