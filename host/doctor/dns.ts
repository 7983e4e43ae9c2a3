// DNS: for each MAIL_DOMAIN, that its MX records are Cloudflare Email Routing's (and which other
// host still takes mail when not), that its SPF record includes Cloudflare's, and that it has a
// DMARC record. Asked through node:dns's Resolver: DNS_SERVER when set, the system's otherwise.

import { Resolver } from "node:dns/promises";
import type { DoctorContext, DoctorPart, Finding } from "./finding.ts";

export const CLOUDFLARE_MX = new Set(["route1.mx.cloudflare.net", "route2.mx.cloudflare.net", "route3.mx.cloudflare.net"]);
const SPF_INCLUDE = "include:_spf.mx.cloudflare.net";
const ENABLE_ROUTING = "in Cloudflare's dashboard, Email > Email Routing for the domain: enable it (it adds route1/2/3.mx.cloudflare.net and its SPF record)";

export const dns: DoctorPart = {
  name: "dns",
  async run(ctx) {
    if (!ctx.domains.length) return [{ part: "dns", status: "skip", found: "MAIL_DOMAIN is not set: no domain to look up", fix: "MAIL_DOMAIN=example.com (comma-separated for several)" }];
    const resolver = new Resolver({ timeout: ctx.timeoutMs, tries: 2 });
    if (ctx.dnsServer) resolver.setServers([ctx.dnsServer]);
    const findings: Finding[] = [];
    for (const domain of ctx.domains) findings.push(await mx(resolver, domain, ctx), await spf(resolver, domain, ctx), await dmarc(resolver, domain, ctx));
    return findings;
  },
};

type Lookup<T> = { records: T[] } | { error: string; missing: boolean };

/** A lookup's records; "none" (NXDOMAIN, no data) apart from a resolver that failed to answer. */
async function lookup<T>(ask: () => Promise<T[]>, ctx: DoctorContext): Promise<Lookup<T>> {
  try {
    return { records: await ask() };
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "";
    if (code === "ENOTFOUND" || code === "ENODATA") return { error: code === "ENOTFOUND" ? "the name does not exist (NXDOMAIN)" : "no such record", missing: true };
    const server = `the DNS server ${ctx.dnsServer ?? "(the system's)"}`;
    return { error: code === "EREFUSED" || code === "ESERVFAIL" ? `${server} refused to answer (${code})` : `${server} did not answer: ${code || (e as Error).message}`, missing: false };
  }
}

const unreachable = (part: string, error: string): Finding => ({ part, status: "fail", found: error, fix: "check DNS_SERVER, or the machine's resolver (/etc/resolv.conf)" });

async function mx(resolver: Resolver, domain: string, ctx: DoctorContext): Promise<Finding> {
  const r = await lookup(() => resolver.resolveMx(domain), ctx);
  if ("error" in r) {
    if (!r.missing) return unreachable("dns", `${domain} MX: ${r.error}`);
    return { part: "dns", status: "fail", found: `${domain} MX: ${r.error}: mail for it cannot be delivered anywhere`, fix: ENABLE_ROUTING };
  }
  const all = r.records.map((m) => ({ host: m.exchange.toLowerCase().replace(/\.$/, ""), priority: m.priority })).sort((a, b) => a.priority - b.priority);
  const list = (ms: typeof all) => ms.map((m) => `${m.host} (${m.priority})`).join(", ");
  const ours = all.filter((m) => CLOUDFLARE_MX.has(m.host));
  const others = all.filter((m) => !CLOUDFLARE_MX.has(m.host));
  if (!others.length) return { part: "dns", status: "ok", found: `${domain} MX: ${list(all)}: all Cloudflare Email Routing` };
  if (!ours.length) {
    return { part: "dns", status: "fail", found: `${domain} MX: ${list(others)}: mail still goes there (the old gateway?), not to Cloudflare`, fix: `${ENABLE_ROUTING}; then delete the MX record(s) of ${others.map((m) => m.host).join(", ")}` };
  }
  const best = ours[0]!.priority;
  const preferred = others.filter((m) => m.priority <= best);
  if (preferred.length) {
    return { part: "dns", status: "fail", found: `${domain} MX: ${list(preferred)} ranks with or above Cloudflare's (${best}): senders deliver there first`, fix: `delete the MX record(s) of ${preferred.map((m) => m.host).join(", ")}` };
  }
  return { part: "dns", status: "warn", found: `${domain} MX: ${list(others)} besides Cloudflare's: senders deliver there whenever Cloudflare's do not answer them`, fix: `delete the MX record(s) of ${others.map((m) => m.host).join(", ")} once that host no longer relays here` };
}

async function spf(resolver: Resolver, domain: string, ctx: DoctorContext): Promise<Finding> {
  const r = await lookup(() => resolver.resolveTxt(domain), ctx);
  if ("error" in r && !r.missing) return unreachable("dns", `${domain} SPF: ${r.error}`);
  const records = "records" in r ? txtRecords(r.records).filter((t) => /^v=spf1(\s|$)/i.test(t)) : [];
  const shown = records.map((t) => JSON.stringify(t)).join(" and ");
  if (records.length === 0) return { part: "dns", status: "warn", found: `${domain} SPF: no v=spf1 record`, fix: `${ENABLE_ROUTING}, or add TXT "v=spf1 ${SPF_INCLUDE} ~all"` };
  if (records.length > 1) {
    return { part: "dns", status: "fail", found: `${domain} SPF: ${records.length} v=spf1 records (${shown}): that is a permerror (RFC 7208 4.5), receivers treat every check as failed`, fix: `merge them into one record, with ${SPF_INCLUDE} in it` };
  }
  if (!records[0]!.toLowerCase().split(/\s+/).includes(SPF_INCLUDE)) {
    return { part: "dns", status: "warn", found: `${domain} SPF: ${shown} does not include _spf.mx.cloudflare.net`, fix: `add ${SPF_INCLUDE} before its all (Email Routing lists it among the records it needs)` };
  }
  return { part: "dns", status: "ok", found: `${domain} SPF: ${shown}` };
}

async function dmarc(resolver: Resolver, domain: string, ctx: DoctorContext): Promise<Finding> {
  const name = `_dmarc.${domain}`;
  const r = await lookup(() => resolver.resolveTxt(name), ctx);
  if ("error" in r && !r.missing) return unreachable("dns", `${name}: ${r.error}`);
  const records = "records" in r ? txtRecords(r.records).filter((t) => /^v=DMARC1\s*(;|$)/i.test(t)) : [];
  if (records.length === 0) return { part: "dns", status: "warn", found: `${name}: no DMARC record`, fix: `add TXT ${name} "v=DMARC1; p=none; rua=mailto:postmaster@${domain}" (p=none only reports; tighten it later)` };
  if (records.length > 1) return { part: "dns", status: "fail", found: `${name}: ${records.length} DMARC records: receivers then apply none (RFC 7489 6.6.3)`, fix: "keep one" };
  return { part: "dns", status: "ok", found: `${name}: ${JSON.stringify(records[0])}` };
}

/**
 * TXT records as texts: a record's strings are one text (RFC 7208 3.3), as node:dns gives them
 * ([["v=spf1 include:a", " ~all"]]). Bun 1.4.5 gives each string as a record of its own, in order
 * (oven-sh/bun#21370): a string that does not start as a record does ("name=...", "v=spf1 ...") is
 * taken as the previous one's continuation, so a long SPF record split into strings is read whole.
 */
export function txtRecords(raw: string[][]): string[] {
  const texts: string[] = [];
  for (const chunks of raw) {
    const text = chunks.join("");
    if (chunks.length === 1 && texts.length && !/^[\w.-]+=/.test(text)) texts[texts.length - 1] += text;
    else texts.push(text);
  }
  return texts;
}
