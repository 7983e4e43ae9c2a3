// The doctor's settings: the host's own (host/config.ts) plus what only the doctor needs, read
// from the same environment. A bad one is a ✗ finding naming it (and the checks that need it are
// skipped), so that one run still reports everything else.

import { z } from "zod";
import { targetUrl } from "../../lmtp.ts";
import { ConfigError, fromEnv, keyedUrl } from "../../shared/config-env.ts";
import { ServerEnv, deliveryTarget, namedKeys, type ServerConfig } from "../config.ts";
import type { DoctorContext, Finding, ServiceToken } from "./finding.ts";

/** A domain name in ASCII (an IDN as its xn-- form), at least two labels. */
const DOMAIN = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}|xn--[a-z0-9-]{1,59})$/i;
/** What node:dns's setServers takes: an IP address, IPv6 in brackets when a port follows. */
const DNS_ADDRESS = /^(\d{1,3}(\.\d{1,3}){3}(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?|[0-9a-f:.]*:[0-9a-f:.]*)$/i;

const DoctorSettings = {
  PUBLIC_URL: keyedUrl("https://mail-api.example.com/api/v1/inbound-mail"),
  MAIL_DOMAIN: z
    .string()
    .transform((s) => [...new Set(s.split(",").map((d) => d.trim().toLowerCase().replace(/\.$/, "")).filter(Boolean))])
    .refine((ds) => ds.every((d) => DOMAIN.test(d)), { message: "must be domain names, comma-separated (example.com, example.org)" }),
  DNS_SERVER: z.string().trim().regex(DNS_ADDRESS, "must be an IP address with an optional port (127.0.0.1:53, [::1]:53)"),
};

export const DEFAULT_TIMEOUT_MS = 5_000;

export function doctorContext(env: Record<string, string | undefined>, timeoutMs = DEFAULT_TIMEOUT_MS): { ctx: DoctorContext; findings: Finding[] } {
  const findings: Finding[] = [];
  let config: ServerConfig | null = null;
  try {
    config = fromEnv(ServerEnv, env, "host configuration");
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    findings.push({ part: "configuration", status: "fail", found: e.message, fix: "set it in the host's environment (docs/configuration.md); the host would not start like this" });
  }
  const setting = <K extends keyof typeof DoctorSettings>(name: K): z.output<(typeof DoctorSettings)[K]> | undefined => {
    const value = env[name];
    if (value === undefined || value === "") return undefined;
    const r = DoctorSettings[name].safeParse(value);
    if (r.success) return r.data as z.output<(typeof DoctorSettings)[K]>;
    findings.push({ part: "configuration", status: "fail", found: `${name} ${r.error.issues[0]!.message}`, fix: "docs/doctor.md says what each setting takes" });
    return undefined;
  };
  const ctx: DoctorContext = {
    config,
    keys: namedKeys(env),
    publicUrl: setting("PUBLIC_URL"),
    domains: setting("MAIL_DOMAIN") ?? [],
    dnsServer: setting("DNS_SERVER"),
    serviceToken: serviceToken(env, findings),
    timeoutMs,
  };
  if (config) findings.push({ part: "configuration", status: "ok", found: describeConfig(config, ctx) });
  return { ctx, findings };
}

const TOKEN_HALVES = ["CF_ACCESS_CLIENT_ID", "CF_ACCESS_CLIENT_SECRET"] as const;

/**
 * The Worker's Access service token, as the Worker itself takes it (edge/config.ts): both halves or
 * neither. A half alone, or one with a character no token has, is a failed finding naming it,
 * never its value.
 */
function serviceToken(env: Record<string, string | undefined>, findings: Finding[]): ServiceToken | undefined {
  const [id, secret] = TOKEN_HALVES.map((name) => env[name]?.trim() ?? "");
  if (!id && !secret) return undefined;
  const fail = (found: string) => void findings.push({ part: "configuration", status: "fail", found, fix: "the values of the Worker's secrets of the same names (Zero Trust > Access > Service credentials); docs/access.md" });
  if (!id || !secret) {
    const [set, missing] = id ? TOKEN_HALVES : [TOKEN_HALVES[1], TOKEN_HALVES[0]];
    fail(`${missing} is not set, but ${set} is (set both, or neither): PUBLIC_URL and EDGE_URL are asked without the service token`);
    return undefined;
  }
  // Access's halves are hex, dots and a domain name; anything else is a paste gone wrong (and
  // a header cannot carry a control character, nor fetch() a character past Latin-1).
  const bad = TOKEN_HALVES.find((_, i) => /[^\x21-\x7e]/.test([id, secret][i]!));
  if (bad) {
    fail(`${bad} holds whitespace, a control character or a character outside ASCII: Access's tokens have none`);
    return undefined;
  }
  return { id, secret };
}

function describeConfig(c: ServerConfig, ctx: DoctorContext): string {
  const keys = ctx.keys.length === 1 ? "1 key" : `${ctx.keys.length} keys`;
  return `the host's settings parse: ${keys}, target ${targetUrl(deliveryTarget(c))}, spool ${c.spoolDir ?? "off"}, listening on ${c.host}:${c.port}`;
}
