// The Worker's configuration: wrangler.toml's [vars], the API_KEY secret (and the Access service
// token's two), the EDGE_SPOOL and HOST bindings, parsed by the same fromEnv as the host's. A bad
// setting is the operator's to fix: mail waits at the sender meanwhile (thrown, never a bounce).

import { z } from "zod";
import { ConfigError, MIN_KEY_LENGTH, fromEnv, isHttpsOrLocal } from "../shared/config-env.ts";
import { DEFAULT_MAX_MESSAGE_BYTES, addressProblem } from "../shared/contract.ts";
import { HOUR, type R2BucketLike } from "./spool.ts";

const allowEntry = z.string().refine((e) => (e.includes("@") ? addressProblem(e) === null : /^[a-z0-9.-]+\.[a-z]{2,}$/i.test(e)), {
  message: "must be an address (user@example.com) or a domain (example.com)",
});

export const WorkerEnv = z
  .object({
    DELL_API_ENDPOINT: z
      .string({ error: "is not set (the host's https://.../api/v1/inbound-mail)" })
      // abort: zod 4 runs later checks after a failed one, and new URL() would throw past safeParse.
      .url({ error: "must be a URL", abort: true }),
    API_KEY: z
      .string({ error: "is not set (wrangler secret put API_KEY)" })
      .min(MIN_KEY_LENGTH, `is shorter than ${MIN_KEY_LENGTH} characters`),
    HOST_TIMEOUT_MS: z.coerce.number({ error: "must be a number" }).int().min(1_000, "must be at least 1000").max(29_000, "must be below the 30 s Worker limit").default(25_000),
    MAX_MESSAGE_BYTES: z.coerce.number({ error: "must be a number" }).int().positive().default(DEFAULT_MAX_MESSAGE_BYTES),
    /** Optional allow-list: comma-separated addresses and/or domains. Empty: every recipient goes to the host. */
    ALLOWED_RECIPIENTS: z
      .string()
      .default("")
      .transform((s) => s.split(",").map((e) => e.trim().toLowerCase()).filter(Boolean))
      .pipe(z.array(allowEntry)),
    /** With EDGE_SPOOL: how long a held message is retried before it goes to failed/ (Postfix's 5 days). */
    EDGE_SPOOL_MAX_AGE_HOURS: z.coerce.number({ error: "must be a number" }).positive("must be more than 0").default(120),
    /**
     * Postfix's and Dovecot's recipient_delimiter ("+", or several characters, each one): mail to
     * user+tag@ is let through the allow-list and held as known when user@ would be.
     */
    RECIPIENT_DELIMITER: z
      .string()
      .refine((d) => d.length <= 8 && !/[@\s"<>,]/.test(d), { message: "must be a few delimiter characters such as + (no @, blanks, quotes, <>, commas)" })
      .default(""),
    /**
     * With EDGE_SPOOL: the subrequests (fetches, R2 calls, calls to itself) one invocation may
     * make: 50 on the free plan, 10,000 on the paid one. A drain's run stops within it.
     */
    EDGE_SPOOL_SUBREQUESTS: z.coerce.number({ error: "must be a number" }).int("must be a whole number").min(20, "must be at least 20").max(10_000, "must be at most 10000 (the paid plan's limit)").default(50),
    /** With EDGE_SPOOL: who hears of a held message the edge gave up on. */
    POSTMASTER: z
      .string()
      .refine((a) => addressProblem(a) === null, { message: "must be an address (postmaster@example.com)" })
      .optional(),
    /** A Cloudflare Access service token (secrets): sent on every request to the host. Both or neither. */
    CF_ACCESS_CLIENT_ID: z.string().optional(),
    CF_ACCESS_CLIENT_SECRET: z.string().optional(),
  })
  .superRefine((e, ctx) => {
    // Named, never shown: the message says which half is missing, not what the other half is.
    if (e.CF_ACCESS_CLIENT_ID && !e.CF_ACCESS_CLIENT_SECRET) ctx.addIssue({ code: "custom", path: ["CF_ACCESS_CLIENT_SECRET"], message: "is not set, but CF_ACCESS_CLIENT_ID is (set both, or neither)" });
    if (e.CF_ACCESS_CLIENT_SECRET && !e.CF_ACCESS_CLIENT_ID) ctx.addIssue({ code: "custom", path: ["CF_ACCESS_CLIENT_ID"], message: "is not set, but CF_ACCESS_CLIENT_SECRET is (set both, or neither)" });
  })
  .transform((e) => ({
    endpoint: e.DELL_API_ENDPOINT,
    apiKey: e.API_KEY,
    timeoutMs: e.HOST_TIMEOUT_MS,
    maxMessageBytes: e.MAX_MESSAGE_BYTES,
    allowed: e.ALLOWED_RECIPIENTS,
    maxAgeMs: e.EDGE_SPOOL_MAX_AGE_HOURS * HOUR,
    postmaster: e.POSTMASTER ?? "",
    access: e.CF_ACCESS_CLIENT_ID && e.CF_ACCESS_CLIENT_SECRET ? { clientId: e.CF_ACCESS_CLIENT_ID, clientSecret: e.CF_ACCESS_CLIENT_SECRET } : null,
    recipientDelimiter: e.RECIPIENT_DELIMITER,
    subrequests: e.EDGE_SPOOL_SUBREQUESTS,
  }));

/**
 * What the Worker needs of a binding that fetches: HOST (vpc_services, Workers VPC, or a service
 * binding standing in for one) and SELF (its service binding to itself).
 */
export interface FetchBinding {
  fetch(input: string, init?: RequestInit): Promise<Response>;
}

export type WorkerConfig = z.output<typeof WorkerEnv> & {
  spool: R2BucketLike | null;
  /** Bound: every request to the host goes through it (Workers VPC), not over the public hostname. */
  host: FetchBinding | null;
  /** The drain's binding to this Worker itself, to go on in a fresh invocation (edge/drain-runner.ts). */
  self: FetchBinding | null;
};

/** "user+tag@example.com" -> "user@example.com" for a delimiter "+"; the address itself when it has no tag. */
export function withoutTag(address: string, delimiter: string): string {
  const at = address.lastIndexOf("@");
  if (!delimiter || at <= 0) return address;
  let cut = -1;
  for (const d of delimiter) {
    const i = address.indexOf(d);
    if (i > 0 && i < at && (cut === -1 || i < cut)) cut = i;
  }
  return cut === -1 ? address : address.slice(0, cut) + address.slice(at);
}

/** The settings of this env; throws ConfigError naming the first bad one. */
export function workerConfig(env: Record<string, unknown>): WorkerConfig {
  const config = fromEnv(WorkerEnv, env, "worker configuration");
  const spool = (env.EDGE_SPOOL ?? null) as R2BucketLike | null;
  // Mail held at the edge can fail after the sender heard 250: someone must be told.
  if (spool && !config.postmaster) throw new ConfigError("worker configuration: POSTMASTER is not set (required with the EDGE_SPOOL bucket)");
  if (env.HOST !== undefined && typeof (env.HOST as Partial<FetchBinding>)?.fetch !== "function") {
    throw new ConfigError("worker configuration: HOST must be a binding (vpc_services in wrangler.toml), not a variable");
  }
  const host = (env.HOST ?? null) as FetchBinding | null;
  // Through the binding the request is encrypted to the tunnel whatever the scheme, and https://
  // would make cloudflared speak TLS to the host, which serves plain HTTP.
  if (!host && !isHttpsOrLocal(config.endpoint)) throw new ConfigError("worker configuration: DELL_API_ENDPOINT must be https:// (plain http only for localhost, or through the HOST binding)");
  // Optional: without it, a drain that runs out of subrequests goes on at the next cron run.
  const self = (env.SELF ?? null) as FetchBinding | null;
  return { ...config, spool, host, self: self && typeof self.fetch === "function" ? self : null };
}
