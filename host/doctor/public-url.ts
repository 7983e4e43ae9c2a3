// PUBLIC_URL, the path the Worker takes (Cloudflare, the tunnel, the host): GET /health answers the
// relay's own "healthy", and GET /ready with the key answers "ready" with its details, which the
// host gives only to a caller with one of its keys.

import { INBOUND_PATH } from "../../shared/contract.ts";
import type { DoctorPart, Finding } from "./finding.ts";
import { get, inFront } from "./http-probe.ts";

const TUNNEL_FIX = "see examples/cloudflared-ingress.yml: the hostname's rule must come before the catch-all and name the relay's service and port";

export const publicUrl: DoctorPart = {
  name: "public-url",
  async run(ctx) {
    if (!ctx.publicUrl) return [{ part: "public-url", status: "skip", found: "PUBLIC_URL is not set: the path through the tunnel is not checked", fix: "PUBLIC_URL=https://mail-api.example.com/api/v1/inbound-mail (the Worker's DELL_API_ENDPOINT)" }];
    const base = new URL(ctx.publicUrl);
    const findings: Finding[] = [];
    if (base.pathname !== INBOUND_PATH) {
      findings.push({ part: "public-url", status: "warn", found: `PUBLIC_URL's path is ${base.pathname}, not ${INBOUND_PATH}`, fix: `the Worker's DELL_API_ENDPOINT (and PUBLIC_URL) is https://<host>${INBOUND_PATH}` });
    }
    const health = await get(new URL("/health", base), ctx.timeoutMs);
    if (typeof health === "string") {
      return [...findings, { part: "public-url", status: "fail", found: `${base.origin} cannot be reached: ${health}`, fix: "the hostname needs a DNS record to the tunnel (cloudflared tunnel route dns), and cloudflared must be running" }];
    }
    if (health.status !== 200 || health.json?.status !== "healthy") {
      const what = health.status === 200 ? "200, but not the relay's /health: PUBLIC_URL reaches another service" : inFront(health);
      return [...findings, { part: "public-url", status: "fail", found: `GET ${base.origin}/health answered ${what}`, fix: TUNNEL_FIX }];
    }
    findings.push({ part: "public-url", status: "ok", found: `GET ${base.origin}/health: healthy` });
    return [...findings, await ready(new URL("/ready", base), ctx.keys, ctx.timeoutMs)];
  },
};

/** /ready with each key until one is taken: the details show only to a caller with a key. */
async function ready(url: URL, keys: [string, string][], ms: number): Promise<Finding> {
  if (!keys.length) return { part: "public-url", status: "skip", found: "GET /ready with the key: no key is set here (see configuration)" };
  for (const [name, key] of keys) {
    const a = await get(url, ms, { "x-api-key": key });
    if (typeof a === "string") return { part: "public-url", status: "fail", found: `GET ${url.origin}/ready: ${a}`, fix: TUNNEL_FIX };
    if (a.status === 200 && a.json?.status === "ready" && "lmtp" in a.json) {
      return { part: "public-url", status: "ok", found: `GET /ready with ${name}: ready, the host delivers to ${String(a.json.lmtp)}` };
    }
    if (a.status === 503 && "error" in (a.json ?? {})) {
      return { part: "public-url", status: "fail", found: `GET /ready with ${name}: the host answers, but cannot deliver: ${String(a.json!.error)}`, fix: "the target check above says why; mail is spooled or retried meanwhile" };
    }
    if (a.status !== 200 && a.status !== 503) return { part: "public-url", status: "fail", found: `GET ${url.origin}/ready answered ${inFront(a)}`, fix: TUNNEL_FIX };
  }
  return {
    part: "public-url",
    status: "fail",
    found: `the host behind PUBLIC_URL took none of the ${keys.length} key(s) set here: its keys and these differ, and a Worker that sends one of these is refused there (401: the sender retries until it gives up)`,
    fix: "give the host and the Worker the same key: API_KEY in the host's environment, and `bunx wrangler secret put API_KEY` for the Worker",
  };
}
