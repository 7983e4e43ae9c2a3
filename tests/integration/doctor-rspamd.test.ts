// The doctor's spam-filter check against the real rspamd (Debian's, tests/support/rspamd.ts), two
// of them, each started once for this file: one as the operator's stack ships it (the operator's
// examples/rspamd/local.d/options.inc, its private dnsmasq answering), and one gone wrong the two
// ways the doctor names: its resolver never answers (a UDP socket that reads and says nothing) and
// its actions.conf has `reject = null`. Then the cases with no rspamd there: nothing listening,
// something that is not rspamd, an rspamd that answers /ping but gives no verdict. Last, what the
// verdicts the real rspamd 3.4 cannot be made to give mean (GTUBE not recognised, as rspamd 3.8's
// gtube_patterns = "disabled" does; a plain message refused), with its /checkv2 reply played by a stub.
// Nothing is optional: without rspamd or dnsmasq, beforeAll throws (a failure, never a skip).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ServerConfig } from "../../host/config.ts";
import { doctorCommand } from "../../host/doctor/cli.ts";
import type { DoctorContext, Finding } from "../../host/doctor/finding.ts";
import { GTUBE, rspamd as spamFilter } from "../../host/doctor/rspamd.ts";
import { RspamdClient } from "../../host/spam-scan.ts";
import { newApiKey } from "../../scripts/keygen.ts";
import { freePort } from "../../scripts/free-port.ts";
import { startRspamd, type RspamdInstance } from "../support/rspamd.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const KEY = newApiKey();
const OPTIONS = new URL("../../examples/rspamd/local.d/options.inc", import.meta.url);

let shipped: RspamdInstance;
let broken: RspamdInstance;
/** broken's resolver: reads every question, answers none. */
let silent: { port: number; close(): void };
let questions = 0;
const servers: Server<undefined>[] = [];

beforeAll(async () => {
  silent = await Bun.udpSocket({ hostname: "127.0.0.1", socket: { data: () => void questions++ } });
  [shipped, broken] = await Promise.all([
    startRspamd({ options: await readFile(OPTIONS, "utf8") }),
    startRspamd({ resolver: `127.0.0.1:${silent.port}`, files: { "local.d/actions.conf": "reject = null;\n" } }),
  ]);
  // One scan first: the doctor's must not pay for what a fresh worker does once (its first task).
  await new RspamdClient(shipped.url, 20_000).scan({ from: "", to: ["a@example.org"], queueId: "warm-up", sender: null, hostname: null, body: new TextEncoder().encode("Subject: warm-up\r\n\r\nhi\r\n") });
}, 120_000);
afterAll(async () => {
  for (const s of servers) await s.stop(true);
  await Promise.all([shipped?.dispose(), broken?.dispose()]);
  silent?.close();
}, HOOK_TIMEOUT_MS);

const config = (url?: string): ServerConfig => ({ apiKeys: [KEY], lmtpHost: "dovecot", lmtpPort: 2525, port: 1, host: "127.0.0.1", maxMessageBytes: 1 << 20, spoolDir: "/nonexistent", ...(url ? { rspamd: { url, timeoutMs: 10_000 } } : {}) });
const ctx = (url?: string, domains: string[] = []): DoctorContext => ({ config: config(url), keys: [["API_KEY", KEY]], domains, timeoutMs: 3_000 });
const statuses = (fs: Finding[]) => fs.map((f) => f.status);
function serve(fetch: (req: Request) => Response): Server<undefined> {
  const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch });
  servers.push(s);
  return s;
}

test("RSPAMD_URL not set: skipped", async () => {
  const fs = await spamFilter.run(ctx());
  expect(statuses(fs)).toEqual(["skip"]);
  expect(fs[0]!.found).toContain("RSPAMD_URL is not set");
});

describe("rspamd as the operator's stack ships it", () => {
  test("pong; a test message scanned (no action, its score and time); its lookups answered; GTUBE rejected at the reject threshold: all ok", async () => {
    const fs = await spamFilter.run(ctx(shipped.url, ["example.org"]));
    if (process.env.SHOW_DOCTOR) console.log(fs);
    expect(statuses(fs)).toEqual(["ok", "ok", "ok", "ok"]);
    expect(fs[0]!.found).toBe(`rspamd at ${shipped.url}: GET /ping answered pong`);
    expect(fs[1]!.found).toMatch(/^a test message: "no action", score -?\d+\.\d\d of 15\.00, in \d+ ms$/);
    expect(fs[2]!.found).toBe("rspamd's lookups were answered (no DNS failure among its symbols)");
    expect(fs[3]!.found).toBe('GTUBE: "reject" (reject at score 15.00): the relay refuses what rspamd rejects while the sender is connected (550 5.7.1)');
  });

  test("the scans are rspamd's own tasks for postmaster@ of the first MAIL_DOMAIN, through the host's client (its Queue-Id), from the documentation address", async () => {
    await spamFilter.run(ctx(shipped.url, ["example.org", "example.net"]));
    const log = await shipped.log();
    const tasks = log.split("\n").filter((l) => /qid: <doctor-[0-9a-f-]{36}>/.test(l));
    expect(tasks.length).toBeGreaterThanOrEqual(2);
    for (const line of tasks.slice(-2)) {
      expect(line).toContain("ip: 192.0.2.1");
      expect(line).toContain("rcpts: <postmaster@example.org>");
    }
    expect(tasks.at(-1)).toContain("GTUBE");
  });

  test("a whole doctor run with RSPAMD_URL: the spam filter's lines are there", async () => {
    const spool = await mkdtemp(join(tmpdir(), "doctor-rspamd-"));
    try {
      let out = "";
      await doctorCommand([], { API_KEY: KEY, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(await freePort()), SPOOL_DIR: spool, RSPAMD_URL: shipped.url }, (t) => (out += t));
      expect(out).toMatch(/^✓ spam-filter +rspamd at .*: GET \/ping answered pong$/m);
      expect(out).toMatch(/^✓ spam-filter +GTUBE: "reject"/m);
    } finally {
      await rm(spool, { recursive: true, force: true });
    }
  });
});

describe("rspamd gone wrong: a resolver that never answers, and reject = null", () => {
  test("the lookups that timed out are named and the resolver blamed; GTUBE still rejected, but no spam can reach reject: two warnings", async () => {
    const before = questions;
    const fs = await spamFilter.run(ctx(broken.url, ["example.org"]));
    if (process.env.SHOW_DOCTOR) console.log(fs);
    expect(statuses(fs)).toEqual(["ok", "ok", "warn", "warn"]);
    expect(questions).toBeGreaterThan(before); // rspamd did ask it
    expect(fs[2]!.found).toStartWith("rspamd's resolver is not answering: its lookups failed (");
    expect(fs[2]!.found).toContain("R_SPF_DNSFAIL");
    expect(fs[2]!.fix).toContain("dns { nameserver");
    expect(fs[3]!.found).toStartWith('GTUBE: "reject", but the reject action has no threshold (reject = null in actions.conf)');
    expect(fs[3]!.fix).toContain("reject = 15;");
  });
});

describe("no rspamd there", () => {
  test("nothing listens: fail, naming the URL and the normal worker's port", async () => {
    const url = `http://127.0.0.1:${await freePort()}`;
    const fs = await spamFilter.run(ctx(url));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toStartWith(`rspamd at ${url}: GET /ping: `);
    expect(fs[0]!.found).toContain("the host delivers every message unscanned");
    expect(fs[0]!.fix).toContain("11333");
  });

  test("something else answers (404 to /ping): fail, not rspamd's pong", async () => {
    const other = serve(() => new Response("<html>not found</html>", { status: 404 }));
    const fs = await spamFilter.run(ctx(`http://127.0.0.1:${other.port}`));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain('GET /ping answered 404 "<html>not found</html>", not rspamd\'s pong');
  });

  test("pong, but no verdict from /checkv2 (500): fail, saying mail goes through unscanned", async () => {
    const half = serve((req) => (new URL(req.url).pathname === "/ping" ? new Response("pong\r\n") : new Response("internal error", { status: 500 })));
    const fs = await spamFilter.run(ctx(`http://127.0.0.1:${half.port}`));
    expect(statuses(fs)).toEqual(["ok", "fail"]);
    expect(fs[1]!.found).toBe("a test message got no verdict from POST /checkv2: HTTP 500: internal error: the host delivers such mail unscanned (X-Spam-Status: Unknown)");
  });
});

describe("what other verdicts mean (rspamd's /checkv2 reply played by a stub)", () => {
  /** An rspamd that answers pong, and `plain` or `gtube` (rspamd's JSON) to a scan, after `delayMs`. */
  function playing(plain: object, gtube: object, delayMs = 0): string {
    const s = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(req) {
        if (new URL(req.url).pathname === "/ping") return new Response("pong\r\n");
        const body = await req.text();
        await Bun.sleep(delayMs);
        return Response.json(body.includes(GTUBE) ? gtube : plain);
      },
    });
    servers.push(s);
    return `http://127.0.0.1:${s.port}`;
  }
  const reply = (action: string, score: number, symbols: Record<string, object> = {}) => ({ action, score, required_score: 15, symbols });
  const gtubeRejected = reply("reject", 15, { GTUBE: { score: 0 } });

  test.each([
    ["reject", "fail", "ordinary mail would be refused (550 5.7.1)"],
    ["discard", "fail", "ordinary mail would be refused (550 5.7.1)"],
    ["soft reject", "warn", "ordinary mail would be deferred (451 4.7.1)"],
    ["add header", "ok", ""],
  ] as const)("a plain test message gets %s: %s", async (action, status, says) => {
    const fs = await spamFilter.run(ctx(playing(reply(action, 9), gtubeRejected)));
    expect(fs[1]!.status).toBe(status);
    expect(fs[1]!.found).toContain(`a test message: "${action}", score 9.00 of 15.00`);
    expect(fs[1]!.found).toContain(says);
  });

  test("a scan of 2.5 s or more without a failed lookup: warn, rspamd waits on something", async () => {
    const fs = await spamFilter.run(ctx(playing(reply("no action", 1), gtubeRejected, 2_600)));
    expect(statuses(fs)).toEqual(["ok", "ok", "warn", "ok"]);
    expect(fs[2]!.found).toMatch(/^the scan took \d+\.\d s: rspamd waits on something/);
  });

  test("GTUBE not recognised (rspamd 3.8's gtube_patterns = \"disabled\"): warn, the check cannot show that spam is refused", async () => {
    const fs = await spamFilter.run(ctx(playing(reply("no action", 1), reply("no action", 1.5))));
    expect(fs[3]!.status).toBe("warn");
    expect(fs[3]!.found).toStartWith('GTUBE was not recognised (no GTUBE symbol; "no action", score 1.50 of 15.00)');
    expect(fs[3]!.fix).toContain("gtube_patterns");
  });

  test.each([
    ["add header", "warn", "the relay delivers it with X-Spam: Yes (into Junk), refusing nothing while the sender is connected"],
    ["soft reject", "warn", "the relay defers it (451) or delivers it, never refuses it"],
    ["no action", "warn", "the relay delivers it as ham"],
    ["discard", "ok", "the relay refuses it like reject"],
  ] as const)("GTUBE gets %s: %s, saying what the relay then does", async (action, status, says) => {
    const fs = await spamFilter.run(ctx(playing(reply("no action", 1), reply(action, 15, { GTUBE: { score: 0 } }))));
    expect(fs[3]!.status).toBe(status);
    expect(fs[3]!.found).toContain(says);
  });
});
