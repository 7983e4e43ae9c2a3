// Proves the throwaway Dovecot harness works by speaking raw LMTP to it (no relay code involved).
import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import net from "node:net";
import { checkStoredAs, dovecotStoredForm, expectStoredAs, parsePrepended, startDovecot, type DovecotInstance } from "./dovecot.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./timeout.ts";

allowSlowTests();

type Target = { host: string; port: number } | { path: string };

/** Minimal LMTP client: one reply (possibly multi-line, "250-..." then "250 ...") at a time. */
class Lmtp {
  private buf = "";
  private waiters: (() => void)[] = [];
  private closed = false;

  private constructor(private sock: net.Socket) {
    sock.on("data", (d) => {
      this.buf += d.toString("latin1");
      this.wake();
    });
    sock.on("close", () => {
      this.closed = true;
      this.wake();
    });
  }

  static connect(target: Target): Promise<Lmtp> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(target);
      sock.once("error", reject);
      sock.once("connect", () => resolve(new Lmtp(sock)));
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Next complete reply: lines up to and including the one whose 4th char is a space. */
  async reply(): Promise<string> {
    for (;;) {
      const m = /^(?:\d{3}-[^\n]*\n)*\d{3} [^\n]*\n/.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m[0].length);
        return m[0].replace(/\r/g, "").trimEnd();
      }
      if (this.closed) throw new Error(`connection closed, pending: ${JSON.stringify(this.buf)}`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  write(raw: string): void {
    this.sock.write(raw);
  }

  async cmd(line: string): Promise<string> {
    this.write(line + "\r\n");
    return this.reply();
  }

  async close(): Promise<void> {
    await this.cmd("QUIT").catch(() => {});
    this.sock.destroy();
  }
}

/** A full LMTP transaction; returns the per-recipient RCPT replies and the DATA replies. */
async function deliver(target: Target, from: string, rcpts: string[], message: string) {
  const c = await Lmtp.connect(target);
  try {
    expect(await c.reply()).toStartWith("220");
    expect(await c.cmd("LHLO test.local")).toStartWith("250");
    expect(await c.cmd(`MAIL FROM:<${from}>`)).toStartWith("250");
    const rcptReplies: string[] = [];
    for (const r of rcpts) rcptReplies.push(await c.cmd(`RCPT TO:<${r}>`));
    const accepted = rcptReplies.filter((r) => r.startsWith("250")).length;
    const dataReplies: string[] = [];
    if (accepted > 0) {
      expect(await c.cmd("DATA")).toStartWith("354");
      // Dot-stuff lines starting with "." and terminate with CRLF.CRLF.
      const body = message.replace(/\r?\n/g, "\r\n").replace(/^\./gm, "..");
      c.write(body + (body.endsWith("\r\n") ? "" : "\r\n") + ".\r\n");
      // LMTP answers DATA once per accepted recipient.
      for (let i = 0; i < accepted; i++) dataReplies.push(await c.reply());
    }
    return { rcptReplies, dataReplies };
  } finally {
    await c.close();
  }
}

const enc = (s: string) => new TextEncoder().encode(s);
/** Bytes from ASCII text and raw byte values, e.g. bytes("caf", [0xe9], "\r\n"). */
function bytes(...parts: (string | number[])[]): Uint8Array {
  return new Uint8Array(parts.flatMap((p) => (typeof p === "string" ? [...p].map((ch) => ch.charCodeAt(0)) : p)));
}

function connectRefused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: "127.0.0.1", port });
    s.once("connect", () => {
      s.destroy();
      resolve(false);
    });
    s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "ECONNREFUSED"));
  });
}

function message(subject: string, body: string): string {
  return [
    "From: sender@example.org",
    "To: user@kuma8088.com",
    `Subject: ${subject}`,
    `Message-ID: <${crypto.randomUUID()}@example.org>`,
    "",
    body,
    "",
  ].join("\n");
}

describe("dovecot test harness", () => {
  let dv: DovecotInstance;
  const user = "user@kuma8088.com";

  beforeAll(async () => {
    dv = await startDovecot();
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await dv?.dispose();
  }, HOOK_TIMEOUT_MS);
  beforeEach(async () => {
    await dv.clear();
  });

  test("delivers over TCP with the message bytes intact", async () => {
    // Includes a line starting with "." to exercise dot-stuffing, and non-ASCII UTF-8.
    const msg = message("tcp", "Hello over TCP.\n.leading dot line\nGrüße ✓");
    const { rcptReplies, dataReplies } = await deliver({ host: dv.host, port: dv.port }, "sender@example.org", [user], msg);
    expect(rcptReplies).toEqual([expect.stringMatching(/^250/)]);
    expect(dataReplies).toEqual([expect.stringMatching(/^250/)]);

    const stored = await dv.messages(user);
    expect(stored).toHaveLength(1);
    const prepended = expectStoredAs(stored[0]!, enc(msg));
    expect(prepended.map((f) => f.name)).toEqual(["Return-Path", "Delivered-To", "Received"]);
    expect(prepended[0]!.value).toBe("<sender@example.org>");
    expect(prepended[1]!.value).toBe(user);
    expect(await dv.messages("alice@example.test")).toEqual([]);
  });

  test("rejects an unknown recipient at RCPT with 550 5.1.1", async () => {
    const { rcptReplies, dataReplies } = await deliver(
      { host: dv.host, port: dv.port },
      "sender@example.org",
      ["nobody-here@kuma8088.com"],
      message("unknown", "never stored"),
    );
    expect(rcptReplies[0]).toStartWith("550");
    expect(rcptReplies[0]).toContain("5.1.1");
    expect(dataReplies).toEqual([]);
  });

  test("delivers over the unix socket, one copy per recipient", async () => {
    expect(dv.socketPath.length).toBeLessThan(100);
    const msg = message("unix", "Hello over the unix socket.");
    const { dataReplies } = await deliver({ path: dv.socketPath }, "sender@example.org", ["alice@example.test", "bob@example.test"], msg);
    expect(dataReplies).toHaveLength(2);
    for (const r of dataReplies) expect(r).toStartWith("250");
    for (const u of ["alice@example.test", "bob@example.test"]) {
      const stored = await dv.messages(u);
      expect(stored).toHaveLength(1);
      // Two recipients in one transaction: Dovecot 2.3 then writes no Delivered-To.
      expect(expectStoredAs(stored[0]!, enc(msg)).map((f) => f.name)).toEqual(["Return-Path", "Received"]);
    }
  });

  test("stop() refuses connections, start() brings delivery back", async () => {
    await dv.stop();
    expect(await connectRefused(dv.port)).toBe(true);

    await dv.start();
    const msgs = [message("after restart 1", "one"), message("after restart 2", "two")];
    for (const m of msgs) {
      const { dataReplies } = await deliver({ host: dv.host, port: dv.port }, "sender@example.org", [user], m);
      expect(dataReplies[0]).toStartWith("250");
    }
    // messages() is in delivery order.
    const stored = await dv.messages(user);
    expect(stored).toHaveLength(msgs.length);
    stored.forEach((m, i) => expectStoredAs(m, enc(msgs[i]!)));
  });
});

describe("expectStoredAs (pure, no Dovecot)", () => {
  const prefix = [
    "Return-Path: <a@example.org>",
    "Delivered-To: user@kuma8088.com",
    "Received: from mail-relay ([127.0.0.1])",
    "\tby vm with LMTP",
    "\tid kPoNEs3xCmsHIwAAg+zDdQ",
    "\t(envelope-from <a@example.org>)",
    "\tfor <user@kuma8088.com>; Sat, 28 Nov 2026 15:22:53 +0000",
    "",
  ].join("\n");

  test("accepts the prepended fields plus the message with CRLF turned into LF", () => {
    const sent = bytes("Subject: x\r\n\r\ncaf", [0xe9], "\r\n.\r\n");
    const fields = expectStoredAs(bytes(prefix, "Subject: x\n\ncaf", [0xe9], "\n.\n"), sent);
    expect(fields).toEqual([
      { name: "Return-Path", value: "<a@example.org>" },
      { name: "Delivered-To", value: "user@kuma8088.com" },
      {
        name: "Received",
        value: "from mail-relay ([127.0.0.1])\tby vm with LMTP\tid kPoNEs3xCmsHIwAAg+zDdQ\t(envelope-from <a@example.org>)\tfor <user@kuma8088.com>; Sat, 28 Nov 2026 15:22:53 +0000",
      },
    ]);
  });

  test("adds the final line end Dovecot adds; keeps a lone CR", () => {
    expect(dovecotStoredForm(bytes("a\r\nb"))).toEqual(bytes("a\nb\n"));
    expect(dovecotStoredForm(bytes("a\rb\r\n"))).toEqual(bytes("a\rb\n"));
    expect(dovecotStoredForm(bytes("a\n\r\n"))).toEqual(bytes("a\n\n"));
    expect(dovecotStoredForm(bytes(""))).toEqual(bytes("\n"));
    expect(checkStoredAs(bytes("Return-Path: <>\nx\n"), bytes("x")).ok).toBe(true);
    expect(checkStoredAs(bytes("Return-Path: <>\nx"), bytes("x")).ok).toBe(false);
  });

  test("compares bytes: 8-bit bytes that decode to the same U+FFFD still differ", () => {
    // "日本" in Shift_JIS is 93 FA 96 7B; FA -> FB is a different character, but as UTF-8 both are
    // invalid, so a decoded-string comparison would see "\uFFFD\uFFFD\uFFFD{" on both sides.
    const sent = bytes("Subject: x\n\n", [0x93, 0xfa, 0x96, 0x7b], "\n");
    const stored = bytes(prefix, "Subject: x\n\n", [0x93, 0xfb, 0x96, 0x7b], "\n");
    expect(new TextDecoder().decode(stored.subarray(stored.length - sent.length))).toBe(new TextDecoder().decode(sent));
    const r = checkStoredAs(stored, sent);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.problem).toContain(`at message byte ${"Subject: x\n\n".length + 1};`);
    expect(() => expectStoredAs(stored, sent)).toThrow(/differs/);
    // A UTF-8 "repair" of the bytes (U+FFFD written out) is caught as well.
    const replaced = bytes(prefix, "Subject: x\n\n", [0xef, 0xbf, 0xbd, 0xef, 0xbf, 0xbd], "\n");
    expect(checkStoredAs(replaced, bytes("Subject: x\n\n", [0x93, 0xfa], "\n")).ok).toBe(false);
  });

  test("refuses anything but Return-Path, Delivered-To and Received before the message", () => {
    const sent = bytes("Subject: x\n\nbody\n");
    expect(checkStoredAs(bytes("Return-Path: <>\nX-Spam: yes\nSubject: x\n\nbody\n"), sent)).toMatchObject({ ok: false, problem: expect.stringContaining("X-Spam") });
    // Without the Return-Path Dovecot always writes.
    expect(checkStoredAs(bytes("Received: from x\nSubject: x\n\nbody\n"), sent).ok).toBe(false);
    // A stored copy that kept the CRLF line ends is not what Dovecot stores.
    expect(checkStoredAs(bytes("Return-Path: <>\nSubject: x\r\n\r\nbody\r\n"), bytes("Subject: x\r\n\r\nbody\r\n")).ok).toBe(false);
    // Truncated, or with a line lost.
    expect(checkStoredAs(bytes("Return-Path: <>\nSubject: x\n\nbod\n"), sent)).toMatchObject({ ok: false, problem: expect.stringContaining("at message byte 15; after the 16 bytes of prepended fields it is 16 bytes, expected 17 (bytes lost)") });
    expect(checkStoredAs(bytes("Return-Path: <>\n"), sent).ok).toBe(false);
    // Something appended after the message.
    expect(checkStoredAs(bytes("Return-Path: <>\nSubject: x\n\nbody\n.\n"), sent).ok).toBe(false);
  });

  test("a message that itself starts with Received: keeps its own header", () => {
    const sent = bytes("Received: from mx.example.org\r\n  by relay; Mon, 1 Jan 2024\r\nSubject: x\r\n\r\nbody\r\n");
    const stored = bytes(prefix, "Received: from mx.example.org\n  by relay; Mon, 1 Jan 2024\nSubject: x\n\nbody\n");
    expect(expectStoredAs(stored, sent).map((f) => f.name)).toEqual(["Return-Path", "Delivered-To", "Received"]);
  });

  test("parsePrepended: continuation lines need a field before them", () => {
    expect(parsePrepended(bytes("\tby vm\n"))).toBeString();
    expect(parsePrepended(bytes("return-path: <>\n"))).toEqual([{ name: "Return-Path", value: "<>" }]);
    expect(parsePrepended(bytes(""))).toEqual([]);
  });
});
