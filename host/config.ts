// The host's configuration from the environment, validated with zod (parsed by fromEnv, shared
// with the Worker). A bad or missing value stops start-up with one line that names it.

import { z } from "zod";
import { MIN_KEY_LENGTH, keyedUrl } from "../shared/config-env.ts";
import { DEFAULT_MAX_MESSAGE_BYTES } from "../shared/contract.ts";
import { lmtpTarget, parseDeliverTo, protocolOf, type LmtpTarget } from "../lmtp/target.ts";

const anyPort = z.coerce.number({ error: "must be a port number" }).int("must be a whole number").min(1, "must be 1-65535").max(65535, "must be 1-65535");
const port = (fallback: number) => anyPort.default(fallback);

const positiveInt = (fallback: number) =>
  z.coerce.number({ error: "must be a number" }).int("must be a whole number").positive("must be positive").default(fallback);

const flag = z.enum(["true", "false"], { error: "must be true or false" }).default("false").transform((v) => v === "true");

/** API_KEYS (comma-separated, all accepted at once, for rotation without a window) plus API_KEY. */
function keysOf(env: { API_KEY?: string; API_KEYS?: string }): string[] {
  return namedKeys(env).map(([, k]) => k);
}

/**
 * Each key with the setting it came from ("API_KEY", "API_KEYS (key 2)"), so a problem names the
 * variable the operator has to fix, not a position in a merged list.
 */
export function namedKeys(env: { API_KEY?: string; API_KEYS?: string }): [string, string][] {
  const listed = (env.API_KEYS ?? "").split(",").map((k) => k.trim());
  const named = listed.map((k, i): [string, string] => [`API_KEYS (key ${i + 1})`, k]);
  named.push(["API_KEY", (env.API_KEY ?? "").trim()]);
  return named.filter(([, k]) => k !== "");
}

export const ServerEnv = z
  .object({
    API_KEY: z.string().optional(),
    API_KEYS: z.string().optional(),
    // LMTP_HOST/LMTP_PORT: defaults applied below, once it is known that DELIVER_TO is not set.
    LMTP_HOST: z.string().trim().min(1, "is empty").optional(),
    LMTP_PORT: anyPort.optional(),
    DELIVER_TO: z
      .string()
      .trim()
      .transform((v, ctx) => {
        try {
          return parseDeliverTo(v);
        } catch (e) {
          ctx.addIssue({ code: "custom", message: `${(e as Error).message} (got ${JSON.stringify(v.slice(0, 100))})` });
          return z.NEVER;
        }
      })
      .optional(),
    ALIASES_FILE: z.string().trim().optional(),
    PORT: port(8080),
    // A second listener for monitoring from the host's own network (host/monitor-listener.ts).
    MONITOR_PORT: anyPort.optional(),
    HOST: z.string().trim().min(1, "is empty").default("127.0.0.1"),
    MAX_MESSAGE_BYTES: positiveInt(DEFAULT_MAX_MESSAGE_BYTES),
    SPOOL_DIR: z.string().trim().optional(),
    SPOOL_MAX_AGE_HOURS: positiveInt(120),
    EXACTLY_ONCE: flag,
    // Above 60 the server's own socket idle timeout (Bun.serve idleTimeout) would cut in first.
    // The spam filter (off when unset): rspamd's normal worker, e.g. http://rspamd:11333.
    RSPAMD_URL: z
      .string()
      .trim()
      .optional()
      .superRefine((u, ctx) => {
        const problem = u ? rspamdUrlProblem(u) : null;
        if (problem) ctx.addIssue({ code: "custom", message: problem });
      }),
    // Above rspamd's own task_timeout (8 s), below the Worker's HOST_TIMEOUT_MS (25 s).
    RSPAMD_TIMEOUT_MS: z.coerce.number({ error: "must be a number" }).int("must be a whole number").min(100, "must be at least 100").max(20_000, "must be at most 20000 (the Worker waits 25 s for the whole delivery)").default(10_000),
    /** The Worker's URL: /status shows what the edge holds (GET /edge/queue with the key). */
    EDGE_URL: keyedUrl("https://<the Worker>.workers.dev").optional(),
    BODY_IDLE_SECONDS: z.coerce.number({ error: "must be a number" }).int("must be a whole number").positive("must be positive").max(60, "must be at most 60 (the server's socket idle timeout)").default(10),
    // Cloudflare Access (docs/access.md): with both, every route but /health needs its JWT too.
    ACCESS_TEAM_DOMAIN: z
      .string()
      .trim()
      .transform((d) => d.replace(/^https:\/\//i, "").replace(/\/+$/, "").toLowerCase())
      .refine((d) => /^([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}$/.test(d), { message: "must be the team domain, e.g. myteam.cloudflareaccess.com" })
      .optional(),
    ACCESS_AUD: z
      .string()
      .transform((s) => s.split(",").map((a) => a.trim()).filter(Boolean))
      .refine((l) => l.length > 0 && l.every((a) => /^[0-9a-f]{64}$/i.test(a)), { message: "must be the Access application's AUD tag (64 hex characters), or several, comma-separated" })
      .optional(),
    ACCESS_CERTS_URL: z.string().trim().url({ error: "must be a URL" }).optional(),
  })
  .superRefine((env, ctx) => {
    const keys = keysOf(env);
    if (keys.length === 0) ctx.addIssue({ code: "custom", path: ["API_KEY"], message: "is not set (set API_KEY, or API_KEYS as a comma-separated list)" });
    for (const [name, k] of namedKeys(env)) {
      if (k.length < MIN_KEY_LENGTH) ctx.addIssue({ code: "custom", path: [name], message: `is shorter than ${MIN_KEY_LENGTH} characters (bun run keygen makes one)` });
      else if (/\s/.test(k)) ctx.addIssue({ code: "custom", path: [name], message: "contains whitespace" });
    }
    // The delivery ids are the spool's: without a spool there is no retry to recognise.
    if (env.EXACTLY_ONCE && !env.SPOOL_DIR) ctx.addIssue({ code: "custom", path: ["EXACTLY_ONCE"], message: "needs SPOOL_DIR (the retries it recognises come from the spool)" });
    // Half of Access would be a door that checks nothing, or one that nothing can pass.
    if (env.ACCESS_TEAM_DOMAIN && !env.ACCESS_AUD) ctx.addIssue({ code: "custom", path: ["ACCESS_AUD"], message: "is not set, but ACCESS_TEAM_DOMAIN is (set both, or neither)" });
    if (env.ACCESS_AUD && !env.ACCESS_TEAM_DOMAIN) ctx.addIssue({ code: "custom", path: ["ACCESS_TEAM_DOMAIN"], message: "is not set, but ACCESS_AUD is (set both, or neither)" });
    if (env.ACCESS_CERTS_URL && !env.ACCESS_TEAM_DOMAIN) ctx.addIssue({ code: "custom", path: ["ACCESS_CERTS_URL"], message: "needs ACCESS_TEAM_DOMAIN and ACCESS_AUD" });
    if (env.MONITOR_PORT !== undefined && env.MONITOR_PORT === env.PORT) ctx.addIssue({ code: "custom", path: ["MONITOR_PORT"], message: "is PORT: give the monitoring listener a port of its own (the tunnel reaches PORT only)" });
    if (env.DELIVER_TO && (env.LMTP_HOST !== undefined || env.LMTP_PORT !== undefined)) {
      ctx.addIssue({ code: "custom", path: ["DELIVER_TO"], message: "and LMTP_HOST/LMTP_PORT are both set: keep one (DELIVER_TO=lmtp://host:port says what they say)" });
    }
    if (env.DELIVER_TO && protocolOf(env.DELIVER_TO) === "smtp") {
      // The delivery id rides on the LHLO name that Dovecot writes into its Received header; behind
      // an MTA, Dovecot sees the MTA's LHLO, and the MTA's own queue decides about repeats.
      if (env.EXACTLY_ONCE) ctx.addIssue({ code: "custom", path: ["EXACTLY_ONCE"], message: "works only with an LMTP target (DELIVER_TO=smtp:// hands mail to an MTA, whose own LHLO is what Dovecot sees)" });
      if (env.ALIASES_FILE) ctx.addIssue({ code: "custom", path: ["ALIASES_FILE"], message: "is for an LMTP target only (with DELIVER_TO=smtp:// the MTA expands its own aliases)" });
    }
    // A message is scanned whole before LMTP: past the first MiB it waits in the spool's tmp/.
    if (env.RSPAMD_URL && !env.SPOOL_DIR) ctx.addIssue({ code: "custom", path: ["RSPAMD_URL"], message: "needs SPOOL_DIR (a message is scanned whole before delivery; past 1 MiB it waits in the spool's tmp/)" });
  })
  .transform(
    (env): ServerConfig => ({
      apiKeys: [...new Set(keysOf(env))],
      lmtpHost: env.LMTP_HOST ?? "dovecot",
      lmtpPort: env.LMTP_PORT ?? 2525,
      ...(env.DELIVER_TO ? { deliverTo: env.DELIVER_TO } : {}),
      ...(env.ALIASES_FILE ? { aliasesFile: env.ALIASES_FILE } : {}),
      port: env.PORT,
      ...(env.MONITOR_PORT !== undefined ? { monitorPort: env.MONITOR_PORT } : {}),
      host: env.HOST,
      maxMessageBytes: env.MAX_MESSAGE_BYTES,
      spoolDir: env.SPOOL_DIR || undefined,
      spoolMaxAgeMs: env.SPOOL_MAX_AGE_HOURS * 3_600_000,
      exactlyOnce: env.EXACTLY_ONCE,
      bodyIdleMs: env.BODY_IDLE_SECONDS * 1000,
      access:
        env.ACCESS_TEAM_DOMAIN && env.ACCESS_AUD
          ? {
              issuer: `https://${env.ACCESS_TEAM_DOMAIN}`,
              audiences: env.ACCESS_AUD,
              certsUrl: env.ACCESS_CERTS_URL ?? `https://${env.ACCESS_TEAM_DOMAIN}/cdn-cgi/access/certs`,
            }
          : undefined,
      ...(env.RSPAMD_URL ? { rspamd: { url: env.RSPAMD_URL, timeoutMs: env.RSPAMD_TIMEOUT_MS } } : {}),
      edgeUrl: env.EDGE_URL,
    }),
  );

export interface ServerConfig {
  apiKeys: string[];
  lmtpHost: string;
  lmtpPort: number;
  /** DELIVER_TO: where mail goes (LMTP or an MTA's SMTP); when set, lmtpHost/lmtpPort are not used. */
  deliverTo?: LmtpTarget;
  /** ALIASES_FILE: Postfix virtual(5) lines expanded before LMTP (host/aliases.ts). */
  aliasesFile?: string;
  port: number;
  /** MONITOR_PORT: GET /health, /ready, /metrics and /status only, with the key and without the Access check. */
  monitorPort?: number;
  host: string;
  maxMessageBytes: number;
  /** The durable spool; without it, temporary LMTP failures are answered 503. */
  spoolDir?: string;
  /** How long a spooled message is retried before it goes to failed/ (default 5 days). */
  spoolMaxAgeMs?: number;
  /**
   * Dovecot runs the relay's duplicate Sieve script (docs/operations.md, "Exactly once"): every
   * delivery carries its spool id, and deliveries to one mailbox save one at a time.
   */
  exactlyOnce?: boolean;
  /** A request body that sends no bytes for this long is answered 503 (default 10 s). */
  bodyIdleMs?: number;
  /** Cloudflare Access: every route but /health also needs a valid Cf-Access-Jwt-Assertion. */
  access?: AccessSettings;
  /** The spam filter: rspamd's normal worker and how long a scan may take (needs spoolDir). */
  rspamd?: { url: string; timeoutMs: number };
  /** The Worker, whose edge spool /status lists (and the doctor checks). */
  edgeUrl?: string;
}

/** Where the host delivers: DELIVER_TO, or else LMTP_HOST and LMTP_PORT. */
export function deliveryTarget(config: Pick<ServerConfig, "deliverTo" | "lmtpHost" | "lmtpPort">): LmtpTarget {
  return config.deliverTo ?? lmtpTarget(config.lmtpHost, config.lmtpPort);
}

export interface AccessSettings {
  /** `https://<team domain>`, as Access writes it in `iss`. */
  issuer: string;
  /** The application AUD tags; a token's `aud` must hold one of them. */
  audiences: string[];
  /** Where the signing keys are published (JWKS). */
  certsUrl: string;
}

/** Why RSPAMD_URL cannot be used, or null. It is logged at start-up, so it may hold no password. */
function rspamdUrlProblem(u: string): string | null {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    return "must be a URL (rspamd's normal worker, e.g. http://rspamd:11333)";
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return "must be http:// or https:// (rspamd's normal worker, e.g. http://rspamd:11333)";
  if (url.username || url.password) return "must not hold a user or password (rspamd's normal worker asks for none)";
  if (url.search || url.hash) return "must not have a query or fragment (/checkv2 is added to its path)";
  return null;
}
