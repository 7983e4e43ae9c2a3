// The host's configuration from the environment, validated with zod (parsed by fromEnv, shared
// with the Worker). A bad or missing value stops start-up with one line that names it.

import { z } from "zod";
import { MIN_KEY_LENGTH, keyedUrl } from "../shared/config-env.ts";
import { DEFAULT_MAX_MESSAGE_BYTES } from "../shared/contract.ts";

const port = (fallback: number) =>
  z.coerce.number({ error: "must be a port number" }).int("must be a whole number").min(1, "must be 1-65535").max(65535, "must be 1-65535").default(fallback);

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
    LMTP_HOST: z.string().trim().min(1, "is empty").default("dovecot"),
    LMTP_PORT: port(2525),
    PORT: port(8080),
    HOST: z.string().trim().min(1, "is empty").default("127.0.0.1"),
    MAX_MESSAGE_BYTES: positiveInt(DEFAULT_MAX_MESSAGE_BYTES),
    SPOOL_DIR: z.string().trim().optional(),
    SPOOL_MAX_AGE_HOURS: positiveInt(120),
    EXACTLY_ONCE: flag,
    // Above 60 the server's own socket idle timeout (Bun.serve idleTimeout) would cut in first.
    /** The Worker's URL: /status shows what the edge holds (GET /edge/queue with the key). */
    EDGE_URL: keyedUrl("https://<the Worker>.workers.dev").optional(),
    BODY_IDLE_SECONDS: z.coerce.number({ error: "must be a number" }).int("must be a whole number").positive("must be positive").max(60, "must be at most 60 (the server's socket idle timeout)").default(10),
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
  })
  .transform(
    (env): ServerConfig => ({
      apiKeys: [...new Set(keysOf(env))],
      lmtpHost: env.LMTP_HOST,
      lmtpPort: env.LMTP_PORT,
      port: env.PORT,
      host: env.HOST,
      maxMessageBytes: env.MAX_MESSAGE_BYTES,
      spoolDir: env.SPOOL_DIR || undefined,
      spoolMaxAgeMs: env.SPOOL_MAX_AGE_HOURS * 3_600_000,
      exactlyOnce: env.EXACTLY_ONCE,
      bodyIdleMs: env.BODY_IDLE_SECONDS * 1000,
      edgeUrl: env.EDGE_URL,
    }),
  );

export interface ServerConfig {
  apiKeys: string[];
  lmtpHost: string;
  lmtpPort: number;
  port: number;
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
  /** The Worker, whose edge spool /status lists (and the doctor checks). */
  edgeUrl?: string;
}
