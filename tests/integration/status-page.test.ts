// /status in a real browser: Debian's Chromium, headless, driven by playwright-core. After known
// deliveries through the real host (delivered, a duplicate, a refusal, one spooled), the page
// renders at a phone's width, its numbers are /metrics' numbers, what a sender wrote is shown as
// text and never run, and without the key the browser gets 401 and nothing of the state. The
// screenshot is kept in .bench/status-page.png (ignored by git) to look at.

import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { startFakeLmtp, type FakeLmtpServer } from "../../fake-lmtp.ts";
import { Spool } from "../../host/spool.ts";
import { newApiKey } from "../../scripts/keygen.ts";
import { sendToHost, testMessage } from "../../scripts/send-test.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { spoolDirect } from "../support/spooled.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();
setDefaultTimeout(20_000);

const KEY = newApiKey();
const ROOT = join(import.meta.dir, "..", "..");
const SHOT = join(ROOT, ".bench", "status-page.png");
const CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let fake: FakeLmtpServer;
let host: RunningServer;
let browser: Browser;
let dir: string;

function chromiumPath(): string {
  const found = Bun.which("chromium") ?? Bun.which("chromium-browser");
  if (!found) throw new Error("Chromium is not installed: apt-get install -y chromium (scripts/setup.sh does)"); // a failure, never a skip
  return found;
}

beforeAll(async () => {
  dir = await mkdtemp("/tmp/status-page-");
  fake = await startFakeLmtp();
  // Backoff of an hour: the spooled message stays in the spool while the page is looked at.
  host = startServer(
    { apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 1 << 20, spoolDir: dir },
    { log: () => {}, queue: { baseBackoffMs: 3_600_000 } },
  );
  // headless by default; playwright gives it a fresh profile (--user-data-dir) of its own.
  browser = await chromium.launch({ executablePath: chromiumPath(), args: CHROMIUM_FLAGS });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await browser?.close();
  await host?.stop();
  await fake?.close();
  await rm(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

async function metrics(): Promise<Record<string, number>> {
  const text = await (await fetch(`${host.url}/metrics`, { headers: { "x-api-key": KEY } })).text();
  return Object.fromEntries(text.split("\n").filter((l) => l && !l.startsWith("#")).map((l) => [l.split(" ")[0]!, Number(l.split(" ")[1])]));
}

test("after known deliveries the page renders on a phone, its numbers are /metrics', and a sender's <script> is text", async () => {
  const to = "user@example.com";
  const statuses: number[] = [];
  const first = testMessage({ from: "sender@example.org", to });
  for (const msg of [first, testMessage({ from: "sender@example.org", to }), testMessage({ from: "sender@example.org", to }), first]) statuses.push((await sendToHost(host.url, KEY, msg)).status);
  fake.behaviour.rcpt = () => 550;
  statuses.push((await sendToHost(host.url, KEY, testMessage({ from: "sender@example.org", to: "nobody@example.com" }))).status);
  fake.behaviour.rcpt = () => 450;
  statuses.push((await sendToHost(host.url, KEY, testMessage({ from: "sender@example.org", to }))).status);
  expect(statuses).toEqual([200, 200, 200, 200, 422, 202]);
  // A spool file written with an envelope the contract would refuse today (an older host, a hand
  // edit): what the page shows comes from disk, and is shown as text.
  await spoolDirect(new Spool(dir), "<script>document.title='owned'</script>@evil.example", [to]);

  const context = await browser.newContext({ httpCredentials: { username: "operator", password: KEY }, viewport: { width: 390, height: 844 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const dialogs: string[] = [];
  page.on("dialog", (d) => {
    dialogs.push(d.message());
    void d.dismiss();
  });
  const res = await page.goto(`${host.url}/status`);
  expect(res?.status()).toBe(200);
  expect(await page.title()).toBe("mail-relay status");

  const expected = await metrics();
  const cells = await page.$$eval("[data-metric]", (tds) => tds.map((td) => [td.getAttribute("data-metric")!, Number(td.textContent)] as const));
  expect(cells.length).toBe(8);
  for (const [name, shown] of cells) expect({ name, shown }).toEqual({ name, shown: expected[name]! });
  expect(Object.fromEntries(cells)).toMatchObject({ relay_delivered_total: 3, relay_duplicates_total: 1, relay_rejected_total: 1, relay_queued_total: 1 });
  // All within the last hour: the hour's column equals the one since start.
  const hour = await page.$$eval("[data-last-hour]", (tds) => tds.map((td) => Number(td.textContent)));
  expect(hour).toEqual(cells.map(([, n]) => n));

  expect(await page.textContent("#spool-queued")).toBe("2");
  expect(await page.textContent("#spool-failed")).toBe("0");
  expect(await page.textContent("#target")).toBe(`lmtp://${fake.host}:${fake.port}`);
  expect(await page.textContent("#last-answer")).toContain("450");
  const body = (await page.textContent("body"))!;
  expect(body).toContain("<script>document.title='owned'</script>@evil.example → user@example.com");
  expect(await page.$$eval("script", (s) => s.length)).toBe(0);
  expect(dialogs).toEqual([]);
  expect(await page.title()).toBe("mail-relay status");
  // Readable on a phone: nothing wider than the screen outside the tables' own scrolling boxes.
  expect(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth)).toBe(true);

  await mkdir(join(ROOT, ".bench"), { recursive: true });
  await page.screenshot({ path: SHOT, fullPage: true });
  expect((await Bun.file(SHOT).arrayBuffer()).byteLength).toBeGreaterThan(5_000);
  await context.close();
});

test("without the key the browser gets 401 and nothing of the state; with a wrong one it is refused", async () => {
  // A navigation without credentials ends in the browser's own auth error; a fetch from a page of
  // the same origin shows what the host answered.
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${host.url}/health`);
  const [status, challenge, body] = await page.evaluate(async () => {
    const r = await fetch("/status", { credentials: "omit" });
    return [r.status, r.headers.get("www-authenticate"), await r.text()] as const;
  });
  expect(status).toBe(401);
  expect(challenge).toStartWith("Basic");
  expect(body).toContain("unauthorized");
  expect(body).not.toContain(String(fake.port));
  expect(body).not.toContain("example");
  await context.close();

  // Playwright answers the challenge with a wrong password; the host refuses it again, and the
  // browser either shows that 401 or gives up with its own auth error: never the page.
  const wrong = await browser.newContext({ httpCredentials: { username: "operator", password: newApiKey() } });
  const tried = await wrong.newPage().then(async (p) => {
    const res = await p.goto(`${host.url}/status`);
    return { status: res?.status(), body: (await p.textContent("body")) ?? "" };
  }, (e: Error) => ({ status: null, body: e.message }));
  if (tried.status === null) expect(tried.body).toContain("ERR_INVALID_AUTH_CREDENTIALS");
  else expect(tried.status).toBe(401);
  expect(tried.body).not.toContain(String(fake.port));
  await wrong.close();
});
