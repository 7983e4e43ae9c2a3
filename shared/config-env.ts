// Settings from the environment, for both runtimes: the host's process.env (host/config.ts) and
// the Worker's env, vars and secrets (edge/config.ts). A bad or missing value stops with one line
// that names it; key values never appear in that line.

import { z } from "zod";

/** The shortest API key either side accepts (`bun run keygen` makes one of 64 characters). */
export const MIN_KEY_LENGTH = 32;

export class ConfigError extends Error {
  override name = "ConfigError";
}

/**
 * Parses a schema from the environment; the first problem becomes one line naming the setting.
 * Only strings are settings (the Worker's env also holds its bindings), and an empty one means
 * "not set": the default applies rather than a failure on "".
 */
export function fromEnv<T extends z.ZodType>(schema: T, env: Record<string, unknown>, what = "configuration"): z.output<T> {
  const set = Object.fromEntries(Object.entries(env).filter(([, v]) => typeof v === "string" && v !== ""));
  const r = schema.safeParse(set);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  throw new ConfigError(`${what}: ${issue.path.map(String).join(".") || "environment"} ${issue.message}`);
}

/** A URL the relay may send its key to: https, or plain http to this machine only. */
export function isHttpsOrLocal(u: string): boolean {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    return false;
  }
  return url.protocol === "https:" || (url.protocol === "http:" && /^(localhost|127\.0\.0\.1|\[::1\])$/.test(url.hostname));
}

/** A setting that is a URL the key is sent to (isHttpsOrLocal); `example` shows its form. */
export function keyedUrl(example: string) {
  return z
    .string()
    // abort: zod 4 runs later checks after a failed one, and new URL() would throw past safeParse.
    .url({ error: `must be a URL (${example})`, abort: true })
    .refine((u) => isHttpsOrLocal(u), { message: "must be https:// (plain http only for localhost)" });
}
