// The relay delivering into the operator's stack, with the real parts: DELIVER_TO=smtp:// to a
// private Postfix (Debian's postfix) that expands its virtual aliases and hands mail to a private
// Dovecot over LMTP; and DELIVER_TO=lmtp:// straight to that Dovecot with the relay's own
// ALIASES_FILE. One Worker in workerd (wrangler dev) shows a refusal at Postfix's RCPT bouncing in
// the SMTP session. Nothing here is optional: a missing Postfix, Dovecot or wrangler fails beforeAll.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ServerEnv } from "../../host/config.ts";
import { publicUrl } from "../../host/doctor/public-url.ts";
import { startWranglerDev, type WranglerDev } from "../../scripts/wrangler-dev.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { fromEnv } from "../../shared/config-env.ts";
import { INBOUND_PATH, type RecipientResult } from "../../shared/contract.ts";
import type { LogLine } from "../../shared/log.ts";
import { expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { startPostfix, type PostfixInstance } from "../support/postfix.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const KEY = `dt_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const ALICE = "alice@example.test";
const BOB = "bob@example.test";
/** Postfix's own aliases (virtual_alias_maps). */
const POSTFIX_VIRTUAL = `info@example.test ${ALICE}
postmaster@example.test ${ALICE}
`;
/** The relay's own aliases, for the LMTP target. */
const RELAY_ALIASES = `# aliases for Dovecot alone
info@example.test       ${ALICE}
team@example.test       ${ALICE}, ${BOB},
                        info@example.test
@catch.test             ${BOB}
`;

let dv: DovecotInstance;
let pf: PostfixInstance;
let dir: string;
let viaPostfix: RunningServer;
let viaLmtp: RunningServer;
let worker: WranglerDev;
const lmtpLines: LogLine[] = [];

function relay(env: Record<string, string>, log: (l: LogLine) => void = () => {}): RunningServer {
  const config = fromEnv(ServerEnv, { API_KEY: KEY, ...env });
  return startServer({ ...config, port: 0 }, { log, queue: { baseBackoffMs: 200, maxBackoffMs: 500 } });
}

beforeAll(async () => {
  // Delivered-To from ORCPT (the alias the sender used), as docs/delivery-targets.md suggests.
  dv = await startDovecot({ extraConfig: "lmtp_hdr_delivery_address = original" });
  pf = await startPostfix({ lmtp: { host: dv.host, port: dv.port }, users: dv.users, virtual: POSTFIX_VIRTUAL });
  dir = await mkdtemp("/tmp/targets-");
  await writeFile(join(dir, "aliases"), RELAY_ALIASES);
  viaPostfix = relay({ DELIVER_TO: `smtp://${pf.host}:${pf.port}`, SPOOL_DIR: join(dir, "spool") });
  viaLmtp = relay({ DELIVER_TO: `lmtp://${dv.host}:${dv.port}`, ALIASES_FILE: join(dir, "aliases") }, (l) => void lmtpLines.push(l));
  worker = await startWranglerDev({ vars: { DELL_API_ENDPOINT: `${viaPostfix.url}${INBOUND_PATH}`, HOST_TIMEOUT_MS: "10000", API_KEY: KEY }, edgeSpool: false });
}, 120_000);

afterAll(async () => {
  await worker?.stop();
  await Promise.all([viaPostfix?.stop(), viaLmtp?.stop()]);
  await pf?.dispose();
  await dv?.dispose();
  if (dir) await rm(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  await pf.start();
  await dv.clear();
}, HOOK_TIMEOUT_MS);

// --- helpers --------------------------------------------------------------------------------

const bytes = (...parts: (string | number[])[]) => new Uint8Array(Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p, "latin1") : Buffer.from(p)))));

/** A message as Cloudflare hands it on: its trace field on top, then the sender's header. */
function rfc822(to: string, subject: string, body: (string | number[])[] = ["Hello.\r\n"]): Uint8Array {
  const head = [
    "Received: from mail.sender.test (192.0.2.9) by cloudflare-email.net (unknown) id t1;",
    "        Sat, 01 Mar 2025 03:00:00 +0000",
    "From: <s@sender.test>",
    `To: <${to}>`,
    `Subject: ${subject}`,
    `Message-ID: <${crypto.randomUUID()}@sender.test>`,
    "Date: Sat, 01 Mar 2025 12:00:00 +0900",
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=Shift_JIS",
    "Content-Transfer-Encoding: 8bit",
  ];
  return bytes(head.join("\r\n"), "\r\n\r\n", ...body);
}

async function post(server: RunningServer, to: string[], raw: Uint8Array): Promise<{ status: number; body: { message?: string; recipients?: RecipientResult[] } }> {
  const res = await fetch(server.url + INBOUND_PATH, {
    method: "POST",
    headers: { "x-api-key": KEY, "content-type": "message/rfc822", "x-envelope-from": "s@sender.test", "x-envelope-to": to.join(", ") },
    body: Buffer.from(raw),
  });
  return { status: res.status, body: (await res.json()) as { message?: string; recipients?: RecipientResult[] } };
}

/** Waits until `user` has `n` messages (Postfix delivers from its queue, after its 250), then a moment more to see no other arrive. */
async function mailboxOf(user: string, n: number): Promise<Uint8Array[]> {
  await until(`${n} message(s) for ${user}`, async () => (await dv.messages(user)).length >= n, 15_000);
  await Bun.sleep(300);
  return dv.messages(user);
}

const text = (b: Uint8Array) => Buffer.from(b).toString("latin1");

// "日本語" and half-width katakana in Shift_JIS: not UTF-8, 0x5C as a second byte, and dot lines.
const SJIS = [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea, 0x0d, 0x0a, 0xb6, 0xc0, 0xb6, 0xc5, 0x83, 0x5c];

// --- DELIVER_TO=smtp:// (Postfix in front of Dovecot) ----------------------------------------

describe("DELIVER_TO=smtp:// to Postfix", () => {
  test("an alias of Postfix lands in its target's mailbox byte for byte (8-bit); Postfix hears the real sender by XFORWARD", async () => {
    const raw = rfc822("info@example.test", "8bit via postfix", [SJIS, "\r\n.dot line\r\n..two dots\r\n"]);
    const r = await post(viaPostfix, ["info@example.test"], raw);
    expect(r.status).toBe(200);
    expect(r.body.recipients![0]).toMatchObject({ address: "info@example.test", code: 250 });
    expect(r.body.recipients![0]!.reply).toContain("queued as"); // Postfix's 250: its queue has it now
    const [stored] = await mailboxOf(ALICE, 1);
    const prepended = expectStoredAs(stored!, raw);
    // Dovecot's Received, and Postfix's below it; nothing else before the sender's bytes.
    expect(prepended.filter((f) => f.name === "Received").map((f) => f.value)).toEqual([expect.stringContaining("with LMTP"), expect.stringContaining("(Postfix) with ESMTP")]);
    expect(pf.log()).toContain("orig_client=unknown[192.0.2.9]");
  });

  test("/ready with the key names the target as smtp://, and the doctor's public-url check says the host delivers there", async () => {
    const ready = (await (await fetch(`${viaPostfix.url}/ready`, { headers: { "x-api-key": KEY } })).json()) as Record<string, unknown>;
    expect(ready).toMatchObject({ status: "ready", target: `smtp://${pf.host}:${pf.port}` });
    expect(ready.capabilities).toContain("PIPELINING"); // Postfix's own EHLO
    const config = fromEnv(ServerEnv, { API_KEY: KEY, DELIVER_TO: `smtp://${pf.host}:${pf.port}`, SPOOL_DIR: join(dir, "spool") });
    const fs = await publicUrl.run({ config, keys: [["API_KEY", KEY]], domains: [], publicUrl: viaPostfix.url + INBOUND_PATH, timeoutMs: 5_000 });
    expect(fs.map((f) => f.status)).toEqual(["ok", "ok"]);
    expect(fs[1]!.found).toBe(`GET /ready with API_KEY: ready, the host delivers to smtp://${pf.host}:${pf.port}`);
  });

  test("an unknown user is refused at Postfix's RCPT: 422 with Postfix's reason, nothing queued", async () => {
    const r = await post(viaPostfix, ["nobody@example.test"], rfc822("nobody@example.test", "unknown"));
    expect(r.status).toBe(422);
    expect(r.body.message).toContain("550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox table");
    expect(viaPostfix.runner!.size).toBe(0);
  });

  test("the Worker in workerd bounces that refusal in the SMTP session, with Postfix's reason", async () => {
    const raw = rfc822("nobody@example.test", "bounce in session");
    const res = await fetch(`${worker.url}/cdn-cgi/handler/email?${new URLSearchParams({ from: "s@sender.test", to: "nobody@example.test" })}`, { method: "POST", body: Buffer.from(raw) });
    const answer = await res.text();
    expect(res.status).toBe(400); // wrangler's word for setReject
    expect(answer).toContain("User unknown in virtual mailbox table");
  });

  test("Postfix stopped: spooled (202); delivered once when it is back, still with XFORWARD", async () => {
    const forwarded = () => pf.log().split("orig_client=unknown[192.0.2.9]").length - 1;
    const before = forwarded();
    await pf.stop();
    const raw = rfc822(ALICE, "while postfix is down");
    const r = await post(viaPostfix, [ALICE], raw);
    expect(r.status).toBe(202);
    expect(r.body.recipients![0]!.queued).toBe(true);
    await Bun.sleep(500); // retries meet a closed port meanwhile
    expect(await dv.messages(ALICE)).toHaveLength(0);
    await pf.start();
    await until("the spool delivered it", () => viaPostfix.runner!.size === 0, 15_000);
    const stored = await mailboxOf(ALICE, 1);
    await Bun.sleep(1_000);
    expect(await dv.messages(ALICE)).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
    expect(forwarded()).toBe(before + 1); // the retry from the spool read the trace field again
  });

  test("a message over Postfix's message_size_limit (its EHLO SIZE) is refused before DATA: 413 with the reason", async () => {
    const small = await startPostfix({ lmtp: { host: dv.host, port: dv.port }, users: dv.users, messageSizeLimit: 100_000 });
    const host = relay({ DELIVER_TO: `smtp://${small.host}:${small.port}` });
    try {
      const raw = rfc822(ALICE, "too big", ["x".repeat(76) + "\r\n", ...Array.from({ length: 2_000 }, () => "y".repeat(76) + "\r\n")]);
      const r = await post(host, [ALICE], raw);
      expect(r.status).toBe(413);
      expect(r.body.message).toMatch(/^552 5\.3\.4 message of \d+ bytes exceeds the 100000 bytes the server takes/);
      expect(small.log()).not.toContain("mail=1"); // no MAIL FROM ever reached Postfix
      const fits = await post(host, [ALICE], rfc822(ALICE, "fits"));
      expect(fits.status).toBe(200);
    } finally {
      await host.stop();
      await small.dispose();
    }
  });
});

// --- DELIVER_TO=lmtp:// with ALIASES_FILE (Dovecot alone) ----------------------------------

describe("ALIASES_FILE with Dovecot alone", () => {
  test("an alias lands in its target's mailbox, Delivered-To naming the alias (ORCPT); the answer names the alias", async () => {
    const raw = rfc822("info@example.test", "alias", [SJIS, "\r\n"]);
    const r = await post(viaLmtp, ["info@example.test"], raw);
    expect(r.status).toBe(200);
    expect(r.body.recipients!.map((x) => x.address)).toEqual(["info@example.test"]);
    const [stored] = await mailboxOf(ALICE, 1);
    const prepended = expectStoredAs(stored!, raw);
    expect(prepended.find((f) => f.name === "Delivered-To")?.value).toBe("info@example.test");
  });

  test("a fan-out reaching alice twice (team -> alice, bob, info -> alice): one copy each; the catch-all", async () => {
    const r = await post(viaLmtp, ["team@example.test", "someone@catch.test"], rfc822("team@example.test", "fan-out"));
    expect(r.status).toBe(200);
    expect(r.body.recipients!.map((x) => [x.address, x.code])).toEqual([
      ["team@example.test", 250],
      ["someone@catch.test", 250],
    ]);
    expect(await mailboxOf(ALICE, 1)).toHaveLength(1);
    expect(await mailboxOf(BOB, 1)).toHaveLength(1); // team's bob and the catch-all's bob: one copy
  });

  test("a changed file is used for the next message; a file with a loop is refused and the previous map kept", async () => {
    const path = join(dir, "aliases");
    try {
      await writeFile(path, RELAY_ALIASES.replace(`info@example.test       ${ALICE}`, `info@example.test       ${BOB}`));
      await until("the new map loaded", () => viaLmtp.aliases!.current.expand("info@example.test")[0] === BOB);
      expect((await post(viaLmtp, ["info@example.test"], rfc822("info@example.test", "after reload"))).status).toBe(200);
      expect(await mailboxOf(BOB, 1)).toHaveLength(1);
      expect(await dv.messages(ALICE)).toHaveLength(0);

      await writeFile(path, "info@example.test loop@example.test\nloop@example.test info@example.test\n");
      await until("the refusal logged", () => lmtpLines.some((l) => l.event === "aliases_not_reloaded"));
      expect(lmtpLines.find((l) => l.event === "aliases_not_reloaded")!.error).toContain("line 2:");
      expect((await post(viaLmtp, ["info@example.test"], rfc822("info@example.test", "still the old map"))).status).toBe(200);
      expect(await mailboxOf(BOB, 2)).toHaveLength(2);
    } finally {
      await writeFile(path, RELAY_ALIASES);
      await viaLmtp.aliases!.reload();
    }
  });
});
