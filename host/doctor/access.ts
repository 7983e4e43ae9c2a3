// Cloudflare Access, the door in front of the host (docs/access.md). With ACCESS_TEAM_DOMAIN and
// ACCESS_AUD: that Access's signing keys can be fetched and hold an RSA key (the host verifies the
// JWT with them; with none, every request but /health waits with 503). With the Worker's service
// token in the doctor's environment (CF_ACCESS_CLIENT_ID, CF_ACCESS_CLIENT_SECRET): that each half
// is shaped as Access makes it, and that PUBLIC_URL without it does not reach the relay (the door
// is shut). Whether the token itself passes is for the public-url check, which sends it, as the
// edge check does; what a refusal there means is said here (accessRefusal).
//
// Access answers a Client ID it does not know as it answers a wrong secret: by default a redirect
// to the team's login page, with the application's "401 Response for Service Auth policies" a 401
// (Cloudflare's application settings). Only the shape of each half can say which one is wrong.
// cloudflared's own Access check refuses with a 403 and no body (ingress/middleware/jwtvalidator.go,
// proxy.go: WriteRespHeaders only).

import { accessCertsReachable } from "../access-certs.ts";
import type { AccessSettings } from "../config.ts";
import type { DoctorPart, Finding, ServiceToken } from "./finding.ts";
import { get, type Answer } from "../http-get.ts";
import { inFront } from "./http-probe.ts";

/** Access's Client ID: 32 hex characters and ".access" (tokens made before 2022 add the team's domain). */
const CLIENT_ID = /^[0-9a-f]{32}\.access(\.[a-z0-9.-]+)?$/i;
/** Access's Client Secret: 64 hex characters. */
const CLIENT_SECRET = /^[0-9a-f]{64}$/i;

const TOKEN_FIX = "the Worker's two secrets of the same names hold the values (Zero Trust > Access > Service credentials shows the Client ID; the secret is shown once: if it is lost, make a new token and give both halves to the Worker, `wrangler secret bulk`, and here)";

/** Which half of the token is not shaped as Access makes it, or null. Names the setting, never its value. */
export function tokenShapeProblem(t: ServiceToken): { swapped: boolean; says: string } | null {
  const idOk = CLIENT_ID.test(t.id);
  const secretOk = CLIENT_SECRET.test(t.secret);
  if (idOk && secretOk) return null;
  if (CLIENT_SECRET.test(t.id) && CLIENT_ID.test(t.secret)) return { swapped: true, says: "CF_ACCESS_CLIENT_ID and CF_ACCESS_CLIENT_SECRET are swapped: each holds what the other should" };
  if (!idOk && !secretOk) return { swapped: false, says: "neither half is shaped as Access makes them (CF_ACCESS_CLIENT_ID: 32 hex characters, then .access; CF_ACCESS_CLIENT_SECRET: 64 hex characters)" };
  return idOk
    ? { swapped: false, says: "CF_ACCESS_CLIENT_SECRET is not shaped as Access makes a Client Secret (64 hex characters): that half is wrong" }
    : { swapped: false, says: "CF_ACCESS_CLIENT_ID is not shaped as Access makes a Client ID (32 hex characters, then .access): that half is wrong" };
}

/** Access's login page, where Access sends a request it does not let through (its default). */
const toAccessLogin = (a: Answer) => a.status >= 300 && a.status < 400 && /^https:\/\/[^/]+\.cloudflareaccess\.com\//i.test(a.location ?? "");
/** The relay's own answers are JSON with an error code; Access's and cloudflared's are not. */
const fromRelay = (a: Answer) => typeof a.json?.error === "string" || typeof a.json?.status === "string";

/**
 * What a refusal in front of the host at `where` means, given the token the doctor sent (or none);
 * null when the answer is not one (it is the relay's own, or something else's).
 */
export function accessRefusal(token: ServiceToken | undefined, a: Answer, where: string): Finding | null {
  if (fromRelay(a)) return null;
  if (a.status === 403 && a.text === "") {
    return {
      part: "public-url",
      status: "fail",
      found: `GET ${where} answered 403 with no body: cloudflared's Access check (originRequest.access) refused it, as it came without an Access JWT for cloudflared's audTag${token ? ": no Access application let the service token through" : ""}`,
      fix: "an Access application for the hostname with a Service Auth policy (docs/access.md, step 3); audTag under the ingress rule is that application's AUD tag",
    };
  }
  if (!toAccessLogin(a) && a.status !== 401 && a.status !== 403) return null;
  const what = inFront(a);
  if (!token) {
    return {
      part: "public-url",
      status: "fail",
      found: `GET ${where} answered ${what}: Cloudflare Access guards it, and no service token is set here`,
      fix: "CF_ACCESS_CLIENT_ID and CF_ACCESS_CLIENT_SECRET in the doctor's environment, the Worker's values: the doctor then passes where the Worker passes",
    };
  }
  const shape = tokenShapeProblem(token);
  return {
    part: "public-url",
    status: "fail",
    found: `Cloudflare Access did not let the service token through at ${where} (${what}): ${
      shape?.says ??
      "both halves are shaped as Access makes them, and Access answers a wrong Client ID as it answers a wrong secret: the token is revoked or expired, belongs to another account, or is not in the application's policy"
    }`,
    fix: shape ? TOKEN_FIX : "Zero Trust > Access > Service credentials: the token's expiry; the application's policy: Action Service Auth, Include Service Token = this token; the Worker has the same two values",
  };
}

export const access: DoctorPart = {
  name: "access",
  async run(ctx) {
    const settings = ctx.config?.access;
    const token = ctx.serviceToken;
    if (!settings && !token) {
      return [{ part: "access", status: "skip", found: "Cloudflare Access is not set up here: no ACCESS_TEAM_DOMAIN/ACCESS_AUD, no CF_ACCESS_CLIENT_ID/CF_ACCESS_CLIENT_SECRET" }];
    }
    const findings: Finding[] = [];
    if (settings) findings.push(await signingKeys(settings, ctx.timeoutMs));
    else if (ctx.config) {
      findings.push({
        part: "access",
        status: "warn",
        found: "the service token is set, but the host does not check Access's JWT (no ACCESS_TEAM_DOMAIN/ACCESS_AUD): anything reaching its port another way passes on the key alone",
        fix: "ACCESS_TEAM_DOMAIN and ACCESS_AUD in the host's environment (docs/access.md, step 5)",
      });
    }
    if (!token) {
      if (ctx.publicUrl) {
        findings.push({ part: "access", status: "warn", found: "the host wants Access's JWT, and no service token is set here: PUBLIC_URL cannot be checked past Access", fix: "CF_ACCESS_CLIENT_ID and CF_ACCESS_CLIENT_SECRET in the doctor's environment, the Worker's values" });
      }
      return findings;
    }
    const shape = tokenShapeProblem(token);
    if (shape) findings.push({ part: "access", status: shape.swapped ? "fail" : "warn", found: shape.says, fix: TOKEN_FIX });
    else findings.push({ part: "access", status: "ok", found: "the service token (CF_ACCESS_CLIENT_ID, CF_ACCESS_CLIENT_SECRET) is shaped as Access makes it; it goes with every request to PUBLIC_URL and EDGE_URL" });
    if (ctx.publicUrl) findings.push(await doorShut(new URL("/health", ctx.publicUrl), ctx.timeoutMs));
    return findings;
  },
};

async function signingKeys(settings: AccessSettings, ms: number): Promise<Finding> {
  const r = await accessCertsReachable(settings.certsUrl, ms);
  if (r.ok) return { part: "access", status: "ok", found: `${settings.certsUrl}: ${r.kids.length} RSA signing key(s) (${r.kids.join(", ")})` };
  return {
    part: "access",
    status: "fail",
    found: `Access's signing keys cannot be fetched: ${r.error}: the host then answers every request but /health with 503 (mail waits)`,
    fix: "ACCESS_TEAM_DOMAIN is the team domain (<team>.cloudflareaccess.com, Zero Trust > Settings), or ACCESS_CERTS_URL the certs' URL; the host must reach it over HTTPS",
  };
}

/** PUBLIC_URL without the service token: Access (or cloudflared) turns it away, or the door is open. */
async function doorShut(url: URL, ms: number): Promise<Finding> {
  const a = await get(url, ms);
  if (typeof a === "string") return { part: "access", status: "skip", found: `GET ${url.origin}/health without the service token: ${a} (the public-url check says more)` };
  if (a.status === 200 && a.json?.status === "healthy") {
    return {
      part: "access",
      status: "warn",
      found: `GET ${url.origin}/health without the service token reaches the relay: no Access application guards the hostname, the door is open`,
      fix: "an Access application for the hostname with one Service Auth policy (docs/access.md, step 3)",
    };
  }
  if (toAccessLogin(a) || ((a.status === 401 || a.status === 403) && !fromRelay(a))) {
    return { part: "access", status: "ok", found: `GET ${url.origin}/health without the service token is turned away (${inFront(a)}): the door is shut` };
  }
  return { part: "access", status: "skip", found: `GET ${url.origin}/health without the service token answered ${inFront(a)} (the public-url check says more)` };
}
