// What the doctor reports: one finding per check (✓ / ! / ✗, or skipped), each with what it found
// and, when something is wrong, the fix. A part of the path (DNS, the delivery target, the spool,
// ...) is one module with one DoctorPart; the doctor runs them in order. A new part (a spam
// filter, Access) is one more module in the list (parts.ts).

import type { ServerConfig } from "../config.ts";

export type CheckStatus = "ok" | "warn" | "fail" | "skip";

export interface Finding {
  /** The part of the path: "dns", "target", "spool", "public-url", "edge", ... */
  part: string;
  status: CheckStatus;
  /** What was found, in one line. Never a key or any part of one. */
  found: string;
  /** What to do about it (when status is warn or fail). */
  fix?: string;
}

/** What every check may use. */
export interface DoctorContext {
  /** The host's settings; null when they do not parse (the configuration finding says why). */
  config: ServerConfig | null;
  /** The host's keys with the setting each came from ("API_KEY", "API_KEYS (key 2)"): sent, never shown. */
  keys: [string, string][];
  /** PUBLIC_URL: the inbound URL through the tunnel (the Worker's DELL_API_ENDPOINT). */
  publicUrl?: string;
  /** MAIL_DOMAIN: the domains the relay receives mail for. */
  domains: string[];
  /** DNS_SERVER: the resolver to ask (ip or ip:port); the system's when unset. */
  dnsServer?: string;
  /**
   * CF_ACCESS_CLIENT_ID / CF_ACCESS_CLIENT_SECRET: the Worker's Access service token, sent on every
   * request to PUBLIC_URL and EDGE_URL so that the doctor passes where the Worker passes. Never shown.
   */
  serviceToken?: ServiceToken;
  /** Limit of each network question. */
  timeoutMs: number;
}

export interface ServiceToken {
  id: string;
  secret: string;
}

export interface DoctorPart {
  name: string;
  run(ctx: DoctorContext): Promise<Finding[]>;
}

export const MARK: Record<CheckStatus, string> = { ok: "✓", warn: "!", fail: "✗", skip: "-" };

/** Runs every part, one after the other; a part that throws is a failed finding of its own, not the end. */
export async function examine(parts: DoctorPart[], ctx: DoctorContext): Promise<Finding[]> {
  const findings: Finding[] = [];
  for (const part of parts) {
    try {
      findings.push(...(await part.run(ctx)));
    } catch (e) {
      findings.push({ part: part.name, status: "fail", found: `the check itself failed: ${(e as Error).message}` });
    }
  }
  return findings;
}

/** Exit code: 0 only when nothing failed. */
export const exitCode = (findings: Finding[]) => (findings.some((f) => f.status === "fail") ? 1 : 0);

/** One line per finding, the fix indented under it, and a count at the end. */
export function renderText(findings: Finding[]): string {
  const width = Math.max(...findings.map((f) => f.part.length), 4);
  const lines = findings.flatMap((f) => [`${MARK[f.status]} ${f.part.padEnd(width)}  ${f.found}`, ...(f.fix && f.status !== "ok" ? [`  ${" ".repeat(width)}  fix: ${f.fix}`] : [])]);
  const n = (s: CheckStatus) => findings.filter((f) => f.status === s).length;
  lines.push("", `${n("fail")} ✗, ${n("warn")} !, ${n("ok")} ✓, ${n("skip")} skipped`);
  return lines.join("\n") + "\n";
}

export function renderJson(findings: Finding[]): string {
  return JSON.stringify({ ok: exitCode(findings) === 0, findings }, null, 2) + "\n";
}
