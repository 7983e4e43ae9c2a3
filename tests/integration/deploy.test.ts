// `bun run deploy` as an operator runs it, with the real wrangler (4.86) against a stand-in for
// Cloudflare's API (tests/support/fake-cloudflare-api.ts): what one deploy uploads is what the
// runbook promises (docs/operations.md 1.3): the operator's values from worker.env, the key as a
// secret in the same upload, Workers Logs on, the edge spool's bucket and cron, wrangler logged in
// with the token from worker.env; and a refused worker.env reaches no API at all.

import { afterAll, beforeAll, expect, test } from "bun:test";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { newApiKey } from "../../scripts/keygen.ts";
import { startFakeCloudflareApi, type FakeCloudflareApi } from "../support/fake-cloudflare-api.ts";
import { allowSlowTests } from "../support/timeout.ts";

allowSlowTests();

const repo = join(import.meta.dir, "..", "..");
const KEY = newApiKey();
const TOKEN = `cf-token-${crypto.randomUUID()}`;
let api: FakeCloudflareApi;
let dir: string;
/** The deploy's own TMPDIR: other test runs on the machine make their own relay-deploy- folders in the shared one. */
let deployTmp: string;

beforeAll(() => {
  api = startFakeCloudflareApi();
  dir = mkdtempSync(join(tmpdir(), "relay-deploy-test-"));
  deployTmp = join(dir, "tmp");
  mkdirSync(deployTmp);
});
afterAll(async () => {
  await api.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** `bun run deploy ARGS` with worker.env's text; the environment has no Cloudflare login of its own. */
async function deploy(envText: string, args: string[] = []) {
  const file = join(dir, `worker-${crypto.randomUUID()}.env`);
  writeFileSync(file, envText);
  chmodSync(file, 0o600);
  const env: Record<string, string | undefined> = { ...process.env, WORKER_ENV_FILE: file, TMPDIR: deployTmp, CLOUDFLARE_API_BASE_URL: api.baseUrl, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1" };
  delete env.CLOUDFLARE_API_TOKEN;
  delete env.CLOUDFLARE_ACCOUNT_ID;
  delete env.API_KEY;
  const proc = Bun.spawn([process.execPath, "run", "deploy", ...args], { cwd: repo, env, stdout: "pipe", stderr: "pipe" });
  const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  // Without bun's own "$ bun run scripts/deploy.ts" line.
  return { code, output: stdout + stderr.replace(/^\$ .*\n/, "") };
}

const WORKER_ENV = [
  "DELL_API_ENDPOINT=https://mail-api.kuma.test/api/v1/inbound-mail",
  "POSTMASTER=postmaster@kuma.test",
  `API_KEY=${KEY}`,
  `CLOUDFLARE_API_TOKEN=${TOKEN}`,
  "CLOUDFLARE_ACCOUNT_ID=0123456789abcdef0123456789abcdef",
  "EDGE_URL=https://mailserver-inbound-relay.relay-test.workers.dev",
].join("\n");

test("one deploy uploads worker.env's values, the key as a secret, Workers Logs on, the bucket and the cron", async () => {
  const before = api.requests.length;
  const { code, output } = await deploy(WORKER_ENV);
  expect({ code, output: code === 0 ? "" : output }).toEqual({ code: 0, output: "" });

  const uploads = api.uploads();
  expect(uploads).toHaveLength(1);
  const bindings = Object.fromEntries(uploads[0]!.bindings.map((b) => [b.name, b]));
  expect(bindings.DELL_API_ENDPOINT).toEqual({ name: "DELL_API_ENDPOINT", type: "plain_text", text: "https://mail-api.kuma.test/api/v1/inbound-mail" });
  expect(bindings.POSTMASTER).toEqual({ name: "POSTMASTER", type: "plain_text", text: "postmaster@kuma.test" });
  // wrangler.toml's defaults for what worker.env leaves out.
  expect(bindings.HOST_TIMEOUT_MS).toEqual({ name: "HOST_TIMEOUT_MS", type: "plain_text", text: "25000" });
  expect(bindings.API_KEY).toEqual({ name: "API_KEY", type: "secret_text", text: KEY });
  expect(bindings.EDGE_SPOOL).toEqual({ name: "EDGE_SPOOL", type: "r2_bucket", bucket_name: "mailserver-inbound-relay-spool" });
  // Neither wrangler's login nor the tools' URL becomes a binding.
  expect(Object.keys(bindings).sort()).toEqual(["ALLOWED_RECIPIENTS", "API_KEY", "DELL_API_ENDPOINT", "EDGE_SPOOL", "EDGE_SPOOL_MAX_AGE_HOURS", "EDGE_SPOOL_SUBREQUESTS", "HOST_TIMEOUT_MS", "POSTMASTER", "SELF"]);
  // The drain's binding to the Worker itself (docs/edge-spool.md): a service binding to its own name.
  expect(bindings.SELF).toMatchObject({ name: "SELF", type: "service", service: "mailserver-inbound-relay" });
  expect(uploads[0]!.observability).toEqual({ enabled: true, head_sampling_rate: 1 });

  const mine = api.requests.slice(before);
  expect(mine.find((r) => r.path.endsWith("/schedules"))?.body).toBe('[{"cron":"* * * * *"}]');
  expect(new Set(mine.map((r) => r.authorization))).toEqual(new Set([`Bearer ${TOKEN}`]));
  expect(mine.every((r) => r.path.startsWith("/accounts/0123456789abcdef0123456789abcdef/"))).toBe(true);

  // What the operator reads: the values, never the key nor its start.
  expect(output).toContain("DELL_API_ENDPOINT=https://mail-api.kuma.test/api/v1/inbound-mail");
  expect(output).toContain("API_KEY (secret)");
  expect(output).not.toContain(KEY.slice(0, 12));
  expect(output).toContain("https://mailserver-inbound-relay.relay-test.workers.dev");
  // The secrets file is gone.
  expect(readdirSync(deployTmp).filter((f) => f.startsWith("relay-deploy-"))).toEqual([]);
}, 90_000);

test("--dry-run checks the same values and uploads nothing", async () => {
  const before = api.requests.length;
  const { code, output } = await deploy(WORKER_ENV, ["--dry-run"]);
  expect({ code, output: code === 0 ? "" : output }).toEqual({ code: 0, output: "" });
  expect(output).toContain("--dry-run: exiting now.");
  expect(output).toMatch(/env\.API_KEY \("\(hidden\)"\)/);
  expect(api.requests.slice(before)).toEqual([]);
}, 90_000);

test("a refused worker.env stops with one line and reaches no API", async () => {
  const before = api.requests.length;
  const missingKey = await deploy(WORKER_ENV.replace(`API_KEY=${KEY}`, ""));
  expect(missingKey).toEqual({ code: 2, output: expect.stringMatching(/^[^\n]*API_KEY is not set[^\n]*\n$/) });
  const placeholder = await deploy(WORKER_ENV.replace("mail-api.kuma.test", "mail-api.example.com"));
  expect(placeholder.code).toBe(2);
  expect(placeholder.output).toContain("DELL_API_ENDPOINT is a placeholder");
  expect(api.requests.slice(before)).toEqual([]);
}, 90_000);

test("without worker.env: one line saying where it comes from", async () => {
  const env = { ...process.env, WORKER_ENV_FILE: join(dir, "absent.env"), CLOUDFLARE_API_BASE_URL: api.baseUrl };
  const proc = Bun.spawn([process.execPath, "run", "deploy"], { cwd: repo, env, stdout: "pipe", stderr: "pipe" });
  const [code, stderr] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  expect(code).toBe(2);
  expect(stderr).toContain("not found: copy examples/worker.env.example to");
}, 30_000);
