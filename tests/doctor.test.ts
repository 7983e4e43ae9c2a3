// The doctor's own rules and the parts that need no DNS server or Dovecot: its settings, its
// output and exit code, the spool (a real one on disk, and a full disk), PUBLIC_URL against the
// real host (startServer, fake LMTP) and what stands in front of it, EDGE_URL against the edge's
// own app (edge/queue-http.ts in Bun, on an in-memory R2), and a whole run whose output holds no
// key, nor the start of one.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { workerConfig } from "../edge/config.ts";
import { edgeQueueApp } from "../edge/queue-http.ts";
import { EdgeSpool, HOUR } from "../edge/spool.ts";
import { doctorCommand } from "../host/doctor/cli.ts";
import { txtRecords } from "../host/doctor/dns.ts";
import { edge } from "../host/doctor/edge.ts";
import { exitCode, renderText, type DoctorContext, type Finding } from "../host/doctor/finding.ts";
import { publicUrl } from "../host/doctor/public-url.ts";
import { doctorContext } from "../host/doctor/settings.ts";
import { spool as spoolPart } from "../host/doctor/spool.ts";
import { Spool } from "../host/spool.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { newApiKey } from "../scripts/keygen.ts";
import { freePort } from "../scripts/free-port.ts";
import { startServer, type RunningServer } from "../server.ts";
import { INBOUND_PATH } from "../shared/contract.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { startScripted } from "./support/scripted-lmtp.ts";
import { spoolDirect } from "./support/spooled.ts";
import { fillDisk, mountTmpfs } from "./support/tmpfs.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

const KEY = newApiKey();
const OTHER_KEY = newApiKey();
const temps: string[] = [];
const tempDir = async () => {
  const d = await mkdtemp("/tmp/doctor-test-");
  temps.push(d);
  return d;
};

let fake: FakeLmtpServer;
let host: RunningServer;
beforeAll(async () => {
  fake = await startFakeLmtp();
  host = startServer({ apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 1 << 20 }, { log: () => {} });
}, HOOK_TIMEOUT_MS);
afterAll(async () => {
  await host?.stop();
  await fake?.close();
  await Promise.all(temps.map((d) => rm(d, { recursive: true, force: true })));
}, HOOK_TIMEOUT_MS);

const ctx = (over: Partial<DoctorContext> = {}): DoctorContext => ({ config: null, keys: [["API_KEY", KEY]], domains: [], timeoutMs: 2_000, ...over });
const statuses = (fs: Finding[]) => fs.map((f) => f.status);

/** A Bun server answering every request with `respond`. */
function stub(respond: (req: Request) => Response | Promise<Response>): Server<undefined> {
  return Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: respond });
}

describe("settings", () => {
  test("the host's settings, and the doctor's own, parse: one ok finding that names no key", () => {
    const { ctx: c, findings } = doctorContext({ API_KEY: KEY, API_KEYS: OTHER_KEY, LMTP_HOST: "/run/dovecot/lmtp", MAIL_DOMAIN: "Example.com, example.org.,example.com,xn--r8jz45g.xn--q9jyb4c", DNS_SERVER: "[::1]:5353", PUBLIC_URL: "https://mail-api.example.com/api/v1/inbound-mail" });
    expect(statuses(findings)).toEqual(["ok"]);
    expect(findings[0]!.found).toContain("2 keys, target lmtp:/run/dovecot/lmtp, spool off");
    expect(c.domains).toEqual(["example.com", "example.org", "xn--r8jz45g.xn--q9jyb4c"]);
    expect(c.dnsServer).toBe("[::1]:5353");
    expect(c.keys.map(([name]) => name)).toEqual(["API_KEYS (key 1)", "API_KEY"]);
  });

  test.each([
    ["PUBLIC_URL", "http://mail-api.example.com/", "PUBLIC_URL must be https://"],
    ["PUBLIC_URL", "mail-api.example.com", "PUBLIC_URL must be a URL"],
    ["MAIL_DOMAIN", "example.com, not a domain", "MAIL_DOMAIN must be domain names"],
    ["DNS_SERVER", "dns.example.com:53", "DNS_SERVER must be an IP address"],
    ["EDGE_URL", "ftp://edge.example", "host configuration: EDGE_URL must be"],
  ])("a bad %s is a failed finding naming it; the run goes on", (name, value, says) => {
    const { ctx: c, findings } = doctorContext({ API_KEY: KEY, [name]: value });
    const bad = findings.find((f) => f.status === "fail")!;
    expect(bad.found).toStartWith(says);
    expect(c.publicUrl).toBeUndefined();
  });

  test("no API_KEY: the configuration fails, and the checks that need the host's settings are skipped, not failed", async () => {
    const out: string[] = [];
    const code = await doctorCommand([], { LMTP_PORT: String(fake.port) }, (t) => out.push(t));
    expect(code).toBe(1);
    const text = out.join("");
    expect(text).toContain("✗ configuration  host configuration: API_KEY is not set");
    expect(text).toMatch(/^- target +the host's settings do not parse/m);
    expect(text).toMatch(/^- spool +the host's settings do not parse/m);
    expect(text).toMatch(/^- dns +MAIL_DOMAIN is not set/m);
  });

  test("DELIVER_TO: the settings' line names that target, not LMTP_HOST's default", () => {
    const { findings } = doctorContext({ API_KEY: KEY, DELIVER_TO: "smtp://postfix:10025" });
    expect(findings[0]!.found).toContain("target smtp://postfix:10025,");
  });

  test("the Access service token: both halves are taken (and never shown); one half alone, or one with a character no token has (CR LF, a full-width dot from a Japanese IME), fails naming it", () => {
    const id = `${"ab".repeat(16)}.access`;
    const secret = "cd".repeat(32);
    const both = doctorContext({ API_KEY: KEY, CF_ACCESS_CLIENT_ID: ` ${id} `, CF_ACCESS_CLIENT_SECRET: `${secret}\n` });
    expect(both.ctx.serviceToken).toEqual({ id, secret });
    expect(statuses(both.findings)).toEqual(["ok"]);
    for (const [env, says] of [
      [{ CF_ACCESS_CLIENT_ID: id }, "CF_ACCESS_CLIENT_SECRET is not set, but CF_ACCESS_CLIENT_ID is"],
      [{ CF_ACCESS_CLIENT_SECRET: secret }, "CF_ACCESS_CLIENT_ID is not set, but CF_ACCESS_CLIENT_SECRET is"],
      [{ CF_ACCESS_CLIENT_ID: id, CF_ACCESS_CLIENT_SECRET: `${secret.slice(0, 10)}\r\n${secret.slice(10)}` }, "CF_ACCESS_CLIENT_SECRET holds whitespace, a control character or a character outside ASCII"],
      [{ CF_ACCESS_CLIENT_ID: `${id}\u3000`.replace(".access", "。access"), CF_ACCESS_CLIENT_SECRET: secret }, "CF_ACCESS_CLIENT_ID holds whitespace, a control character or a character outside ASCII"],
    ] as const) {
      const { ctx: c, findings } = doctorContext({ API_KEY: KEY, ...env });
      expect(c.serviceToken).toBeUndefined();
      const bad = findings.find((f) => f.status === "fail")!;
      expect(bad.found).toStartWith(says);
      expect(JSON.stringify(findings)).not.toContain(id.slice(0, 8));
      expect(JSON.stringify(findings)).not.toContain(secret.slice(0, 8));
    }
  });

  test("a wrong command line: exit 2", async () => {
    expect(await doctorCommand(["--jsn"], {}, () => {})).toBe(2);
  });
});

describe("output", () => {
  const f = (status: Finding["status"]): Finding => ({ part: "x", status, found: status, fix: "do it" });
  test("exit 0 with warnings and skips, 1 with anything failed", () => {
    expect(exitCode([f("ok"), f("warn"), f("skip")])).toBe(0);
    expect(exitCode([f("ok"), f("fail")])).toBe(1);
  });
  test("one line each with its mark, the fix under what is wrong only, and the count", () => {
    expect(renderText([f("ok"), f("warn"), f("fail"), f("skip")])).toBe(
      ["✓ x     ok", "! x     warn", "        fix: do it", "✗ x     fail", "        fix: do it", "- x     skip", "        fix: do it", "", "1 ✗, 1 !, 1 ✓, 1 skipped", ""].join("\n"),
    );
  });
});

test("TXT records: a record's strings are one text, as node gives them and as Bun 1.4.5 splits them", () => {
  // node:dns: one record of two strings, and another record.
  expect(txtRecords([["v=spf1 include:_spf.mx.cloudflare.net", " ~all"], ["google-site-verification=x"]])).toEqual(["v=spf1 include:_spf.mx.cloudflare.net ~all", "google-site-verification=x"]);
  // Bun 1.4.5 (oven-sh/bun#21370): the same answer, each string apart.
  expect(txtRecords([["v=spf1 include:_spf.mx.cloudflare.net"], [" ~all"], ["google-site-verification=x"]])).toEqual(["v=spf1 include:_spf.mx.cloudflare.net ~all", "google-site-verification=x"]);
  expect(txtRecords([["v=spf1 -all"], ["v=spf1 include:_spf.mx.cloudflare.net ~all"]])).toHaveLength(2);
});

describe("spool", () => {
  async function spoolWith(dir: string) {
    const s = new Spool(dir);
    s.prepare();
    const commit = async (receivedAt: number) => (await spoolDirect(s, "a@example.org", ["b@example.com"], receivedAt)).id;
    return { s, commit };
  }

  test("not configured: skipped; configured but never used by the host: warn, not fail", async () => {
    const config = { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1 };
    expect(statuses(await spoolPart.run(ctx({ config })))).toEqual(["skip"]);
    const fs = await spoolPart.run(ctx({ config: { ...config, spoolDir: join(await tempDir(), "spool") } }));
    expect(statuses(fs)).toEqual(["warn"]);
    expect(fs[0]!.found).toContain("has not started with this spool yet");
  });

  test("writable and empty: ok; with a message waiting 2 h, one failed and one unreadable file: warnings that say so", async () => {
    const dir = await tempDir();
    const config = { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1, spoolDir: dir };
    const { s, commit } = await spoolWith(dir);
    expect(statuses(await spoolPart.run(ctx({ config })))).toEqual(["ok", "ok", "ok"]);

    await commit(Date.now() - 2 * HOUR);
    await commit(Date.now());
    await s.moveToFailed(await commit(Date.now()), "refused: 550 5.1.1 no such user");
    await writeFile(join(s.queue, "zzzzzzzzzzzz"), "not a spool file");
    const fs = await spoolPart.run(ctx({ config }));
    expect(statuses(fs)).toEqual(["ok", "warn", "warn", "warn"]);
    expect(fs[1]!.found).toStartWith("2 waiting, the oldest for 2.0h");
    expect(fs[2]!.found).toStartWith("1 failed");
    expect(fs[3]!.found).toStartWith("1 file(s) in the spool cannot be read");
    // The check's own file is gone again, and it touched nothing of the host's.
    expect(await Array.fromAsync(new Bun.Glob("*").scan(s.tmp))).toEqual([]);
    expect((await s.scan("queue")).entries).toHaveLength(2);
  });

  test("a full disk: fail, and the fix says what to do", async () => {
    const dir = await tempDir();
    mountTmpfs(dir, "256k");
    try {
      const config = { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1, spoolDir: dir };
      new Spool(dir).prepare();
      fillDisk(dir);
      const fs = await spoolPart.run(ctx({ config }));
      expect(statuses(fs)).toEqual(["fail"]);
      expect(fs[0]!.found).toContain("cannot be written");
      expect(fs[0]!.found).toMatch(/ENOSPC|no space/i);
      expect(fs[0]!.fix).toContain("free space");
    } finally {
      Bun.spawnSync(["umount", "-l", dir]);
    }
  });
});

describe("PUBLIC_URL", () => {
  test("not set: skipped", async () => {
    expect(statuses(await publicUrl.run(ctx()))).toEqual(["skip"]);
  });

  test("the real host: /health healthy, /ready with the key ready, naming the key's setting and the LMTP target", async () => {
    const fs = await publicUrl.run(ctx({ publicUrl: host.url + INBOUND_PATH }));
    expect(statuses(fs)).toEqual(["ok", "ok"]);
    expect(fs[1]!.found).toBe(`GET /ready with API_KEY: ready, the host delivers to lmtp://${fake.host}:${fake.port}`);
  });

  test("a host delivering over SMTP (DELIVER_TO=smtp://): /ready names it smtp://, and the doctor says so; other settings here: a warning that the target check asked elsewhere", async () => {
    const mta = await startScripted("220 mx.test ESMTP\r\n", (line) => (line.startsWith("EHLO") ? "250-mx.test\r\n250 PIPELINING\r\n" : line === "QUIT" ? "221 bye\r\n" : "250 2.0.0 Ok\r\n"));
    const deliverTo = { kind: "tcp", host: "127.0.0.1", port: mta.port, protocol: "smtp" } as const;
    const viaSmtp = startServer({ apiKeys: [KEY], lmtpHost: "dovecot", lmtpPort: 2525, deliverTo, port: 0, host: "127.0.0.1", maxMessageBytes: 1 << 20 }, { log: () => {} });
    try {
      const ready = (await (await fetch(`${viaSmtp.url}/ready`, { headers: { "x-api-key": KEY } })).json()) as Record<string, unknown>;
      expect(ready).toMatchObject({ status: "ready", target: `smtp://127.0.0.1:${mta.port}`, lmtp: `smtp://127.0.0.1:${mta.port}` });
      const config = { apiKeys: [KEY], lmtpHost: "dovecot", lmtpPort: 2525, port: 1, host: "x", maxMessageBytes: 1 };
      const same = await publicUrl.run(ctx({ publicUrl: viaSmtp.url + INBOUND_PATH, config: { ...config, deliverTo } }));
      expect(statuses(same)).toEqual(["ok", "ok"]);
      expect(same[1]!.found).toBe(`GET /ready with API_KEY: ready, the host delivers to smtp://127.0.0.1:${mta.port}`);
      const other = await publicUrl.run(ctx({ publicUrl: viaSmtp.url + INBOUND_PATH, config }));
      expect(statuses(other)).toEqual(["ok", "ok", "warn"]);
      expect(other[2]!.found).toBe(`the host behind PUBLIC_URL delivers to smtp://127.0.0.1:${mta.port}, the settings here say lmtp://dovecot:2525: the target check above asked another target`);
    } finally {
      await viaSmtp.stop();
      await mta.close();
    }
  });

  test("a host from before /ready's target field (lmtp only): still ready, named by what it says", async () => {
    const old = stub((req) => (new URL(req.url).pathname === "/health" ? Response.json({ status: "healthy" }) : Response.json({ status: "ready", lmtp: "dovecot:2525" })));
    try {
      const fs = await publicUrl.run(ctx({ publicUrl: `http://127.0.0.1:${old.port}${INBOUND_PATH}`, config: { apiKeys: [KEY], lmtpHost: "elsewhere", lmtpPort: 24, port: 1, host: "x", maxMessageBytes: 1 } }));
      expect(statuses(fs)).toEqual(["ok", "ok"]);
      expect(fs[1]!.found).toBe("GET /ready with API_KEY: ready, the host delivers to dovecot:2525");
    } finally {
      await old.stop(true);
    }
  });

  test("a rotation: the second key is the one the host takes", async () => {
    const fs = await publicUrl.run(ctx({ publicUrl: host.url + INBOUND_PATH, keys: [["API_KEYS (key 1)", OTHER_KEY], ["API_KEY", KEY]] }));
    expect(fs[1]!.found).toStartWith("GET /ready with API_KEY: ready");
  });

  test("the host does not take the key: fail, the keys differ", async () => {
    const fs = await publicUrl.run(ctx({ publicUrl: host.url + INBOUND_PATH, keys: [["API_KEY", OTHER_KEY]] }));
    expect(statuses(fs)).toEqual(["ok", "fail"]);
    expect(fs[1]!.found).toContain("its keys and these differ");
    expect(fs[1]!.fix).toContain("wrangler secret put API_KEY");
  });

  test("Dovecot down behind a healthy host: /ready fails with the host's reason", async () => {
    const port = await freePort();
    const down = startServer({ apiKeys: [KEY], lmtpHost: "127.0.0.1", lmtpPort: port, port: 0, host: "127.0.0.1", maxMessageBytes: 1 << 20 }, { log: () => {} });
    try {
      const fs = await publicUrl.run(ctx({ publicUrl: down.url + INBOUND_PATH }));
      expect(statuses(fs)).toEqual(["ok", "fail"]);
      expect(fs[1]!.found).toContain("cannot deliver: LMTP connect to");
    } finally {
      await down.stop();
    }
  });

  test.each([
    [404, null, "404: nothing is routed there"],
    [302, "https://team.cloudflareaccess.com/cdn-cgi/access/login", "Cloudflare Access asks for a login"],
    [530, null, "cannot reach the host"],
  ])("something in front answers %i: fail, saying what it means", async (status, location, says) => {
    const s = stub(() => new Response("<html>", { status, headers: location ? { location } : {} }));
    try {
      const fs = await publicUrl.run(ctx({ publicUrl: `http://127.0.0.1:${s.port}${INBOUND_PATH}` }));
      expect(statuses(fs)).toEqual(["fail"]);
      expect(fs[0]!.found).toContain(says);
    } finally {
      await s.stop(true);
    }
  });

  test("another service answers 200: fail, not the relay", async () => {
    const s = stub(() => new Response("<html>welcome</html>"));
    try {
      const fs = await publicUrl.run(ctx({ publicUrl: `http://127.0.0.1:${s.port}/` }));
      expect(statuses(fs)).toEqual(["warn", "fail"]);
      expect(fs[0]!.found).toContain(`not ${INBOUND_PATH}`);
      expect(fs[1]!.found).toContain("reaches another service");
    } finally {
      await s.stop(true);
    }
  });

  test("nothing answers: fail", async () => {
    const fs = await publicUrl.run(ctx({ publicUrl: `http://127.0.0.1:${await freePort()}${INBOUND_PATH}` }));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain("cannot be reached");
  });
});

describe("EDGE_URL (the edge's app in Bun, on an in-memory R2)", () => {
  let r2: MemoryR2;
  let worker: Server<undefined>;
  let endpoint = "";
  beforeAll(async () => {
    r2 = new MemoryR2();
    const app = () => edgeQueueApp(workerConfig({ DELL_API_ENDPOINT: endpoint, API_KEY: KEY, POSTMASTER: "postmaster@example.com", EDGE_SPOOL: r2 }), async () => ({ trigger: "flush", link: 1, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: true, chained: false, subrequests: 0, r2: { A: 0, B: 0, free: 0 } }), () => {});
    worker = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => app().fetch(req) });
  });
  afterAll(() => worker?.stop(true));
  const edgeCtx = (over: Partial<DoctorContext> = {}) => ctx({ config: { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1, edgeUrl: `http://127.0.0.1:${worker.port}` }, ...over });

  test("not set: skipped", async () => {
    expect(statuses(await edge.run(ctx({ config: { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1 } })))).toEqual(["skip"]);
  });

  test("nothing held, the host up: ok, and the Worker reaches the host (edge_host_up 1)", async () => {
    endpoint = host.url + INBOUND_PATH;
    const fs = await edge.run(edgeCtx());
    expect(statuses(fs)).toEqual(["ok", "ok"]);
    expect(fs[0]!.found).toBe("0 held (asked with API_KEY)");
    expect(fs[1]!.found).toContain("edge_host_up 1");
  });

  test("mail held for two hours, one failed, the host unreachable from the edge: warn, warn, fail", async () => {
    endpoint = `http://127.0.0.1:${await freePort()}${INBOUND_PATH}`;
    const spool = new EdgeSpool(r2);
    await spool.hold("Subject: x\r\n\r\nhi\r\n", { from: "a@example.org", to: "b@example.com", size: 18, reason: "host unreachable", noAnswer: false }, Date.now() - 2 * HOUR);
    const m = (await spool.held()).messages[0]!;
    await spool.hold("Subject: y\r\n\r\nhi\r\n", { from: "a@example.org", to: "c@example.com", size: 18, reason: "host unreachable", noAnswer: false });
    const other = (await spool.held()).messages.find((x) => x.id !== m.id)!;
    await spool.copyToFailed(other, "refused", "550 5.1.1 no such user");
    await spool.delivered(other.id);
    const fs = await edge.run(edgeCtx());
    expect(statuses(fs)).toEqual(["warn", "warn", "fail"]);
    expect(fs[0]!.found).toStartWith("1 held, the oldest for 2.0h");
    expect(fs[1]!.found).toStartWith("1 failed at the edge");
    expect(fs[2]!.found).toContain("the Worker cannot reach the host");
  });

  test("the Worker refuses every key of the host (401): fail, the keys differ", async () => {
    const fs = await edge.run(edgeCtx({ keys: [["API_KEY", OTHER_KEY], ["API_KEYS (key 1)", newApiKey()]] }));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain("the Worker's and the host's keys differ");
  });

  test("a Worker without EDGE_SPOOL: skipped", async () => {
    const bare = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => edgeQueueApp(workerConfig({ DELL_API_ENDPOINT: "https://h.example/api/v1/inbound-mail", API_KEY: KEY }), async () => ({ trigger: "flush", link: 1, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: true, chained: false, subrequests: 0, r2: { A: 0, B: 0, free: 0 } }), () => {}).fetch(req) });
    try {
      const fs = await edge.run(ctx({ config: { apiKeys: [KEY], lmtpHost: "x", lmtpPort: 1, port: 1, host: "x", maxMessageBytes: 1, edgeUrl: `http://127.0.0.1:${bare.port}` } }));
      expect(statuses(fs)).toEqual(["skip"]);
      expect(fs[0]!.found).toContain("no edge spool");
    } finally {
      await bare.stop(true);
    }
  });

  test("a whole run, text and --json: no key and no start of one anywhere in the output", async () => {
    // A DNS server that answers every question at once with REFUSED (DNS is tested against a real
    // one in tests/integration/doctor-dns.test.ts).
    const refusing = await Bun.udpSocket({
      hostname: "127.0.0.1",
      socket: {
        data(sock, query, port, address) {
          const answer = Buffer.from(query);
          answer[2] = 0x81; // QR, RD
          answer[3] = 0x85; // RA, REFUSED
          sock.send(answer, port, address);
        },
      },
    });
    endpoint = host.url + INBOUND_PATH;
    const dir = await tempDir();
    new Spool(dir).prepare();
    const env = {
      API_KEYS: `${OTHER_KEY},${KEY}`,
      LMTP_HOST: fake.host,
      LMTP_PORT: String(fake.port),
      SPOOL_DIR: dir,
      PUBLIC_URL: host.url + INBOUND_PATH,
      EDGE_URL: `http://127.0.0.1:${worker.port}`,
      MAIL_DOMAIN: "example.com",
      DNS_SERVER: `127.0.0.1:${refusing.port}`,
    };
    for (const args of [[], ["--json"]]) {
      let out = "";
      await doctorCommand(args, env, (t) => (out += t));
      if (process.env.SHOW_DOCTOR) console.log(out);
      expect(out).toContain(args.length ? '"part": "edge"' : "edge");
      expect(out).toContain("API_KEY");
      for (const key of [KEY, OTHER_KEY]) {
        expect(out).not.toContain(key);
        expect(out).not.toContain(key.slice(0, 6));
        expect(out).not.toContain(key.slice(-6));
      }
    }
    refusing.close();
  });
});
