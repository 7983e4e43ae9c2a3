// The doctor's DNS checks against a real DNS server (dnsmasq) serving each case's records: MX all
// at Cloudflare, still at the old gateway (named), mixed; SPF with and without Cloudflare's
// include, and two SPF records (a permerror); DMARC present and absent.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { freePort } from "../../scripts/free-port.ts";
import { dns } from "../../host/doctor/dns.ts";
import type { DoctorContext, Finding } from "../../host/doctor/finding.ts";
import { startDnsmasq, type LocalDns } from "../support/dnsmasq.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const CF = ["route1.mx.cloudflare.net", "route2.mx.cloudflare.net", "route3.mx.cloudflare.net"];
const SPF_CF = "v=spf1 include:_spf.mx.cloudflare.net ~all";

let server: LocalDns;
beforeAll(async () => {
  server = await startDnsmasq("test", {
    mx: [
      ...CF.map((h, i): [string, string, number] => ["good.test", h, 10 + i]),
      ["old.test", "mx.old-gateway.test", 10],
      ["mixed.test", CF[0]!, 10],
      ["mixed.test", "backup.old-gateway.test", 30],
      ["first.test", "mx.old-gateway.test", 5],
      ["first.test", CF[0]!, 10],
      ["twospf.test", CF[0]!, 10],
    ],
    txt: [
      // Two strings of one record (RFC 7208 3.3: read as one text).
      ["good.test", "v=spf1 include:_spf.mx.cloudflare.net, ~all"],
      ["good.test", "google-site-verification=abc"],
      ["_dmarc.good.test", "v=DMARC1; p=quarantine"],
      ["old.test", "v=spf1 mx -all"],
      ["mixed.test", SPF_CF],
      ["first.test", SPF_CF],
      ["twospf.test", SPF_CF],
      ["twospf.test", "v=spf1 -all"],
    ],
  });
}, HOOK_TIMEOUT_MS);
afterAll(() => server?.stop());

const ctx = (domains: string[], dnsServer = server.server): DoctorContext => ({ config: null, keys: [], domains, dnsServer, timeoutMs: 2_000 });
const about = (findings: Finding[], what: RegExp) => {
  const f = findings.find((x) => what.test(x.found));
  if (!f) throw new Error(`no finding matches ${what}: ${JSON.stringify(findings)}`);
  return f;
};

describe("MX", () => {
  test("all three at Cloudflare: ok", async () => {
    const f = about(await dns.run(ctx(["good.test"])), /^good\.test MX/);
    expect(f.status).toBe("ok");
    for (const h of CF) expect(f.found).toContain(h);
  });

  test("still at the old gateway: fail, naming it, and the fix says to delete it", async () => {
    const f = about(await dns.run(ctx(["old.test"])), /^old\.test MX/);
    expect(f.status).toBe("fail");
    expect(f.found).toContain("mx.old-gateway.test (10)");
    expect(f.found).toContain("not to Cloudflare");
    expect(f.fix).toContain("Email Routing");
    expect(f.fix).toContain("delete the MX record(s) of mx.old-gateway.test");
  });

  test("mixed, the other host only a backup: warn, naming it", async () => {
    const f = about(await dns.run(ctx(["mixed.test"])), /^mixed\.test MX/);
    expect(f.status).toBe("warn");
    expect(f.found).toContain("backup.old-gateway.test (30)");
    expect(f.found).not.toContain("route1");
  });

  test("mixed, the other host preferred to Cloudflare's: fail", async () => {
    const f = about(await dns.run(ctx(["first.test"])), /^first\.test MX/);
    expect(f.status).toBe("fail");
    expect(f.found).toContain("mx.old-gateway.test (5)");
    expect(f.found).toContain("senders deliver there first");
  });

  test("a domain with no records at all: MX fail (NXDOMAIN), SPF and DMARC warn", async () => {
    const fs = await dns.run(ctx(["absent.test"]));
    expect(about(fs, /^absent\.test MX/)).toMatchObject({ status: "fail" });
    expect(about(fs, /^absent\.test MX/).found).toContain("NXDOMAIN");
    expect(about(fs, /^absent\.test SPF/)).toMatchObject({ status: "warn", found: "absent.test SPF: no v=spf1 record" });
    expect(about(fs, /^_dmarc\.absent\.test/)).toMatchObject({ status: "warn" });
  });
});

describe("SPF", () => {
  test("with Cloudflare's include, in two strings of one record, beside another TXT record: ok", async () => {
    const f = about(await dns.run(ctx(["good.test"])), /^good\.test SPF/);
    expect(f).toMatchObject({ status: "ok", found: `good.test SPF: ${JSON.stringify(SPF_CF)}` });
  });

  test("without the include: warn, and the fix names it", async () => {
    const f = about(await dns.run(ctx(["old.test"])), /^old\.test SPF/);
    expect(f.status).toBe("warn");
    expect(f.found).toContain('"v=spf1 mx -all" does not include _spf.mx.cloudflare.net');
    expect(f.fix).toContain("include:_spf.mx.cloudflare.net");
  });

  test("two SPF records: fail, and it says permerror", async () => {
    const f = about(await dns.run(ctx(["twospf.test"])), /^twospf\.test SPF/);
    expect(f.status).toBe("fail");
    expect(f.found).toContain("2 v=spf1 records");
    expect(f.found).toContain("permerror");
    expect(f.fix).toContain("merge them into one record");
  });
});

describe("DMARC", () => {
  test("present: ok, with the record", async () => {
    expect(about(await dns.run(ctx(["good.test"])), /^_dmarc\.good\.test/)).toMatchObject({ status: "ok", found: '_dmarc.good.test: "v=DMARC1; p=quarantine"' });
  });

  test("absent: warn, with a record to add", async () => {
    const f = about(await dns.run(ctx(["old.test"])), /^_dmarc\.old\.test/);
    expect(f.status).toBe("warn");
    expect(f.fix).toContain('"v=DMARC1; p=none');
  });
});

test("several domains: three findings each, in order", async () => {
  const fs = await dns.run(ctx(["good.test", "old.test"]));
  expect(fs.map((f) => f.found.split(":")[0])).toEqual(["good.test MX", "good.test SPF", "_dmarc.good.test", "old.test MX", "old.test SPF", "_dmarc.old.test"]);
});

test("a DNS server that does not answer: fail, saying so, not 'no record'", async () => {
  const silent = `127.0.0.1:${await freePort()}`;
  const fs = await dns.run({ ...ctx(["good.test"], silent), timeoutMs: 300 });
  expect(fs).toHaveLength(3);
  for (const f of fs) {
    expect(f.status).toBe("fail");
    expect(f.found).toContain(`the DNS server ${silent} did not answer`);
  }
});

test("no MAIL_DOMAIN: skipped, not failed", async () => {
  expect(await dns.run(ctx([]))).toEqual([expect.objectContaining({ status: "skip" })]);
});
