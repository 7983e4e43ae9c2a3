// The doctor's delivery-target check against a real Dovecot: its greeting and LHLO, postmaster@
// of each MAIL_DOMAIN asked at RCPT and then reset (nothing is delivered: the mailbox stays
// empty), over TCP and the unix socket; and the findings when nothing listens there, when
// something else does (an SMTP server's EHLO-only answer), or when postmaster@ does not exist.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort } from "../../scripts/free-port.ts";
import type { ServerConfig } from "../../host/config.ts";
import type { DoctorContext } from "../../host/doctor/finding.ts";
import { target } from "../../host/doctor/target.ts";
import { startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { startScripted } from "../support/scripted-lmtp.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const POSTMASTER = "postmaster@good.test";
let dv: DovecotInstance;
beforeAll(async () => {
  dv = await startDovecot({ users: [POSTMASTER, "user@good.test"] }); // throws when Dovecot is missing: a failure
}, HOOK_TIMEOUT_MS);
afterAll(() => dv?.dispose(), HOOK_TIMEOUT_MS);

const config = (lmtpHost: string, lmtpPort: number): ServerConfig => ({ apiKeys: ["k".repeat(32)], lmtpHost, lmtpPort, port: 8080, host: "127.0.0.1", maxMessageBytes: 1 << 20 });
const ctx = (c: ServerConfig, domains: string[]): DoctorContext => ({ config: c, keys: [], domains, timeoutMs: 3_000 });

/** Every file under the domain's mail folder: none means nothing was delivered (or created). */
async function filesUnder(dir: string): Promise<string[]> {
  return readdir(dir, { recursive: true }).catch((e: NodeJS.ErrnoException) => (e.code === "ENOENT" ? [] : Promise.reject(e)));
}

describe("Dovecot", () => {
  test("TCP: greeting and LHLO, postmaster@ accepted at RCPT, then RSET: nothing delivered", async () => {
    const fs = await target.run(ctx(config(dv.host, dv.port), ["good.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok"]);
    expect(fs[0]!.found).toStartWith(`LMTP ${dv.host}:${dv.port}: 220 `);
    expect(fs[0]!.found).toContain("Dovecot");
    expect(fs[0]!.found).toContain("PIPELINING");
    expect(fs[1]!.found).toStartWith(`${POSTMASTER}: RCPT answered 250 2.1.5`);
    expect(await dv.messages(POSTMASTER)).toEqual([]);
    expect(await filesUnder(`${dv.dir}/mail/good.test`)).toEqual([]);
  });

  test("the unix socket: the same", async () => {
    const fs = await target.run(ctx(config(dv.socketPath, 2525), ["good.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok"]);
    expect(fs[0]!.found).toStartWith(`LMTP unix:${dv.socketPath}: 220 `);
    expect(await dv.messages(POSTMASTER)).toEqual([]);
  });

  test("a domain whose postmaster@ does not exist: fail with Dovecot's reply and the RFC's reason; the other domain still ok", async () => {
    const fs = await target.run(ctx(config(dv.host, dv.port), ["good.test", "nopm.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok", "fail"]);
    expect(fs[2]!.found).toStartWith("postmaster@nopm.test: refused at RCPT: 550 5.1.1");
    expect(fs[2]!.fix).toContain("RFC 5321 4.5.1");
    expect(await filesUnder(`${dv.dir}/mail`)).toEqual([]);
  });

  test("no MAIL_DOMAIN: the greeting is checked, postmaster@ skipped", async () => {
    const fs = await target.run(ctx(config(dv.host, dv.port), []));
    expect(fs.map((f) => f.status)).toEqual(["ok", "skip"]);
  });
});

test("nothing listens there: fail, naming the target and what to set", async () => {
  const port = await freePort();
  const fs = await target.run(ctx(config("127.0.0.1", port), ["good.test"]));
  expect(fs).toHaveLength(1);
  expect(fs[0]!.status).toBe("fail");
  expect(fs[0]!.found).toContain(`LMTP 127.0.0.1:${port}`);
  expect(fs[0]!.fix).toContain("LMTP_HOST and LMTP_PORT");
});

test("an SMTP server there (LHLO is unknown to it): fail, saying it is not LMTP", async () => {
  const smtp = await startScripted("220 mx.example ESMTP Postfix\r\n", (line) => (line.startsWith("EHLO") ? "250 mx.example\r\n" : line === "QUIT" ? "221 bye\r\n" : "500 5.5.2 Error: command not recognized\r\n"));
  try {
    const fs = await target.run(ctx(config("127.0.0.1", smtp.port), ["good.test"]));
    expect(fs).toHaveLength(1);
    expect(fs[0]!.status).toBe("fail");
    expect(fs[0]!.found).toContain("LHLO answered 500 5.5.2");
    expect(fs[0]!.fix).toContain("Dovecot's LMTP service");
    expect(smtp.lines.some((l) => l.startsWith("MAIL") || l.startsWith("RCPT") || l === "DATA")).toBe(false);
  } finally {
    await smtp.close();
  }
});

test("a temporary answer at RCPT (451): warn, not fail; and the exchange is MAIL FROM:<>, RCPT, RSET, never DATA", async () => {
  const lmtp = await startScripted("220 lmtp ready\r\n", (line) => {
    if (line.startsWith("LHLO")) return "250-lmtp\r\n250 PIPELINING\r\n";
    if (line.startsWith("RCPT")) return "451 4.3.0 Temporary internal failure\r\n";
    if (line === "QUIT") return "221 bye\r\n";
    return "250 2.0.0 OK\r\n";
  });
  try {
    const fs = await target.run(ctx(config("127.0.0.1", lmtp.port), ["good.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "warn"]);
    expect(lmtp.lines).toEqual(["LHLO mail-relay-doctor", "MAIL FROM:<>", `RCPT TO:<${POSTMASTER}>`, "RSET", "QUIT"]);
  } finally {
    await lmtp.close();
  }
});

test("DELIVER_TO=smtp:// (the operator's MTA): EHLO, postmaster@ asked with MAIL FROM:<>, RCPT, RSET, never DATA; a refusal names the MTA's reply", async () => {
  const mta = await startScripted("220 mx.example ESMTP Postfix\r\n", (line) => {
    if (line.startsWith("EHLO")) return "250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
    if (line.startsWith("RCPT") && line.includes("nopm.test")) return "550 5.1.1 <postmaster@nopm.test>: Recipient address rejected: User unknown in virtual mailbox table\r\n";
    if (line === "QUIT") return "221 2.0.0 Bye\r\n";
    return "250 2.0.0 Ok\r\n";
  });
  try {
    const c: ServerConfig = { ...config("dovecot", 2525), deliverTo: { kind: "tcp", host: "127.0.0.1", port: mta.port, protocol: "smtp" } };
    const fs = await target.run(ctx(c, ["good.test", "nopm.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok", "fail"]);
    expect(fs[0]!.found).toStartWith(`SMTP smtp://127.0.0.1:${mta.port}: 220 mx.example ESMTP Postfix; EHLO 250`);
    expect(fs[2]!.found).toContain("550 5.1.1");
    expect(mta.lines.filter((l) => l !== "QUIT")).toEqual(["EHLO mail-relay-doctor", "MAIL FROM:<>", `RCPT TO:<${POSTMASTER}>`, "RSET", "MAIL FROM:<>", "RCPT TO:<postmaster@nopm.test>", "RSET"]);
  } finally {
    await mta.close();
  }
});

test("DELIVER_TO=smtp:// with nothing listening: fail, naming DELIVER_TO and the MTA", async () => {
  const port = await freePort();
  const fs = await target.run(ctx({ ...config("dovecot", 2525), deliverTo: { kind: "tcp", host: "127.0.0.1", port, protocol: "smtp" } }, ["good.test"]));
  expect(fs).toHaveLength(1);
  expect(fs[0]!.status).toBe("fail");
  expect(fs[0]!.found).toContain(`SMTP smtp://127.0.0.1:${port}`);
  expect(fs[0]!.fix).toContain("DELIVER_TO");
});

test("ALIASES_FILE: postmaster@ that only the host's alias map has is asked as its targets, as a delivery would be; a file that does not parse fails naming it", async () => {
  const dir = mkdtempSync(join(tmpdir(), "doctor-aliases-"));
  try {
    const file = join(dir, "aliases");
    writeFileSync(file, "# the domain's postmaster is a person\npostmaster@alias.test user@good.test\n");
    const withAliases: ServerConfig = { ...config(dv.host, dv.port), aliasesFile: file };
    // Dovecot alone has no postmaster@alias.test: without the map it is refused...
    expect((await target.run(ctx(config(dv.host, dv.port), ["alias.test"]))).map((f) => f.status)).toEqual(["ok", "fail"]);
    // ...with it, its target is asked, and takes it.
    const fs = await target.run(ctx(withAliases, ["alias.test", "good.test"]));
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok", "ok"]);
    expect(fs[1]!.found).toStartWith("postmaster@alias.test -> user@good.test (ALIASES_FILE): RCPT answered 250");
    expect(fs[2]!.found).toStartWith(`${POSTMASTER}: RCPT answered 250`);
    expect(await filesUnder(`${dv.dir}/mail`)).toEqual([]);

    writeFileSync(file, "postmaster@alias.test\n");
    const bad = await target.run(ctx(withAliases, ["alias.test"]));
    expect(bad).toHaveLength(1);
    expect(bad[0]).toMatchObject({ status: "fail" });
    expect(bad[0]!.found).toContain(`ALIASES_FILE=${file}: line 1`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
