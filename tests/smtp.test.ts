// The client speaking SMTP (DELIVER_TO=smtp://): EHLO, per-recipient replies at RCPT, ONE reply
// after the final dot for all accepted recipients, SIZE, XFORWARD, against a scripted server that
// answers what each test says (tests/support/scripted-lmtp.ts), and DELIVER_TO's URL.

import { afterEach, describe, expect, test } from "bun:test";
import type net from "node:net";
import { LmtpPool, SmtpConnection, lmtpTarget, openConnection, parseDeliverTo, targetUrl, type LmtpTarget, type LmtpTimeouts } from "../lmtp.ts";
import { startScripted, type Scripted, type ScriptedReply } from "./support/scripted-lmtp.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const FAST: Partial<LmtpTimeouts> = { connect: 500, greeting: 500, command: 500, body: 3_000, dataEnd: 500 };
const bytes = (s: string) => new TextEncoder().encode(s);
const servers: Scripted[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(reply: (line: string, socket: net.Socket) => ScriptedReply, greeting: string | null = "220 mx.test ESMTP\r\n"): Promise<Scripted> {
  const s = await startScripted(greeting, reply);
  servers.push(s);
  return s;
}
const smtp = (s: Scripted): LmtpTarget => ({ kind: "tcp", host: "127.0.0.1", port: s.port, protocol: "smtp" });

/** A Postfix-like server: a multi-line EHLO with the given extensions, 250 to everything else. */
function mta(extensions: string[], overrides: (line: string) => ScriptedReply | undefined = () => undefined) {
  return (line: string): ScriptedReply => {
    const o = overrides(line);
    if (o !== undefined) return o;
    if (line.startsWith("EHLO")) return ["mx.test", ...extensions].map((e, i, all) => `250${i === all.length - 1 ? " " : "-"}${e}\r\n`).join("");
    if (line === "DATA") return "354 End data with <CR><LF>.<CR><LF>\r\n";
    if (line === ".") return "250 2.0.0 Ok: queued as 4ABC\r\n";
    if (line === "QUIT") return "221 2.0.0 Bye\r\n";
    return "250 2.1.0 Ok\r\n";
  };
}

describe("DELIVER_TO", () => {
  test("lmtp://host:port, lmtp:/socket, smtp://host[:port]; anything else is refused with the reason", () => {
    expect(parseDeliverTo("lmtp://dovecot:24")).toEqual({ kind: "tcp", host: "dovecot", port: 24, protocol: "lmtp" });
    expect(parseDeliverTo("lmtp:/run/dovecot/lmtp")).toEqual({ kind: "unix", path: "/run/dovecot/lmtp", protocol: "lmtp" });
    expect(parseDeliverTo("lmtp:///run/dovecot/lmtp")).toEqual({ kind: "unix", path: "/run/dovecot/lmtp", protocol: "lmtp" });
    expect(parseDeliverTo("smtp://postfix:10025")).toEqual({ kind: "tcp", host: "postfix", port: 10025, protocol: "smtp" });
    expect(parseDeliverTo("smtp://127.0.0.1")).toEqual({ kind: "tcp", host: "127.0.0.1", port: 25, protocol: "smtp" });
    expect(parseDeliverTo("smtp://[::1]:2525")).toEqual({ kind: "tcp", host: "::1", port: 2525, protocol: "smtp" });
    expect(() => parseDeliverTo("http://x:25")).toThrow("must start with lmtp://");
    expect(() => parseDeliverTo("lmtp://dovecot")).toThrow("needs a port");
    expect(() => parseDeliverTo("smtp:/run/x")).toThrow("not a socket path");
    expect(() => parseDeliverTo("smtp://u:p@h:25")).toThrow("nothing more");
    expect(() => parseDeliverTo("smtp://h:25/path")).toThrow("nothing more");
    expect(() => parseDeliverTo("lmtp:relative/path")).toThrow("absolute path");
    expect(() => parseDeliverTo("smtp://h:70000")).toThrow();
  });

  test("targetUrl writes a target back as DELIVER_TO names it, the protocol first (what /ready's target says)", () => {
    for (const url of ["lmtp://dovecot:24", "lmtp:/run/dovecot/lmtp", "smtp://postfix:10025", "smtp://[::1]:2525"]) expect(targetUrl(parseDeliverTo(url))).toBe(url);
    expect(targetUrl(parseDeliverTo("smtp://127.0.0.1"))).toBe("smtp://127.0.0.1:25");
    // LMTP_HOST/LMTP_PORT's targets carry no protocol: LMTP.
    expect(targetUrl(lmtpTarget("dovecot", 2525))).toBe("lmtp://dovecot:2525");
    expect(targetUrl(lmtpTarget("/run/dovecot/lmtp", 2525))).toBe("lmtp:/run/dovecot/lmtp");
  });
});

describe("SMTP: one transaction", () => {
  test("EHLO (not LHLO), a multi-line reply split across packets, its extensions learned", async () => {
    const s = await start((line) =>
      line.startsWith("EHLO") ? ["250-mx.test greets", " you\r\n250-PIPELINING\r\n250-SIZE 10240", "000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"] : mta([])(line),
    );
    const c = await openConnection(smtp(s), { timeouts: FAST, lhloName: "relay.test" });
    expect(c).toBeInstanceOf(SmtpConnection);
    expect(s.lines[0]).toBe("EHLO relay.test");
    expect([...c.capabilities.keys()]).toEqual(["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8"]);
    expect(c.capabilities.get("SIZE")).toBe("10240000");
    c.close();
  });

  test("a server that does not know EHLO is greeted with HELO and offered plain commands", async () => {
    const s = await start((line) => (line.startsWith("EHLO") ? "502 5.5.2 Error: command not recognized\r\n" : line.startsWith("HELO") ? "250 mx.test\r\n" : mta([])(line)));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("Subject: x\r\n\r\nhi\r\n"), 20);
    expect(r.map((x) => x.code)).toEqual([250]);
    expect(s.lines.slice(0, 3)).toEqual(["EHLO mail-relay", "HELO mail-relay", "MAIL FROM:<s@x.org>"]); // no SIZE=, no BODY= without EHLO
    await p.close();
  });

  test("ONE reply after the final dot answers every recipient accepted at RCPT; a 251 at RCPT accepts, a 550 refuses only its own", async () => {
    const s = await start(
      mta(["PIPELINING", "8BITMIME"], (line) =>
        line === "RCPT TO:<fwd@x.org>" ? "251 2.1.5 User not local; will forward\r\n" : line === "RCPT TO:<nobody@x.org>" ? "550 5.1.1 <nobody@x.org>: Recipient address rejected\r\n" : undefined,
      ),
    );
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "nobody@x.org", "fwd@x.org"] }, bytes("x\r\n"), 3);
    expect(r).toEqual([
      { recipient: "a@x.org", code: 250, enhanced: "2.0.0", text: "Ok: queued as 4ABC", afterDot: true },
      { recipient: "nobody@x.org", code: 550, enhanced: "5.1.1", text: "<nobody@x.org>: Recipient address rejected" },
      { recipient: "fwd@x.org", code: 250, enhanced: "2.0.0", text: "Ok: queued as 4ABC", afterDot: true },
    ]);
    expect(s.messages).toEqual(["x\r\n"]);
    // One dot, one reply: the connection is in step and reused with RSET for the next message.
    const again = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("y\r\n"), 3);
    expect(again[0]!.code).toBe(250);
    expect(s.connections).toBe(1);
    expect(s.lines.filter((l) => l === "RSET")).toHaveLength(1);
    await p.close();
  });

  test("a 4xx after the final dot: temporary for every accepted recipient, nothing said to be delivered", async () => {
    const s = await start(mta(["PIPELINING"], (line) => (line === "." ? "451 4.3.0 Error: queue file write error\r\n" : undefined)));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, bytes("x\r\n"), 3);
    expect(r.map((x) => [x.recipient, x.code, x.afterDot])).toEqual([
      ["a@x.org", 451, true],
      ["b@x.org", 451, true],
    ]);
    await p.close();
  });

  test("the connection lost after the final dot: outcome unknown for every accepted recipient (temporary, never a delivery)", async () => {
    const s = await start(mta(["PIPELINING"], (line) => (line === "." ? { text: "", then: "end" } : undefined)));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, bytes("x\r\n"), 3);
    for (const x of r) {
      expect(x.code).toBe(451);
      expect(x.outcomeUnknown).toBe(true);
      expect(x.text).toContain("the SMTP server may have accepted the message");
    }
    expect(s.messages).toEqual(["x\r\n"]);
    expect(p.stats.idle).toBe(0); // never reused
    await p.close();
  });

  test("no reply after the final dot within dataEnd: outcome unknown, 4.4.1", async () => {
    const s = await start(mta([], (line) => (line === "." ? null : undefined)));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), 3);
    expect(r[0]).toMatchObject({ code: 451, enhanced: "4.4.1", outcomeUnknown: true });
    await p.close();
  });

  test("a message larger than the advertised SIZE is not offered: 552 5.3.4 for every recipient, no MAIL sent", async () => {
    const s = await start(mta(["PIPELINING", "SIZE 1000"]));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, new Uint8Array(1001), 1001);
    expect(r.map((x) => [x.code, x.enhanced])).toEqual([
      [552, "5.3.4"],
      [552, "5.3.4"],
    ]);
    expect(r[0]!.text).toContain("1000");
    expect(s.lines.some((l) => l.startsWith("MAIL"))).toBe(false);
    // At the limit it goes, with SIZE= on MAIL FROM (RFC 1870).
    const ok = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, new Uint8Array(1000).fill(0x61), 1000);
    expect(ok[0]!.code).toBe(250);
    expect(s.lines).toContain("MAIL FROM:<s@x.org> SIZE=1000");
    await p.close();
  });

  test("a non-ASCII address to an MTA without SMTPUTF8: refused 553 5.6.7, the reason naming the SMTP server, nothing sent", async () => {
    const s = await start(mta(["PIPELINING", "8BITMIME"]));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    const r = await p.deliver({ from: "jürgen@x.org", to: ["a@x.org"] }, bytes("Subject: x\r\n\r\nx\r\n"), null);
    expect(r).toEqual([{ recipient: "a@x.org", code: 553, enhanced: "5.6.7", text: "<jürgen@x.org>: non-ASCII sender address, and the SMTP server does not offer SMTPUTF8" }]);
    expect(s.lines.some((l) => l.startsWith("MAIL"))).toBe(false);
    await p.close();
  });

  test("XFORWARD when offered and the sending server is known: before MAIL, only the attributes offered, in xtext", async () => {
    const s = await start(mta(["PIPELINING", "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"]));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    await p.deliver({ from: "s@x.org", to: ["a@x.org"], client: { ip: "192.0.2.7", helo: "mail+1.example=x" } }, bytes("x\r\n"), 3);
    await p.deliver({ from: "s@x.org", to: ["a@x.org"], client: { ip: "2001:db8::7", helo: "v6.example" } }, bytes("x\r\n"), 3);
    await p.deliver({ from: "s@x.org", to: ["a@x.org"], client: null }, bytes("x\r\n"), 3);
    const xf = s.lines.filter((l) => l.startsWith("XFORWARD"));
    expect(xf).toEqual([
      "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 HELO=mail+2B1.example+3Dx PROTO=ESMTP",
      "XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::7 HELO=v6.example PROTO=ESMTP",
    ]);
    // Each one after RSET (or first) and right before its MAIL, never inside a transaction.
    for (const line of xf) expect(s.lines[s.lines.indexOf(line) + 1]).toStartWith("MAIL FROM:");
    await p.close();
  });

  test("XFORWARD refused: the message goes on without it; not offered: never sent", async () => {
    const refusing = await start(mta(["XFORWARD ADDR HELO"], (line) => (line.startsWith("XFORWARD") ? "550 5.7.0 Error: insufficient authorization\r\n" : undefined)));
    const p = new LmtpPool(smtp(refusing), { timeouts: FAST });
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"], client: { ip: "192.0.2.7", helo: "h" } }, bytes("x\r\n"), 3);
    expect(r[0]!.code).toBe(250);
    expect(refusing.lines).toContain("XFORWARD ADDR=192.0.2.7 HELO=h");
    await p.close();
    const plain = await start(mta(["PIPELINING"]));
    const q = new LmtpPool(smtp(plain), { timeouts: FAST });
    await q.deliver({ from: "s@x.org", to: ["a@x.org"], client: { ip: "192.0.2.7", helo: "h" } }, bytes("x\r\n"), 3);
    expect(plain.lines.some((l) => l.startsWith("XFORWARD"))).toBe(false);
    await q.close();
  });

  test("probeRecipient: MAIL FROM:<>, RCPT, RSET, nothing sent; the RCPT reply (a doctor's check of postmaster@)", async () => {
    const s = await start(mta(["PIPELINING"], (line) => (line === "RCPT TO:<nobody@x.org>" ? "550 5.1.1 <nobody@x.org>: User unknown\r\n" : undefined)));
    const c = await openConnection(smtp(s), { timeouts: FAST });
    expect((await c.probeRecipient("postmaster@x.org")).code).toBe(250);
    expect(await c.probeRecipient("nobody@x.org")).toEqual({ code: 550, enhanced: "5.1.1", text: "<nobody@x.org>: User unknown" });
    expect(s.lines.slice(1)).toEqual(["MAIL FROM:<>", "RCPT TO:<postmaster@x.org>", "RSET", "MAIL FROM:<>", "RCPT TO:<nobody@x.org>", "RSET"]);
    expect(c.reusable).toBe(true);
    expect(s.messages).toEqual([]);
    c.close();
  });

  test("a readiness check greets with EHLO and answers the extensions", async () => {
    const s = await start(mta(["PIPELINING", "SIZE 0"]));
    const p = new LmtpPool(smtp(s), { timeouts: FAST });
    expect(await p.check()).toEqual(["PIPELINING", "SIZE"]);
    expect(s.lines).toEqual(["EHLO mail-relay", "NOOP", "QUIT"]);
    await p.close();
  });
});
