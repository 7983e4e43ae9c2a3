// `bun run deploy [wrangler deploy options, e.g. --dry-run]`: deploys the Worker with the
// operator's own values. They live in worker.env beside wrangler.toml, a file git does not track
// (.gitignore), so `git pull` never meets an edited wrangler.toml; wrangler.toml keeps the
// defaults and the placeholders. One deploy carries everything (wrangler 4.86: `--var NAME:VALUE`
// for each value, `--secrets-file` for the secrets), so the Worker never runs a minute without its
// key. Before wrangler runs, the values go through the Worker's own schema (edge/config.ts): a bad
// one stops here with one line naming it, not as a thrown email() for every message afterwards.
//
// worker.env (examples/worker.env.example), KEY=VALUE lines:
//   the Worker's settings (docs/configuration.md): plain variables, except names ending in _KEY,
//     _SECRET, _TOKEN or _PASSWORD (API_KEY) and CF_ACCESS_CLIENT_ID, which go up as secrets;
//   CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID: wrangler's own login on a machine without a
//     browser, handed to wrangler, never to the Worker;
//   EDGE_URL: the Worker's URL, for `bun --env-file=worker.env run edge-queue`; not deployed.
// WORKER_ENV_FILE names another file.

import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { WorkerEnv, workerConfig } from "../edge/config.ts";
import { ConfigError } from "../shared/config-env.ts";

const root = join(import.meta.dir, "..");

/**
 * Names that go up as secrets: hidden in the dashboard, never in wrangler.toml. The Access service
 * token's id goes with its secret (docs/access.md keeps both as secrets).
 */
const SECRET_NAME = /_(KEY|SECRET|TOKEN|PASSWORD)$|^CF_ACCESS_CLIENT_ID$/;
/** wrangler's own credentials (headless login): its environment, not the Worker's. */
const WRANGLER_NAMES = new Set(["CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID"]);
/** Read by the operator's tools from the same file, not deployed. */
const TOOL_NAMES = new Set(["EDGE_URL"]);
/** A domain that can never be the operator's (RFC 2606): wrangler.toml's placeholders use it. */
const PLACEHOLDER = /(^|[@./])example\.(com|net|org)($|[/:,\s])/i;

export interface DeployPlan {
  vars: Record<string, string>;
  secrets: Record<string, string>;
  /** Handed to wrangler's environment (CLOUDFLARE_*). */
  wranglerEnv: Record<string, string>;
}

/**
 * KEY=VALUE lines as dotenv writes them: `#` comments and blank lines, an optional `export `, a
 * value in single or double quotes taken as it is, an unquoted one up to a ` #` comment.
 * Throws ConfigError naming the line that is none of these.
 */
export function parseEnvFile(text: string, name: string): Map<string, string> {
  const values = new Map<string, string>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
    if (!m) throw new ConfigError(`${name} line ${i + 1}: not NAME=value`);
    let value = m[2]!;
    const quoted = /^(["'])(.*)\1$/.exec(value);
    value = quoted ? quoted[2]! : value.replace(/\s+#.*$/, "").trim();
    values.set(m[1]!, value);
  });
  return values;
}

/**
 * What a deploy sends, from worker.env's text and wrangler.toml's: each value sorted into the
 * Worker's variables, its secrets and wrangler's environment, and the Worker's settings checked
 * as the Worker itself will read them (wrangler.toml's [vars] overridden by worker.env).
 * Throws ConfigError with one line naming the problem.
 */
export function deployPlan(envText: string, wranglerToml: string, name = "worker.env"): DeployPlan {
  const values = parseEnvFile(envText, name);
  const toml = Bun.TOML.parse(wranglerToml) as { vars?: Record<string, string>; r2_buckets?: { binding: string }[]; vpc_services?: { binding: string }[] };
  const tracked = toml.vars ?? {};
  const workerNames = new Set([...Object.keys(WorkerEnv.in.shape), ...Object.keys(tracked)]);
  const plan: DeployPlan = { vars: {}, secrets: {}, wranglerEnv: {} };
  for (const [key, value] of values) {
    if (WRANGLER_NAMES.has(key)) plan.wranglerEnv[key] = value;
    else if (TOOL_NAMES.has(key)) continue;
    else if (SECRET_NAME.test(key)) plan.secrets[key] = value;
    else if (workerNames.has(key)) plan.vars[key] = value;
    else throw new ConfigError(`${name}: ${key} is not a setting of the Worker (docs/configuration.md) nor one of CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID, EDGE_URL`);
  }
  // The key goes up with the deploy itself: a Worker without it would throw for every message
  // and log "API_KEY is not set" every minute from its cron until a `wrangler secret put`.
  if (!plan.secrets.API_KEY) throw new ConfigError(`${name}: API_KEY is not set (the same value as MAILSERVER_API_KEY in the stack's .env)`);

  const deployed: Record<string, unknown> = { ...tracked, ...plan.vars, ...plan.secrets };
  for (const [key, value] of Object.entries(deployed)) {
    if (typeof value === "string" && PLACEHOLDER.test(value)) {
      const whose = key in plan.vars ? "a placeholder" : "wrangler.toml's placeholder";
      throw new ConfigError(`${name}: ${key} is ${whose} (${value}): set your own ${key} in ${name}`);
    }
  }
  // The bucket's binding is only a name here: the check is that POSTMASTER is set beside it.
  if (toml.r2_buckets?.some((b) => b.binding === "EDGE_SPOOL")) deployed.EDGE_SPOOL = {};
  // Likewise the Workers VPC binding: through it, DELL_API_ENDPOINT may be plain http:// (docs/access.md).
  if (toml.vpc_services?.some((b) => b.binding === "HOST")) deployed.HOST = { fetch: () => Promise.reject(new Error("not called")) };
  try {
    workerConfig(deployed);
  } catch (e) {
    throw new ConfigError(`${name}: ${(e as Error).message.replace(/^worker configuration: /, "")}`);
  }
  return plan;
}

/** wrangler deploy's arguments for a plan, the secrets in `secretsFile`. */
export function wranglerArgs(plan: DeployPlan, secretsFile: string, extra: string[]): string[] {
  return ["deploy", ...Object.entries(plan.vars).flatMap(([k, v]) => ["--var", `${k}:${v}`]), "--secrets-file", secretsFile, ...extra];
}

async function main(argv: string[]): Promise<number> {
  const file = process.env.WORKER_ENV_FILE ?? join(root, "worker.env");
  const inside = relative(process.cwd(), file);
  const shown = inside && !inside.startsWith("..") ? inside : file;
  if (!existsSync(file)) {
    console.error(`${shown} not found: copy examples/worker.env.example to ${shown} and fill it in (docs/operations.md, 1.3)`);
    return 2;
  }
  let plan: DeployPlan;
  try {
    plan = deployPlan(readFileSync(file, "utf8"), readFileSync(join(root, "wrangler.toml"), "utf8"), shown);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    console.error(e.message);
    return 2;
  }
  if (statSync(file).mode & 0o077) console.error(`warning: ${shown} holds the key and other users can read it: chmod 600 ${shown}`);

  console.log(`deploying with ${shown}:`);
  for (const [k, v] of Object.entries(plan.vars)) console.log(`  ${k}=${v}`);
  for (const k of Object.keys(plan.secrets)) console.log(`  ${k} (secret)`);
  if (plan.wranglerEnv.CLOUDFLARE_API_TOKEN) console.log("  wrangler logs in with CLOUDFLARE_API_TOKEN");

  // The secrets reach wrangler through a file only this user can read, removed afterwards: never
  // on the command line, where any user of the machine can read it (ps).
  const dir = mkdtempSync(join(tmpdir(), "relay-deploy-"));
  chmodSync(dir, 0o700);
  const secretsFile = join(dir, "secrets.json");
  try {
    writeFileSync(secretsFile, JSON.stringify(plan.secrets), { mode: 0o600 });
    const proc = Bun.spawn([process.execPath, "x", "wrangler", ...wranglerArgs(plan, secretsFile, argv)], {
      cwd: root,
      env: { ...process.env, ...plan.wranglerEnv },
      stdio: ["inherit", "inherit", "inherit"],
    });
    return await proc.exited;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
