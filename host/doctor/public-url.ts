// PUBLIC_URL, the path the Worker takes (Cloudflare, Access, the tunnel, the host): GET /health
// answers the relay's own "healthy", and GET /ready with the key answers "ready" with its details,
// which the host gives only to a caller with one of its keys: among them the delivery target, as
// the host has it. With the Access service token set, both requests carry it, as the Worker's do.

import { targetUrl } from "../../lmtp.ts";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { deliveryTarget, type ServerConfig } from "../config.ts";
import { accessRefusal } from "./access.ts";
import type { DoctorContext, DoctorPart, Finding } from "./finding.ts";
import { get, type Answer } from "../http-get.ts";
import { accessHeaders, inFront } from "./http-probe.ts";

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
    const health = await get(new URL("/health", base), ctx.timeoutMs, accessHeaders(ctx.serviceToken));
    if (typeof health === "string") {
      return [...findings, { part: "public-url", status: "fail", found: `${base.origin} cannot be reached: ${health}`, fix: "the hostname needs a DNS record to the tunnel (cloudflared tunnel route dns), and cloudflared must be running" }];
    }
    if (health.status !== 200 || health.json?.status !== "healthy") {
      const refused = accessRefusal(ctx.serviceToken, health, `${base.origin}/health`);
      if (refused) return [...findings, refused];
      const what = health.status === 200 ? "200, but not the relay's /health: PUBLIC_URL reaches another service" : inFront(health);
      return [...findings, { part: "public-url", status: "fail", found: `GET ${base.origin}/health answered ${what}`, fix: TUNNEL_FIX }];
    }
    findings.push({ part: "public-url", status: "ok", found: `GET ${base.origin}/health: healthy${ctx.serviceToken ? " (with the service token)" : ""}` });
    return [...findings, ...(await ready(new URL("/ready", base), ctx))];
  },
};

/** /ready with each key until one is taken: the details show only to a caller with a key. */
async function ready(url: URL, ctx: DoctorContext): Promise<Finding[]> {
  const { keys, timeoutMs } = ctx;
  if (!keys.length) return [{ part: "public-url", status: "skip", found: "GET /ready with the key: no key is set here (see configuration)" }];
  for (const [name, key] of keys) {
    const a = await get(url, timeoutMs, { ...accessHeaders(ctx.serviceToken), "x-api-key": key });
    if (typeof a === "string") return [{ part: "public-url", status: "fail", found: `GET ${url.origin}/ready: ${a}`, fix: TUNNEL_FIX }];
    const door = refusedByHostDoor(a);
    if (door) return [door];
    if (a.status === 200 && a.json?.status === "ready" && ("target" in a.json || "lmtp" in a.json)) {
      // `target` names the protocol (smtp://, lmtp://); a host from before it has `lmtp` only.
      const theirs = String(a.json.target ?? a.json.lmtp);
      const found: Finding = { part: "public-url", status: "ok", found: `GET /ready with ${name}: ready, the host delivers to ${theirs}` };
      return [found, ...sameTarget(theirs, "target" in a.json, ctx.config)];
    }
    if (a.status === 503 && "error" in (a.json ?? {})) {
      return [{ part: "public-url", status: "fail", found: `GET /ready with ${name}: the host answers, but cannot deliver: ${String(a.json!.error)}`, fix: "the target check above says why; mail is spooled or retried meanwhile" }];
    }
    if (a.status !== 200 && a.status !== 503) {
      return [accessRefusal(ctx.serviceToken, a, `${url.origin}/ready`) ?? { part: "public-url", status: "fail", found: `GET ${url.origin}/ready answered ${inFront(a)}`, fix: TUNNEL_FIX }];
    }
  }
  return [
    {
      part: "public-url",
      status: "fail",
      found: `the host behind PUBLIC_URL took none of the ${keys.length} key(s) set here: its keys and these differ, and a Worker that sends one of these is refused there (401: the sender retries until it gives up)`,
      fix: "give the host and the Worker the same key: API_KEY in the host's environment, and `bunx wrangler secret put API_KEY` for the Worker",
    },
  ];
}

/** The host's own Access check (ACCESS_TEAM_DOMAIN, ACCESS_AUD) refusing what came through: its JSON says why. */
function refusedByHostDoor(a: Answer): Finding | null {
  const error = a.json?.error;
  const message = typeof a.json?.message === "string" ? a.json.message : "";
  if (error === "access_token_missing") {
    return {
      part: "public-url",
      status: "fail",
      found: "the host wants Access's JWT, and the request reached it without one: no Access application covers PUBLIC_URL's hostname, so the Worker's requests wait too (401)",
      fix: "an Access application for the hostname with a Service Auth policy (docs/access.md, step 3), or no ACCESS_TEAM_DOMAIN/ACCESS_AUD on a host that Access does not guard",
    };
  }
  if (error === "access_token_invalid") {
    return {
      part: "public-url",
      status: "fail",
      found: `Access let the service token through, but the host refuses the JWT Access added: ${message}`,
      fix: "ACCESS_AUD is the AUD tag of the application that guards PUBLIC_URL, ACCESS_TEAM_DOMAIN its team domain (docs/access.md, step 5)",
    };
  }
  if (error === "access_certs_unavailable") {
    return { part: "public-url", status: "fail", found: `the host cannot check Access's JWT: ${message}`, fix: "the access check above says why the signing keys cannot be fetched" };
  }
  return null;
}

/** The host behind PUBLIC_URL delivers where the settings here say: else this doctor checked another target, or PUBLIC_URL reaches another host. */
function sameTarget(theirs: string, isUrl: boolean, config: ServerConfig | null): Finding[] {
  if (!config || !isUrl) return [];
  const ours = targetUrl(deliveryTarget(config));
  if (ours === theirs) return [];
  return [
    {
      part: "public-url",
      status: "warn",
      found: `the host behind PUBLIC_URL delivers to ${theirs}, the settings here say ${ours}: the target check above asked another target`,
      fix: "run the doctor with the running host's environment (in its container: mail-relay doctor), or point PUBLIC_URL at this host",
    },
  ];
}
