// Unit tests of the LMTP client (lmtp.ts): the reply parser and the DATA encoder on their own,
// then the connection and the pool against the scriptable fake server (fake-lmtp.ts). A few
// cases the fake cannot script (a garbage greeting, a server that accepts DATA with no
// recipients, a connection dropped right at RSET) use a tiny raw server or a TCP proxy in front
// of the fake.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { replyClass } from "../shared/replies.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import {
  BodyAborted,
  DotStuffer,
  LmtpConnection,
  LmtpFault,
  LmtpPool,
  MailboxTurns,
  ReplyParser,
  describeTarget,
  formatReply,
  lmtpTarget,
  type LmtpPhase,
  type LmtpTarget,
  type LmtpTimeouts,
  type RecipientReply,
} from "../lmtp.ts";
import { freePort } from "../scripts/free-port.ts";
import { startScripted, type Scripted, type ScriptedReply } from "./support/scripted-lmtp.ts";
import { streamOf } from "./support/streams.ts";
import { startProxy } from "./support/tcp-proxy.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

const enc = new TextEncoder();
const dec = new TextDecoder();
const bytes = (s: string) => enc.encode(s);
/** Byte-for-byte string (latin1), so CR/LF and dots are visible in failure diffs. */
const latin1 = (b: Uint8Array) => Buffer.from(b).toString("latin1");
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// Small timeouts keep the stall tests fast; body is larger because the slow-reader test waits on drain.
const FAST: Partial<LmtpTimeouts> = { connect: 500, greeting: 300, command: 300, body: 3_000, dataEnd: 300 };

/** Seeded PRNG (mulberry32), so a failing random case can be reproduced. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Awaits p, expects it to reject with an LmtpFault of that kind (and phase, if given). */
async function expectFault(p: Promise<unknown>, kind: LmtpFault["kind"], phase?: LmtpPhase | LmtpPhase[]): Promise<LmtpFault> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(LmtpFault);
  const f = e as LmtpFault;
  expect(f.kind).toBe(kind);
  if (typeof phase === "string") expect(f.phase).toBe(phase);
  else if (phase) expect<(LmtpPhase | null)[]>(phase).toContain(f.phase);
  return f;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Runs the stuffer over the chunks and appends the terminator: the bytes that go on the wire. */
function stuffChunks(chunks: Uint8Array[]): Uint8Array {
  const s = new DotStuffer();
  return concat([...chunks.map((c) => s.push(c)), s.end()]);
}

/** What a server does with DATA: CRLF lines up to "." alone, a leading "." removed. Throws on anything else. */
function unstuff(wire: Uint8Array): Uint8Array {
  const text = latin1(wire);
  const out: string[] = [];
  let pos = 0;
  for (;;) {
    const eol = text.indexOf("\r\n", pos);
    if (eol === -1) throw new Error(`no terminating "." line in ${JSON.stringify(text)}`);
    const line = text.slice(pos, eol);
    pos = eol + 2;
    if (line === ".") break;
    out.push((line.startsWith(".") ? line.slice(1) : line) + "\r\n");
  }
  if (pos !== text.length) throw new Error(`bytes after the terminator: ${JSON.stringify(text.slice(pos))}`);
  // Every LF on the wire must be part of CRLF (no bare LF leaks through).
  if (/(^|[^\r])\n/.test(text)) throw new Error(`bare LF on the wire: ${JSON.stringify(text)}`);
  return Buffer.from(out.join(""), "latin1");
}

function splitAt(data: Uint8Array, rnd: () => number): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  let pos = 0;
  while (pos < data.length) {
    // Now and then an empty chunk: a stream may deliver one.
    const n = rnd() < 0.05 ? 0 : 1 + Math.floor(rnd() * 6);
    chunks.push(data.subarray(pos, Math.min(pos + n, data.length)));
    pos += n;
  }
  return chunks;
}

const tcp = (fake: FakeLmtpServer): LmtpTarget => ({ kind: "tcp", host: fake.host, port: fake.port });

// =============================================================================================

describe("ReplyParser", () => {
  test("single-line reply", () => {
    const p = new ReplyParser();
    expect(p.push("220 fake-lmtp ready\r\n")).toEqual([{ code: 220, enhanced: null, text: "fake-lmtp ready" }]);
  });

  test("a bare code with no text is a reply", () => {
    expect(new ReplyParser().push("250\r\n")).toEqual([{ code: 250, enhanced: null, text: "" }]);
  });

  test("multi-line reply: continuation lines joined by \\n, returned only after the last line", () => {
    const p = new ReplyParser();
    expect(p.push("250-fake-lmtp hello\r\n250-PIPELINING\r\n")).toEqual([]);
    expect(p.push("250 SIZE 1000\r\n")).toEqual([{ code: 250, enhanced: null, text: "fake-lmtp hello\nPIPELINING\nSIZE 1000" }]);
  });

  test("several replies in one chunk come out in order", () => {
    const p = new ReplyParser();
    const r = p.push("250 2.1.0 ok\r\n550 5.1.1 <b@x> unknown\r\n354 go ahead\r\n");
    expect(r.map((x) => x.code)).toEqual([250, 550, 354]);
  });

  test("enhanced code is parsed and removed from the text", () => {
    const [r] = new ReplyParser().push("550 5.1.1 <nobody@example.org> User doesn't exist\r\n");
    expect(r).toEqual({ code: 550, enhanced: "5.1.1", text: "<nobody@example.org> User doesn't exist" });
    expect(formatReply(r!)).toBe("550 5.1.1 <nobody@example.org> User doesn't exist");
  });

  test("enhanced code alone on the line, and on every line of a multi-line reply", () => {
    expect(new ReplyParser().push("250 2.0.0\r\n")).toEqual([{ code: 250, enhanced: "2.0.0", text: "" }]);
    expect(new ReplyParser().push("452-4.2.2 Mailbox\r\n452 4.2.2 full\r\n")).toEqual([
      { code: 452, enhanced: "4.2.2", text: "Mailbox\nfull" },
    ]);
  });

  test("enhanced code whose class disagrees with the reply code is not taken", () => {
    const [r] = new ReplyParser().push("250 5.1.1 odd server\r\n");
    expect(r).toEqual({ code: 250, enhanced: null, text: "5.1.1 odd server" });
  });

  test("something that only looks like an enhanced code is text", () => {
    const [r] = new ReplyParser().push("250 2.0.0x ok\r\n");
    expect(r!.enhanced).toBeNull();
    expect(r!.text).toBe("2.0.0x ok");
  });

  test("a reply split byte by byte (with UTF-8 split inside a character) parses the same", () => {
    const wire = bytes("250-2.0.0 first\r\n250 2.0.0 <ü@exämple.org> Saved\r\n550 5.1.1 nope\r\n");
    // The first reply is complete with the LF after "Saved", and not a byte earlier.
    const firstEnd = Buffer.from(wire).indexOf("Saved\r\n") + "Saved\r".length;
    const p = new ReplyParser();
    const got = [];
    for (let i = 0; i < wire.length; i++) {
      const r = p.push(wire.subarray(i, i + 1));
      if (i < firstEnd) expect(r).toEqual([]);
      if (i === firstEnd) expect(r).toHaveLength(1);
      got.push(...r);
    }
    expect(got).toEqual([
      { code: 250, enhanced: "2.0.0", text: "first\n<ü@exämple.org> Saved" },
      { code: 550, enhanced: "5.1.1", text: "nope" },
    ]);
  });

  test("a reply split at random chunk boundaries parses the same", () => {
    const wire = bytes("220 ready\r\n250-a\r\n250-b\r\n250 c\r\n452 4.2.2 full\r\n");
    const rnd = prng(7);
    for (let n = 0; n < 50; n++) {
      const p = new ReplyParser();
      const got = splitAt(wire, rnd).flatMap((c) => p.push(c));
      expect(got).toEqual([
        { code: 220, enhanced: null, text: "ready" },
        { code: 250, enhanced: null, text: "a\nb\nc" },
        { code: 452, enhanced: "4.2.2", text: "full" },
      ]);
    }
  });

  test("bare LF line ends are accepted", () => {
    const p = new ReplyParser();
    expect(p.push("250-one\n250 two\n220 three\n")).toEqual([
      { code: 250, enhanced: null, text: "one\ntwo" },
      { code: 220, enhanced: null, text: "three" },
    ]);
  });

  test("a line that is not a reply line is a protocol fault", () => {
    const p = new ReplyParser();
    let e: unknown;
    try {
      p.push("hello there\r\n");
    } catch (err) {
      e = err;
    }
    expect(e).toBeInstanceOf(LmtpFault);
    expect((e as LmtpFault).kind).toBe("protocol");
    for (const garbage of ["25 short\r\n", "650 bad class\r\n", "250xno separator\r\n", "\r\n"]) {
      expect(() => new ReplyParser().push(garbage)).toThrow(LmtpFault);
    }
  });

  test("a code that changes inside a multi-line reply is a protocol fault", () => {
    const p = new ReplyParser();
    expect(p.push("250-first\r\n")).toEqual([]);
    let e: unknown;
    try {
      p.push("251 second\r\n");
    } catch (err) {
      e = err;
    }
    expect(e).toBeInstanceOf(LmtpFault);
    expect((e as LmtpFault).kind).toBe("protocol");
  });

  test("an endless line without a line end is a protocol fault", () => {
    expect(() => new ReplyParser().push("250 " + "x".repeat(5000))).toThrow(LmtpFault);
  });
});

describe("DotStuffer", () => {
  const wire = (...chunks: string[]) => latin1(stuffChunks(chunks.map(bytes)));

  test("a line starting with '.' is doubled, including the very first byte", () => {
    expect(wire(".first\r\nmid\r\n.dot\r\n..two\r\nlast.\r\n")).toBe("..first\r\nmid\r\n..dot\r\n...two\r\nlast.\r\n.\r\n");
    expect(wire(".")).toBe("..\r\n.\r\n");
  });

  test("a dot at the start of a chunk that follows a line end is doubled", () => {
    expect(wire("a\r\n", ".b\r\n")).toBe("a\r\n..b\r\n.\r\n");
    expect(wire("a\n", ".b\n")).toBe("a\r\n..b\r\n.\r\n");
    expect(wire("", ".b\r\n")).toBe("..b\r\n.\r\n");
  });

  test("a dot right after a line end at the start of a chunk is doubled (chunk starts with LF)", () => {
    // CR ends one chunk, "\n." starts the next: the LF must not get a CR, the dot must be doubled.
    expect(wire("a\r", "\n.b\r\n")).toBe("a\r\n..b\r\n.\r\n");
    // Bare LF starting a chunk, then a dot: both a CR and a dot are added, nothing is lost.
    expect(wire("a", "\n.b\n")).toBe("a\r\n..b\r\n.\r\n");
    expect(wire("a", "\n.")).toBe("a\r\n..\r\n.\r\n");
  });

  test("bare LF becomes CRLF; CR at the end of one chunk and LF at the start of the next is not doubled", () => {
    expect(wire("a\nb\n\nc\n")).toBe("a\r\nb\r\n\r\nc\r\n.\r\n");
    expect(wire("a\r", "\nb\r", "\n")).toBe("a\r\nb\r\n.\r\n");
    expect(wire("a\r", "\n", "\n")).toBe("a\r\n\r\n.\r\n");
    expect(wire("\n")).toBe("\r\n.\r\n");
  });

  test("the terminator: CRLF.CRLF without a final line end, .CRLF after one, .CRLF for an empty message", () => {
    expect(wire("no newline")).toBe("no newline\r\n.\r\n");
    expect(wire("with newline\r\n")).toBe("with newline\r\n.\r\n");
    expect(wire("bare newline\n")).toBe("bare newline\r\n.\r\n");
    expect(wire()).toBe(".\r\n");
  });

  test("a chunk that needs no change is returned as the same object", () => {
    const s = new DotStuffer();
    const a = bytes("Subject: x\r\n\r\nhello");
    const b = bytes(". is fine mid-line\r\nand another.\r\n");
    expect(s.push(a)).toBe(a);
    expect(s.push(b)).toBe(b);
    const c = bytes(".needs a dot");
    const stuffed = s.push(c);
    expect(stuffed).not.toBe(c);
    // Every byte pushed comes out, the one added dot aside.
    expect(latin1(concat([a, b, stuffed]))).toBe(latin1(concat([a, b, bytes("."), c])));
  });

  test("a chunk that needs a change is not modified in place", () => {
    const s = new DotStuffer();
    const a = bytes(".x\ny");
    const copy = a.slice();
    s.push(a);
    expect(a).toEqual(copy);
  });

  test("chunked encoding equals whole encoding, and a server's decoding gives the CRLF message back (random)", () => {
    const rnd = prng(20_250_101);
    const tokens = ["a", "b", " ", ".", "..", "\r\n", "\n", "\xff", "é"];
    for (let n = 0; n < 400; n++) {
      const len = Math.floor(rnd() * 40);
      let text = "";
      for (let i = 0; i < len; i++) text += tokens[Math.floor(rnd() * tokens.length)]!;
      const input = Buffer.from(text, "latin1");
      const whole = stuffChunks([input]);
      const chunked = stuffChunks(splitAt(input, rnd));
      expect(latin1(chunked)).toBe(latin1(whole));
      // Bare LF normalized to CRLF; a message without a final line end gets one.
      let expected = text.replace(/\r?\n/g, "\r\n");
      if (expected.length > 0 && !expected.endsWith("\r\n")) expected += "\r\n";
      expect(latin1(unstuff(chunked))).toBe(expected);
    }
  });

  test("on CRLF input, encode then decode is the identity (random inputs, random chunk boundaries)", () => {
    const rnd = prng(42);
    const tokens = ["x", ".", "..", "\r\n", "\r\n.", " ", "\x00", "\xff"];
    for (let n = 0; n < 300; n++) {
      const len = Math.floor(rnd() * 30);
      let text = "";
      for (let i = 0; i < len; i++) text += tokens[Math.floor(rnd() * tokens.length)]!;
      text += "\r\n"; // CRLF input: every line ended
      const input = Buffer.from(text, "latin1");
      const chunks = splitAt(input, rnd);
      expect(latin1(unstuff(stuffChunks(chunks)))).toBe(text);
    }
  });
});

describe("MailboxTurns", () => {
  /** Whether p has settled after the pending callbacks ran. */
  async function settled(p: Promise<unknown>): Promise<boolean> {
    let done = false;
    p.then(
      () => (done = true),
      () => (done = true),
    );
    await sleep(5);
    return done;
  }

  test("one turn per mailbox: case and a +detail do not matter; other mailboxes go at once; the turn goes on first come, first served", async () => {
    const turns = new MailboxTurns();
    const first = await turns.take(["User@Example.org"], Infinity);
    const order: string[] = [];
    const second = turns.take(["user+lists@example.org"], Infinity).then((r) => (order.push("second"), r));
    const third = turns.take(["USER@example.org"], Infinity).then((r) => (order.push("third"), r));
    expect(await settled(turns.take(["other@example.org"], Infinity))).toBe(true);
    expect(await settled(second)).toBe(false);
    first();
    first(); // a second release changes nothing
    (await second)();
    (await third)();
    expect(order).toEqual(["second", "third"]);
    expect(await settled(turns.take(["user@example.org"], Infinity))).toBe(true);
  });

  test("waiting past the deadline fails with a timeout before the dot, and leaves the line", async () => {
    const turns = new MailboxTurns();
    const first = await turns.take(["a@x.org"], Infinity);
    const late = await expectFault(turns.take(["a@x.org", "b@x.org"], performance.now() + 30), "timeout", "body");
    expect(late.message).toContain("a@x.org");
    // b@x.org was not kept by the caller that gave up, and the next in line for a@x.org gets it.
    expect(await settled(turns.take(["b@x.org"], Infinity))).toBe(true);
    const next = turns.take(["a@x.org"], Infinity);
    first();
    expect(await settled(next)).toBe(true);
  });

  test("with places for two: a third waits until one of them is released; a release with nobody waiting frees a place", async () => {
    const shares = new MailboxTurns(2);
    const one = await shares.take(["a@x.org"], Infinity);
    const two = await shares.take(["A@x.org"], Infinity);
    const three = shares.take(["a+tag@x.org"], Infinity);
    expect(await settled(three)).toBe(false);
    expect(await settled(shares.take(["b@x.org"], Infinity))).toBe(true);
    one();
    expect(await settled(three)).toBe(true);
    (await three)();
    two();
    // Both places free again: two at once, the third waits.
    const again = [await shares.take(["a@x.org"], Infinity), await shares.take(["a@x.org"], Infinity)];
    expect(await settled(shares.take(["a@x.org"], Infinity))).toBe(false);
    for (const r of again) r();
  });

  test("only ASCII letters are folded, as Dovecot folds them: the Kelvin sign is another mailbox than k", async () => {
    const turns = new MailboxTurns();
    const held = await turns.take(["kim@x.org"], Infinity);
    expect(await settled(turns.take(["\u212aim@x.org"], Infinity))).toBe(true);
    expect(await settled(turns.take(["KIM@x.org"], Infinity))).toBe(false);
    held();
  });

  test("several recipients: taken in one order, so two transactions never wait for each other", async () => {
    const turns = new MailboxTurns();
    const held = await turns.take(["b@x.org", "a@x.org"], Infinity);
    const x = turns.take(["a@x.org", "b@x.org"], performance.now() + 1_000);
    const y = turns.take(["b@x.org", "a@x.org"], performance.now() + 1_000);
    held();
    (await x)();
    (await y)();
  });
});

describe("targets", () => {
  test("LMTP_HOST with a leading / is a unix socket", () => {
    expect(lmtpTarget("/run/dovecot/lmtp", 24)).toEqual({ kind: "unix", path: "/run/dovecot/lmtp" });
    expect(lmtpTarget("127.0.0.1", 24)).toEqual({ kind: "tcp", host: "127.0.0.1", port: 24 });
    expect(describeTarget(lmtpTarget("/run/x", 0))).toBe("unix:/run/x");
    expect(describeTarget(lmtpTarget("mail", 24))).toBe("mail:24");
  });
});

// =============================================================================================

describe("against the fake LMTP server", () => {
  let fake: FakeLmtpServer;
  const pools: LmtpPool[] = [];
  const conns: LmtpConnection[] = [];
  const pool = (opts: ConstructorParameters<typeof LmtpPool>[1] = {}) => {
    const p = new LmtpPool(tcp(fake), { timeouts: FAST, ...opts });
    pools.push(p);
    return p;
  };
  const open = async (target: LmtpTarget = tcp(fake)) => {
    const c = await LmtpConnection.open(target, { timeouts: FAST });
    conns.push(c);
    return c;
  };
  const msg = (s: string) => bytes(s);

  beforeAll(async () => {
    fake = await startFakeLmtp();
  }, HOOK_TIMEOUT_MS);
  afterEach(async () => {
    await Promise.all(pools.splice(0).map((p) => p.close()));
    for (const c of conns.splice(0)) c.close();
    fake.reset();
  });
  afterAll(async () => {
    await fake.close();
  }, HOOK_TIMEOUT_MS);

  test("LHLO capabilities are parsed", async () => {
    const c = await open();
    expect(c.pipelining).toBe(true);
    expect(c.capabilities.has("8BITMIME")).toBe(true);
    expect(c.capabilities.get("SIZE")).toBe(String(64 * 1024 * 1024));
    // The first LHLO line is the server's name, not a capability.
    expect(c.capabilities.has("FAKE-LMTP")).toBe(false);
    expect(fake.commands).toEqual(["LHLO mail-relay"]);
  });

  test("MAIL FROM carries SIZE= and BODY=8BITMIME; SMTPUTF8 only for a non-ASCII envelope", async () => {
    const c = await open();
    const body = msg("Subject: hi\r\n\r\nhello\r\n");
    await c.deliver({ from: "sender@example.org", to: ["a@example.org"] }, body, body.length);
    await c.deliver({ from: "sender@example.org", to: ["a@example.org"] }, body, null);
    await c.deliver({ from: "sénder@exämple.org", to: ["a@example.org"] }, body, null);
    const mails = fake.commands.filter((l) => l.startsWith("MAIL"));
    expect(mails).toEqual([
      `MAIL FROM:<sender@example.org> SIZE=${body.length} BODY=8BITMIME`,
      "MAIL FROM:<sender@example.org> BODY=8BITMIME",
      "MAIL FROM:<sénder@exämple.org> BODY=8BITMIME SMTPUTF8",
    ]);
    expect(fake.received[0]!.mailParams).toEqual({ SIZE: String(body.length), BODY: "8BITMIME" });
    expect(fake.received[2]!.from).toBe("sénder@exämple.org");
  });

  test("the null sender is sent as MAIL FROM:<>", async () => {
    const c = await open();
    const r = await c.deliver({ from: "", to: ["a@example.org"] }, msg("bounce\r\n"), null);
    expect(r.map((x) => x.code)).toEqual([250]);
    expect(fake.commands).toContain("MAIL FROM:<> BODY=8BITMIME");
    expect(fake.received[0]!.from).toBe("");
  });

  test("mixed per-recipient replies come back in envelope order, from RCPT or after the dot", async () => {
    fake.behaviour.rcpt = (a) => (a.startsWith("unknown") ? 550 : 250);
    fake.behaviour.afterData = (a) => (a.startsWith("full") ? 452 : 250);
    const c = await open();
    const r = await c.deliver({ from: "s@x.org", to: ["ok@x.org", "unknown@x.org", "full@x.org"] }, msg("hi\r\n"), null);
    expect(r).toEqual([
      // afterDot marks the replies that came after the final dot (the server had the message).
      { recipient: "ok@x.org", code: 250, enhanced: "2.0.0", text: "<ok@x.org> Saved", afterDot: true },
      { recipient: "unknown@x.org", code: 550, enhanced: "5.1.1", text: "<unknown@x.org> User unknown" },
      { recipient: "full@x.org", code: 452, enhanced: "4.2.2", text: "Mailbox full", afterDot: true },
    ]);
    expect(fake.received).toHaveLength(1);
    expect(fake.received[0]!.to).toEqual(["ok@x.org"]);
  });

  test("reply order holds when the refused recipient comes first", async () => {
    fake.behaviour.rcpt = (a) => (a.startsWith("gone") ? 450 : 250);
    fake.behaviour.afterData = (a) => (a.startsWith("full") ? 552 : 250);
    const c = await open();
    const r = await c.deliver({ from: "s@x.org", to: ["gone@x.org", "full@x.org", "ok@x.org"] }, msg("hi\r\n"), null);
    expect(r.map((x) => [x.recipient, x.code, x.enhanced])).toEqual([
      ["gone@x.org", 450, "4.2.0"],
      ["full@x.org", 552, "5.2.2"],
      ["ok@x.org", 250, "2.0.0"],
    ]);
  });

  test("all recipients refused at RCPT: no message is sent, the results are the RCPT replies", async () => {
    fake.behaviour.rcpt = () => 550;
    const c = await open();
    let pulled = false;
    const body = new ReadableStream<Uint8Array>(
      {
        pull(ctl) {
          pulled = true;
          ctl.enqueue(msg("never\r\n"));
          ctl.close();
        },
      },
      { highWaterMark: 0 }, // pulled only when read
    );
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, body, null);
    expect(r.map((x) => [x.recipient, x.code, x.enhanced])).toEqual([
      ["a@x.org", 550, "5.1.1"],
      ["b@x.org", 550, "5.1.1"],
    ]);
    expect(pulled).toBe(false);
    expect(fake.received).toEqual([]);
    // The connection is still in step: the next transaction on it works.
    fake.behaviour.rcpt = () => 250;
    const again = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("second\r\n"), null);
    expect(again.map((x) => x.code)).toEqual([250]);
    expect(dec.decode(fake.received[0]!.data)).toBe("second\r\n");
  });

  test("dot-stuffing and bare LF end to end: the server stores exactly the CRLF message", async () => {
    const c = await open();
    const body = msg(".leading dot\nSubject: x\r\n\n.\n..two\r\nmid.dot\nno final newline");
    await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, null);
    expect(latin1(fake.received[0]!.data)).toBe(".leading dot\r\nSubject: x\r\n\r\n.\r\n..two\r\nmid.dot\r\nno final newline\r\n");
  });

  test("a streamed body in many small chunks arrives byte-exact", async () => {
    const rnd = prng(99);
    let text = "";
    while (text.length < 64 * 1024) {
      const line = Array.from({ length: Math.floor(rnd() * 80) }, () => String.fromCharCode(32 + Math.floor(rnd() * 95))).join("");
      text += (rnd() < 0.2 ? "." : "") + line + "\r\n";
    }
    const data = Buffer.from(text, "latin1");
    const chunks = splitAt(data, rnd); // 1-6 bytes each: some 20 000 chunks
    const c = await open();
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, streamOf(chunks), data.length);
    expect(r.map((x) => x.code)).toEqual([250]);
    expect(fake.received[0]!.data.length).toBe(data.length);
    expect(Buffer.from(fake.received[0]!.data).equals(data)).toBe(true);
  });

  test("a 5 MiB body through a slow reader arrives complete and byte-exact", async () => {
    fake.behaviour.slowReader = { bytesPerSecond: 2 * 1024 * 1024 };
    const rnd = prng(5);
    const size = 5 * 1024 * 1024;
    const data = Buffer.alloc(size);
    // Lines of varying length, a few starting with ".", CRLF ends: what the server stores is the
    // input. (Few dot lines: smtp-server splits its data chunks there, and the fake's slow reader
    // sleeps at least a timer tick per chunk, which would slow the test down for nothing.)
    for (let i = 0; i < size; ) {
      const len = 1 + Math.floor(rnd() * 200);
      const end = Math.min(i + len, size - 2);
      for (let j = i; j < end; j++) data[j] = 33 + ((j * 31 + len) % 90);
      if (rnd() < 0.002 && i < end) data[i] = 0x2e;
      if (end >= size - 2) {
        data[size - 2] = 0x0d;
        data[size - 1] = 0x0a;
        break;
      }
      data[end] = 0x0d;
      data[end + 1] = 0x0a;
      i = end + 2;
    }
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < size; i += 64 * 1024) chunks.push(data.subarray(i, i + 64 * 1024));
    let pulls = 0;
    const body = new ReadableStream<Uint8Array>(
      {
        pull(ctl) {
          if (pulls === chunks.length) return ctl.close();
          ctl.enqueue(chunks[pulls++]!);
        },
      },
      { highWaterMark: 0 },
    );
    // After the final dot the server still has to read what sits in the socket buffers.
    const c = await LmtpConnection.open(tcp(fake), { timeouts: { ...FAST, dataEnd: 10_000 } });
    conns.push(c);
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, size);
    expect(r.map((x) => x.code)).toEqual([250]);
    const got = fake.received[0]!.data;
    expect(got.length).toBe(size);
    expect(Buffer.from(got).equals(data)).toBe(true);
  }, 20_000);

  describe("a stalled server gives a timeout fault for the phase, and the connection is dropped", () => {
    test.each([
      ["greeting", "greeting"],
      ["lhlo", "lhlo"],
    ] as const)("stall at %s -> timeout in phase %s", async (stall, phase) => {
      fake.behaviour.stall = stall;
      const started = Date.now();
      await expectFault(LmtpConnection.open(tcp(fake), { timeouts: FAST }), "timeout", phase);
      expect(Date.now() - started).toBeLessThan(5_000);
    });

    test.each([
      ["mail", "mail"],
      ["rcpt", "rcpt"],
      ["data", "data"],
    ] as const)("stall at %s -> timeout in phase %s", async (stall, phase) => {
      const c = await open();
      fake.behaviour.stall = stall;
      const started = Date.now();
      const f = await expectFault(c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("hi\r\n"), 4), "timeout", phase);
      expect(Date.now() - started).toBeLessThan(5_000);
      expect(c.broken).toBe(f);
      // A broken connection refuses the next transaction at once instead of writing into it.
      fake.behaviour.stall = null;
      await expectFault(c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("hi\r\n"), 4), "closed");
      expect(fake.received).toEqual([]);
    });

    test("stall after the final dot -> not a fault but an outcome-unknown reply (4xx, afterDot), and the connection is dropped", async () => {
      const c = await open();
      fake.behaviour.stall = "afterData";
      const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("hi\r\n"), 4);
      expect(r).toEqual([
        {
          recipient: "a@x.org",
          code: 451,
          enhanced: "4.4.1",
          text: "no LMTP reply to DATA-END within 300 ms after the final dot; outcome unknown: the LMTP server may have stored the message",
          afterDot: true,
          outcomeUnknown: true,
        },
      ]);
      expect(c.broken).toBeInstanceOf(LmtpFault);
      expect((c.broken as LmtpFault).phase).toBe("data-end");
    });

    test("a timeout through the pool leaves no connection busy or idle, and the next delivery opens a new one", async () => {
      const p = pool();
      fake.behaviour.stall = "afterData";
      const unknown = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("hi\r\n"), null);
      expect(unknown.map((x) => [x.code, x.outcomeUnknown])).toEqual([[451, true]]);
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      fake.behaviour.stall = null;
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("hi\r\n"), null);
      expect(r.map((x) => x.code)).toEqual([250]);
      expect(fake.connections).toBe(2);
    });
  });

  test("connect refused -> LmtpFault kind connect", async () => {
    const port = await freePort();
    await expectFault(LmtpConnection.open({ kind: "tcp", host: "127.0.0.1", port }, { timeouts: FAST }), "connect", "connect");
    const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port }, { timeouts: FAST });
    pools.push(p);
    await expectFault(p.deliver({ from: "", to: ["a@x.org"] }, msg("x\r\n"), null), "connect");
    expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
  });

  test("connection dropped mid-DATA -> closed fault, and the pool does not reuse the connection", async () => {
    const p = pool();
    await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("first\r\n"), null);
    expect(fake.connections).toBe(1);
    fake.behaviour.dropMidData = true;
    const big = new Uint8Array(2 * 1024 * 1024).fill(0x61);
    // Dropped before the final dot went out: a fault (not delivered); after it: outcome unknown.
    const outcome = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, big, big.length).catch((e: unknown) => e);
    if (outcome instanceof LmtpFault) expect([outcome.kind, outcome.phase]).toEqual(["closed", "body"]);
    else expect((outcome as RecipientReply[]).map((x) => [x.code, x.enhanced, x.afterDot, x.outcomeUnknown])).toEqual([[451, "4.4.2", true, true]]);
    expect(p.stats.idle).toBe(0);
    fake.behaviour.dropMidData = false;
    const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("third\r\n"), null);
    expect(r.map((x) => x.code)).toEqual([250]);
    expect(fake.connections).toBe(2);
    expect(fake.received.map((m) => dec.decode(m.data))).toEqual(["first\r\n", "third\r\n"]);
  });

  test("connection dropped after a small message (whole, with its final dot) -> outcome unknown, never a fault", async () => {
    const c = await open();
    fake.behaviour.dropMidData = true;
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("small\r\n"), null);
    expect(r).toEqual([
      {
        recipient: "a@x.org",
        code: 451,
        enhanced: "4.4.2",
        text: "LMTP server closed the connection after the final dot; outcome unknown: the LMTP server may have stored the message",
        afterDot: true,
        outcomeUnknown: true,
      },
    ]);
    expect(c.broken).not.toBeNull();
  });

  test("a body stream that fails mid-way -> BodyAborted, connection closed without the final dot", async () => {
    const p = pool();
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(ctl) {
        if (sent++ < 3) ctl.enqueue(msg(`line ${sent}\r\n`));
        else ctl.error(new Error("client went away"));
      },
    });
    const e = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, null).then(
      () => null,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(BodyAborted);
    expect((e as Error).message).toContain("client went away");
    expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
    // The server saw the connection end without "."; it stores nothing. A delivery after it (on a
    // new connection) is the only message.
    const r = await p.deliver({ from: "s@x.org", to: ["b@x.org"] }, msg("after\r\n"), null);
    expect(r.map((x) => x.code)).toEqual([250]);
    await sleep(50);
    expect(fake.connections).toBe(2);
    expect(fake.received.map((m) => [m.to, dec.decode(m.data)])).toEqual([[["b@x.org"], "after\r\n"]]);
  });

  test("LmtpConnection: a body failure marks the connection broken", async () => {
    const c = await open();
    const body = new ReadableStream<Uint8Array>({
      start(ctl) {
        ctl.enqueue(msg("partial"));
        ctl.error(new Error("size limit"));
      },
    });
    const e = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, null).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(BodyAborted);
    expect(c.broken).toBe(e as Error);
  });

  test("a unix socket target works", async () => {
    const dir = await mkdtemp(path.join("/tmp", "lmtp-test-"));
    const socketPath = path.join(dir, "lmtp.sock");
    const local = await startFakeLmtp({ socketPath });
    try {
      const target = lmtpTarget(socketPath, 0);
      const c = await LmtpConnection.open(target, { timeouts: FAST });
      conns.push(c);
      expect(c.pipelining).toBe(true);
      const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg(".unix\nsocket"), null);
      expect(r.map((x) => x.code)).toEqual([250]);
      expect(latin1(local.received[0]!.data)).toBe(".unix\r\nsocket\r\n");
      await c.quit();
      expect(local.commands).toContain("QUIT");
    } finally {
      await local.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  describe("pipelining on the wire", () => {
    test("the envelope goes out in one write, with RSET in front on a reused connection", async () => {
      const proxy = await startProxy(fake.port);
      try {
        const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port: proxy.port }, { timeouts: FAST });
        pools.push(p);
        await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, msg("one\r\n"), 5);
        await p.deliver({ from: "", to: ["c@x.org"] }, msg("two\r\n"), 5);
        expect(proxy.chunks).toHaveLength(1);
        const envelopes = proxy.chunks[0]!.filter((c) => c.includes("MAIL FROM"));
        expect(envelopes).toEqual([
          "MAIL FROM:<s@x.org> SIZE=5 BODY=8BITMIME\r\nRCPT TO:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n",
          "RSET\r\nMAIL FROM:<> SIZE=5 BODY=8BITMIME\r\nRCPT TO:<c@x.org>\r\nDATA\r\n",
        ]);
        expect(fake.received).toHaveLength(2);
      } finally {
        await proxy.close();
      }
    });

    test("a delivery id: LHLO <id>.mail-relay alone, then the envelope in one write, on fresh and reused connections alike", async () => {
      const proxy = await startProxy(fake.port);
      try {
        const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port: proxy.port }, { timeouts: FAST });
        pools.push(p);
        await p.deliver({ from: "s@x.org", to: ["a@x.org"], deliveryId: "0mf1abc" }, msg("one\r\n"), 5);
        await p.deliver({ from: "s@x.org", to: ["b@x.org"], deliveryId: "0mf1def" }, msg("two\r\n"), 5);
        await p.deliver({ from: "s@x.org", to: ["c@x.org"] }, msg("three\r\n"), 7);
        expect(proxy.chunks).toHaveLength(1);
        const sent = proxy.chunks[0]!.filter((c) => c.startsWith("LHLO") || c.includes("MAIL FROM"));
        expect(sent).toEqual([
          "LHLO mail-relay\r\n",
          // LHLO may only end a pipelined group (RFC 2920), and it resets the transaction: no RSET.
          "LHLO 0mf1abc.mail-relay\r\n",
          "MAIL FROM:<s@x.org> SIZE=5 BODY=8BITMIME\r\nRCPT TO:<a@x.org>\r\nDATA\r\n",
          "LHLO 0mf1def.mail-relay\r\n",
          "MAIL FROM:<s@x.org> SIZE=5 BODY=8BITMIME\r\nRCPT TO:<b@x.org>\r\nDATA\r\n",
          "RSET\r\nMAIL FROM:<s@x.org> SIZE=7 BODY=8BITMIME\r\nRCPT TO:<c@x.org>\r\nDATA\r\n",
        ]);
        expect(fake.received.map((m) => [m.to, latin1(m.data)])).toEqual([
          [["a@x.org"], "one\r\n"],
          [["b@x.org"], "two\r\n"],
          [["c@x.org"], "three\r\n"],
        ]);
      } finally {
        await proxy.close();
      }
    });

    test("a delivery id that is not one DNS label of letters and digits is refused before anything is sent", async () => {
      const c = await open();
      for (const id of ["", "a.b", "Abc", "a-b", "x\r\nRSET", "a".repeat(64)]) {
        const e = await c.deliver({ from: "s@x.org", to: ["a@x.org"], deliveryId: id }, msg("x\r\n"), null).catch((e: unknown) => e);
        expect(e).toBeInstanceOf(Error);
        expect(e).not.toBeInstanceOf(LmtpFault);
      }
      expect(fake.commands).toEqual(["LHLO mail-relay"]);
      expect(c.reusable).toBe(true);
    });

    test("without PIPELINING: one command at a time, and no DATA when every recipient was refused", async () => {
      const proxy = await startProxy(fake.port, { fromServer: (s) => s.replace("250-PIPELINING\r\n", "") });
      try {
        const c = await open({ kind: "tcp", host: "127.0.0.1", port: proxy.port });
        expect(c.pipelining).toBe(false);
        fake.behaviour.rcpt = (a) => (a.startsWith("no") ? 550 : 250);
        fake.behaviour.afterData = (a) => (a.startsWith("full") ? 452 : 250);
        const r = await c.deliver({ from: "s@x.org", to: ["a@x.org", "no@x.org", "full@x.org"] }, msg(".x\r\n"), null);
        expect(r.map((x) => [x.recipient, x.code])).toEqual([
          ["a@x.org", 250],
          ["no@x.org", 550],
          ["full@x.org", 452],
        ]);
        const r2 = await c.deliver({ from: "s@x.org", to: ["no1@x.org", "no2@x.org"] }, msg("y\r\n"), null);
        expect(r2.map((x) => x.code)).toEqual([550, 550]);
        const chunks = proxy.chunks[0]!;
        for (const cmd of ["MAIL FROM:<s@x.org> BODY=8BITMIME\r\n", "RCPT TO:<a@x.org>\r\n", "RCPT TO:<no@x.org>\r\n", "DATA\r\n", "RSET\r\n"]) {
          expect(chunks).toContain(cmd);
        }
        expect(fake.commands.filter((l) => l === "DATA")).toHaveLength(1);
        expect(latin1(fake.received[0]!.data)).toBe(".x\r\n");
      } finally {
        await proxy.close();
      }
    });
  });

  describe("LmtpPool", () => {
    test("reuses an idle connection through RSET", async () => {
      const p = pool();
      for (const n of [1, 2, 3]) {
        const r = await p.deliver({ from: `s${n}@x.org`, to: ["a@x.org"] }, msg(`m${n}\r\n`), null);
        expect(r.map((x) => x.code)).toEqual([250]);
      }
      expect(fake.connections).toBe(1);
      expect(p.stats).toEqual({ busy: 0, idle: 1, waiting: 0 });
      const cmds = fake.commands;
      expect(cmds.filter((l) => l === "RSET")).toHaveLength(2);
      expect(cmds.filter((l) => l.startsWith("LHLO"))).toHaveLength(1);
      // RSET comes before every MAIL but the first.
      const mails = cmds.flatMap((l, i) => (l.startsWith("MAIL") ? [i] : []));
      expect(cmds[mails[1]! - 1]).toBe("RSET");
      expect(cmds[mails[2]! - 1]).toBe("RSET");
      expect(fake.received.map((m) => m.from)).toEqual(["s1@x.org", "s2@x.org", "s3@x.org"]);
    });

    test("at most maxConnections at once; waiting deliveries all get through", async () => {
      let inFlight = 0;
      let most = 0;
      // A transaction is in flight from its RCPT until the server answers after the dot.
      fake.behaviour.rcpt = () => {
        most = Math.max(most, ++inFlight);
        return 250;
      };
      fake.behaviour.afterData = () => {
        inFlight--;
        return 250;
      };
      fake.behaviour.slowReader = { bytesPerSecond: 1024 * 1024 };
      const p = pool({ maxConnections: 2 });
      const body = new Uint8Array(32 * 1024).fill(0x62);
      const all = await Promise.all(
        [1, 2, 3, 4, 5].map((n) => p.deliver({ from: "s@x.org", to: [`r${n}@x.org`] }, body, body.length)),
      );
      expect(all.map((r) => [r[0]!.recipient, r[0]!.code])).toEqual([1, 2, 3, 4, 5].map((n) => [`r${n}@x.org`, 250]));
      expect(fake.received).toHaveLength(5);
      expect(fake.connections).toBe(2);
      expect(most).toBe(2);
      expect(p.stats).toEqual({ busy: 0, idle: 2, waiting: 0 });
    });

    test("check() returns the capabilities of a fresh connection, and closes the probe with QUIT", async () => {
      const p = pool();
      const caps = await p.check();
      expect(caps).toEqual(expect.arrayContaining(["PIPELINING", "8BITMIME", "SIZE"]));
      expect(fake.commands).toEqual(["LHLO mail-relay", "NOOP", "QUIT"]);
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
    });

    test("check() fails with a fault when the server does not answer", async () => {
      const p = pool();
      fake.behaviour.stall = "greeting";
      await expectFault(p.check(), "timeout", "greeting");
    });

    test("check() takes no delivery slot: with the only connection busy, it answers before the delivery ends", async () => {
      const p = pool({ maxConnections: 1, timeouts: { ...FAST, dataEnd: 2_000 } });
      fake.behaviour.stall = "afterData"; // the delivery holds its connection for 2 s
      const order: string[] = [];
      // A stall after the dot is an outcome-unknown reply, not a fault: it ends either way.
      const delivery = p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("x\r\n"), null).finally(() => order.push("delivery"));
      await until("DATA sent", () => fake.commands.includes("DATA"));
      expect(p.stats.busy).toBe(1);
      await p.check();
      order.push("check");
      await delivery;
      expect(order).toEqual(["check", "delivery"]);
    });

    test("concurrent check() calls share one probe, reused for a moment; a failure is forgotten once a delivery works again", async () => {
      const p = pool();
      const noops = () => fake.commands.filter((c) => c === "NOOP").length;
      const caps = await Promise.all(Array.from({ length: 50 }, () => p.check()));
      expect(new Set(caps.map((c) => c.join())).size).toBe(1);
      expect(noops()).toBe(1);
      await p.check();
      expect(noops()).toBe(1); // reused, no new connection
      expect(fake.connections).toBe(1);

      const failing = pool();
      fake.behaviour.stall = "greeting";
      await expectFault(failing.check(), "timeout", "greeting");
      fake.behaviour.stall = null;
      const before = fake.connections;
      await expectFault(failing.check(), "timeout", "greeting"); // the same outcome, reused
      expect(fake.connections).toBe(before);
      await failing.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("x\r\n"), null);
      expect(await failing.check()).toContain("PIPELINING"); // LMTP works again: probed afresh
    });

    test("close() sends QUIT on idle connections and refuses new deliveries", async () => {
      const p = new LmtpPool(tcp(fake), { timeouts: FAST });
      await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("x\r\n"), null);
      expect(fake.commands).not.toContain("QUIT");
      await p.close();
      expect(fake.commands.at(-1)).toBe("QUIT");
      expect(p.stats.idle).toBe(0);
      await expectFault(p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("x\r\n"), null), "closed");
    });

    test("a delivery still running when close() is called finishes, then its connection is closed with QUIT", async () => {
      const p = new LmtpPool(tcp(fake), { timeouts: FAST });
      fake.behaviour.slowReader = { bytesPerSecond: 1024 * 1024 };
      const running = p.deliver({ from: "s@x.org", to: ["a@x.org"] }, new Uint8Array(64 * 1024).fill(0x63), null);
      await p.close();
      expect((await running).map((x) => x.code)).toEqual([250]);
      for (let i = 0; i < 100 && !fake.commands.includes("QUIT"); i++) await sleep(10);
      expect(fake.commands).toContain("QUIT");
      expect(p.stats.idle).toBe(0);
    });

    test("a stale idle connection (server restarted) -> the next delivery succeeds on a fresh connection", async () => {
      const first = await startFakeLmtp();
      const port = first.port;
      const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port }, { timeouts: FAST });
      pools.push(p);
      await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("before\r\n"), null);
      expect(p.stats.idle).toBe(1);
      await first.close();
      const second = await startFakeLmtp({ port });
      try {
        const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("after\r\n"), null);
        expect(r.map((x) => x.code)).toEqual([250]);
        expect(second.connections).toBe(1);
        expect(second.received.map((m) => dec.decode(m.data))).toEqual(["after\r\n"]);
        expect(first.received.map((m) => dec.decode(m.data))).toEqual(["before\r\n"]);
      } finally {
        await second.close();
      }
    });

    test("an idle connection closed by the server right at RSET -> delivery retried once on a fresh connection", async () => {
      let cut = false;
      const proxy = await startProxy(fake.port, {
        // The server side "went away" while idle: the first RSET finds the connection closed.
        fromClient: (s) => {
          if (cut || !s.startsWith("RSET")) return true;
          cut = true;
          return false;
        },
      });
      try {
        const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port: proxy.port }, { timeouts: FAST });
        pools.push(p);
        await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, msg("one\r\n"), null);
        let pulls = 0;
        const body = new ReadableStream<Uint8Array>({
          pull(ctl) {
            if (pulls++ === 0) ctl.enqueue(msg("two\r\n"));
            else ctl.close();
          },
        });
        const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, null);
        expect(cut).toBe(true);
        expect(r.map((x) => x.code)).toEqual([250]);
        expect(proxy.chunks).toHaveLength(2);
        expect(fake.received.map((m) => dec.decode(m.data))).toEqual(["one\r\n", "two\r\n"]);
      } finally {
        await proxy.close();
      }
    });

    test("an idle connection closed by the server right at a delivery id's LHLO -> delivery retried once on a fresh connection", async () => {
      let cut = false;
      const proxy = await startProxy(fake.port, {
        fromClient: (s) => {
          if (cut || !s.startsWith("LHLO two.")) return true;
          cut = true;
          return false;
        },
      });
      try {
        const p = new LmtpPool({ kind: "tcp", host: "127.0.0.1", port: proxy.port }, { timeouts: FAST });
        pools.push(p);
        await p.deliver({ from: "s@x.org", to: ["a@x.org"], deliveryId: "one" }, msg("one\r\n"), null);
        const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"], deliveryId: "two" }, msg("two\r\n"), null);
        expect(cut).toBe(true);
        expect(r.map((x) => x.code)).toEqual([250]);
        expect(proxy.chunks).toHaveLength(2);
        expect(proxy.chunks[1]!.filter((c) => c.startsWith("LHLO"))).toEqual(["LHLO mail-relay\r\n", "LHLO two.mail-relay\r\n"]);
        expect(fake.received.map((m) => dec.decode(m.data))).toEqual(["one\r\n", "two\r\n"]);
      } finally {
        await proxy.close();
      }
    });
  });
});

// =============================================================================================

describe("against a scripted raw server", () => {
  const servers: Scripted[] = [];
  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });
  const start = async (greeting: string | null, reply: (line: string, socket: net.Socket) => ScriptedReply, delayMs = 0) => {
    const s = await startScripted(greeting, reply, delayMs);
    servers.push(s);
    return s;
  };
  const target = (s: Scripted): LmtpTarget => ({ kind: "tcp", host: "127.0.0.1", port: s.port });

  describe("the whole delivery has a limit up to the final dot, and never one after it", () => {
    const lmtpServer = (l: string) => (l.startsWith("LHLO") ? "250-hi\r\n250 PIPELINING\r\n" : l === "DATA" ? "354 go\r\n" : "250 2.0.0 ok\r\n");
    // One command at a time, so that the slow replies add up before the dot.
    const oneByOne = (l: string) => (l.startsWith("LHLO") ? "250 hi\r\n" : l === "DATA" ? "354 go\r\n" : "250 2.0.0 ok\r\n");
    const limits = (transaction: number, dataEnd = 1_000) => ({ connect: 1_000, greeting: 1_000, command: 1_000, body: 1_000, dataEnd, transaction });

    /** A body that sends `pieces` lines, one every `everyMs`. */
    function trickle(pieces: number, everyMs: number): ReadableStream<Uint8Array> {
      let sent = 0;
      return new ReadableStream<Uint8Array>({
        async pull(c) {
          if (sent === pieces) return c.close();
          await sleep(everyMs);
          c.enqueue(bytes(`line ${sent++}\r\n`));
        },
      });
    }

    test("a server slow at every step, each within its own limit: the delivery still ends at its limit, as a timeout, before the dot", async () => {
      // Each reply comes 200 ms late, well inside the 1 s per step, but greeting, LHLO, MAIL and
      // RCPT together take longer than the 700 ms for the delivery.
      const s = await start("220 hi\r\n", oneByOne, 200);
      const p = new LmtpPool(target(s), { timeouts: limits(700) });
      const f = await expectFault(p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null), "timeout");
      expect(f.message).toMatch(/within \d+ ms/);
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      expect(s.messages).toEqual([]);
      await p.close();
    });

    test("the same server with room for all its steps delivers (the limit above is what failed it)", async () => {
      const s = await start("220 hi\r\n", oneByOne, 200);
      const p = new LmtpPool(target(s), { timeouts: limits(10_000) });
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null);
      expect(r.map((x) => x.code)).toEqual([250]);
      expect(s.messages).toEqual(["x\r\n"]);
      await p.close();
    });

    test("a body that arrives slower than the delivery's limit: the final dot is never sent, the connection is dropped, the fault says so", async () => {
      const s = await start("220 hi\r\n", lmtpServer);
      const p = new LmtpPool(target(s), { timeouts: limits(400) });
      const body = trickle(20, 50); // 1 s of body for a 400 ms limit
      const f = await expectFault(p.deliver({ from: "s@x.org", to: ["a@x.org"] }, body, null), "timeout", "body");
      expect(f.message).toContain("before the final dot");
      await s.closed; // dropped, so the server discards what it got
      expect(s.lines).toContain("DATA");
      expect(s.messages).toEqual([]); // no "." line ever reached the server
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      // The body is free again for whoever keeps the message (the spool): the rest still reads.
      expect(body.locked).toBe(false);
      const reader = body.getReader();
      const rest: Uint8Array[] = [];
      for (let r = await reader.read(); !r.done; r = await reader.read()) rest.push(r.value);
      expect(latin1(concat(rest))).toEndWith("line 19\r\n");
      await p.close();
    });

    test("a body already in memory, with the limit passed before DATA was answered: no dot either", async () => {
      // The envelope's replies come 300 ms late, after the 200 ms limit: the 354 is never used.
      const s = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "250-hi\r\n250 PIPELINING\r\n" : l === "DATA" ? { afterMs: 300, text: "354 go\r\n" } : "250 ok\r\n"));
      const p = new LmtpPool(target(s), { timeouts: limits(200) });
      await expectFault(p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null), "timeout", "data");
      await s.closed;
      await sleep(100);
      expect(s.messages).toEqual([]);
      await p.close();
    });

    test("once the dot is sent, the reply gets the full dataEnd: a late answer after the delivery's limit is a delivery", async () => {
      // 600 ms for the final reply, the delivery's limit 300 ms, dataEnd 2 s.
      const s = await start("220 hi\r\n", (l) => (l === "." ? { afterMs: 600, text: "250 2.0.0 <a@x.org> Saved\r\n" } : lmtpServer(l)));
      const p = new LmtpPool(target(s), { timeouts: limits(300, 2_000) });
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null);
      expect(r).toEqual([{ recipient: "a@x.org", code: 250, enhanced: "2.0.0", text: "<a@x.org> Saved", afterDot: true }]);
      expect(s.messages).toEqual(["x\r\n"]);
      expect(p.stats.idle).toBe(1); // a clean end: the connection is kept
      await p.close();
    });

    test("after the dot, the recipients answered keep their reply; the rest are outcome unknown (no reply within dataEnd)", async () => {
      // Only the first of two replies after the dot ever comes.
      const s = await start("220 hi\r\n", (l) => (l === "." ? "250 2.0.0 <a@x.org> Saved\r\n" : lmtpServer(l)));
      const p = new LmtpPool(target(s), { timeouts: limits(10_000, 300) });
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, bytes("x\r\n"), null);
      expect(r.map((x) => [x.recipient, x.code, x.afterDot, x.outcomeUnknown])).toEqual([
        ["a@x.org", 250, true, undefined],
        ["b@x.org", 451, true, true],
      ]);
      expect(r[1]!.text).toBe("no LMTP reply to DATA-END within 300 ms after the final dot; outcome unknown: the LMTP server may have stored the message");
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      await p.close();
    });

    test("421 after the dot is an unknown outcome too, for it and every recipient after it; the connection is not kept", async () => {
      const s = await start("220 hi\r\n", (l) => (l === "." ? "421 4.3.2 vm Shutting down\r\n" : lmtpServer(l)));
      const p = new LmtpPool(target(s), { timeouts: limits(10_000, 300) });
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, bytes("x\r\n"), null);
      expect(r.map((x) => [x.code, x.enhanced, x.afterDot, x.outcomeUnknown])).toEqual([
        [421, "4.3.2", true, true],
        [451, "4.4.2", true, true],
      ]);
      expect(r[0]!.text).toBe("vm Shutting down (outcome unknown: the LMTP server may have stored the message)");
      expect(r[1]!.text).toBe("LMTP server answered 421 4.3.2 vm Shutting down after the final dot; outcome unknown: the LMTP server may have stored the message");
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      await p.close();
    });

    test("waiting for a free connection counts too: a delivery that finds none in time fails, and leaves the queue", async () => {
      // The only connection is held by a delivery waiting for its final reply (never sent), which
      // may take its full dataEnd although the delivery's limit is 300 ms.
      const s = await start("220 hi\r\n", (l) => (l === "." ? null : lmtpServer(l)));
      const p = new LmtpPool(target(s), { maxConnections: 1, timeouts: limits(300, 1_500) });
      const first = p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("first\r\n"), null);
      await until("the message received", () => s.messages.length === 1);
      const second = p.deliver({ from: "s@x.org", to: ["b@x.org"] }, bytes("second\r\n"), null);
      expect(p.stats.waiting).toBe(1);
      const f = await expectFault(second, "timeout", "connect");
      expect(f.message).toContain("no LMTP connection free");
      expect(p.stats.waiting).toBe(0);
      // The slot was not handed to the delivery that gave up: the first one still holds it, and
      // when it ends the pool is empty again.
      expect(p.stats.busy).toBe(1);
      expect((await first).map((x) => [x.code, x.outcomeUnknown])).toEqual([[451, true]]);
      expect(p.stats).toEqual({ busy: 0, idle: 0, waiting: 0 });
      expect(s.messages).toEqual(["first\r\n"]);
      await p.close();
    });

    describe("each step that sends something checks the limit first: DATA, the message data, the final dot", () => {
      // A server that answers the whole exchange ahead, with its greeting: every reply is in before
      // it is asked for, so only these checks can stop a delivery whose limit has passed.
      const answeredAhead = (lhlo: string) => start(`220 hi\r\n${lhlo}250 ok\r\n250 ok\r\n354 go\r\n`, () => null);
      const envelope = { from: "s@x.org", to: ["a@x.org"] };

      test("lock-step: past the limit, DATA is not sent", async () => {
        const s = await answeredAhead("250 hi\r\n");
        const c = await LmtpConnection.open(target(s), { timeouts: FAST });
        const f = await expectFault(c.deliver(envelope, bytes("x\r\n"), null, performance.now()), "timeout", "data");
        expect(f.message).toContain("before the final dot");
        await s.closed;
        expect(s.lines).toEqual(["LHLO mail-relay", "MAIL FROM:<s@x.org>", "RCPT TO:<a@x.org>"]);
      });

      test("pipelined: past the limit, DATA answered 354 is followed by no message data", async () => {
        const s = await answeredAhead("250-hi\r\n250 PIPELINING\r\n");
        const c = await LmtpConnection.open(target(s), { timeouts: FAST });
        const f = await expectFault(c.deliver(envelope, bytes("x\r\n"), null, performance.now()), "timeout", "body");
        expect(f.message).toContain("before the final dot");
        await s.closed;
        expect(s.lines).toEqual(["LHLO mail-relay", "MAIL FROM:<s@x.org>", "RCPT TO:<a@x.org>", "DATA"]);
      });

      test("a mailbox turn handed over after the limit: no final dot", async () => {
        // The turn is free, but handed over only once the delivery's limit has passed.
        class LateTurns extends MailboxTurns {
          override async take(recipients: string[], deadline: number): Promise<() => void> {
            const release = await super.take(recipients, Infinity);
            while (performance.now() < deadline) await sleep(5);
            return release;
          }
        }
        const s = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "250 hi\r\n" : l === "DATA" ? "354 go\r\n" : "250 ok\r\n"));
        const c = await LmtpConnection.open(target(s), { timeouts: FAST, turns: new LateTurns() });
        const deadline = performance.now() + 1_000;
        const f = await expectFault(c.deliver({ ...envelope, deliveryId: "d1" }, bytes("x\r\n"), null, deadline), "timeout", "body");
        expect(f.message).toContain("before the final dot");
        await s.closed;
        expect(s.lines).toEqual(["LHLO mail-relay", "LHLO d1.mail-relay", "MAIL FROM:<s@x.org>", "RCPT TO:<a@x.org>", "DATA"]);
        expect(s.messages).toEqual([]); // no "." line ever reached the server
      });
    });
  });

  describe("a client gone before the final dot: the dot is never sent (the signal)", () => {
    const server = () => start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "250 hi\r\n" : l === "DATA" ? "354 go\r\n" : "250 ok\r\n"));
    const envelope = { from: "s@x.org", to: ["a@x.org"] };

    test("gone as the last bytes of the message arrive: BodyAborted, the connection dropped without the dot", async () => {
      const s = await server();
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const client = new AbortController();
      const body = new ReadableStream<Uint8Array>({
        pull(ctl) {
          ctl.enqueue(bytes("Subject: x\r\n\r\nthe last line\r\n"));
          client.abort();
          ctl.close();
        },
      });
      const e = await c.deliver(envelope, body, null, Infinity, client.signal).catch((err: unknown) => err);
      expect(e).toBeInstanceOf(BodyAborted);
      expect((e as Error).message).toContain("the client left before the final dot");
      await s.closed;
      expect(s.lines).toEqual(["LHLO mail-relay", "MAIL FROM:<s@x.org>", "RCPT TO:<a@x.org>", "DATA"]);
      expect(s.messages).toEqual([]);
    });

    test("gone while waiting for the mailbox's turn: no dot once the turn comes", async () => {
      const s = await server();
      const turns = new MailboxTurns();
      const holder = await turns.take(["a@x.org"], Infinity);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST, turns });
      const client = new AbortController();
      const delivery = c.deliver({ ...envelope, deliveryId: "d1" }, bytes("x\r\n"), null, Infinity, client.signal).catch((err: unknown) => err);
      await until("the message data sent", () => s.lines.includes("DATA"));
      await sleep(50);
      client.abort();
      holder();
      expect(await delivery).toBeInstanceOf(BodyAborted);
      await s.closed;
      expect(s.messages).toEqual([]);
    });

    test("through the pool: gone before it starts, nothing is sent at all", async () => {
      const s = await server();
      const p = new LmtpPool(target(s), { timeouts: FAST });
      const e = await p.deliver(envelope, bytes("x\r\n"), null, AbortSignal.abort()).catch((err: unknown) => err);
      expect(e).toBeInstanceOf(BodyAborted);
      expect(s.connections).toBe(0);
      await p.close();
    });
  });

  describe("a mailbox's share of the connections", () => {
    /** A server that answers after the final dot at once, except for slow@x.org: that reply waits until release(). */
    async function slowMailboxServer() {
      const rcpt = new Map<net.Socket, string>();
      const hanging: net.Socket[] = [];
      let most = 0;
      const s = await start("220 hi\r\n", (l, sock) => {
        if (l.startsWith("LHLO")) return "250-hi\r\n250 PIPELINING\r\n";
        if (l.startsWith("MAIL")) rcpt.set(sock, "");
        if (l.startsWith("RCPT")) rcpt.set(sock, rcpt.get(sock) + l);
        if (l === "DATA") return "354 go\r\n";
        if (l === "." && rcpt.get(sock)?.includes("slow@")) {
          hanging.push(sock);
          most = Math.max(most, hanging.length);
          return null;
        }
        return l === "." ? "250 2.0.0 saved\r\n" : "250 ok\r\n";
      });
      // One reply per recipient after the dot (RFC 2033).
      const release = () => {
        for (const sock of hanging.splice(0)) sock.write("250 2.0.0 saved at last\r\n".repeat(rcpt.get(sock)!.split("RCPT").length - 1));
      };
      return { s, hanging, release, most: () => most };
    }

    test("deliveries hanging in one mailbox's save hold at most its share (half the pool): another mailbox's message is delivered at once", async () => {
      const { s, hanging, release, most } = await slowMailboxServer();
      const p = new LmtpPool(target(s), { maxConnections: 4, timeouts: { ...FAST, dataEnd: 10_000, transaction: 3_000 } });
      const slow = Array.from({ length: 8 }, (_, i) => p.deliver({ from: "s@x.org", to: [i % 2 ? "slow@x.org" : "Slow+list@x.org"] }, bytes(`slow ${i}\r\n`), null));
      await until("the slow mailbox's share hangs at the dot", () => hanging.length >= 2);
      const other = await p.deliver({ from: "s@x.org", to: ["other@x.org"] }, bytes("other\r\n"), null);
      expect(other.map((r) => r.code)).toEqual([250]);
      expect(s.messages).toContain("other\r\n");
      const timer = setInterval(release, 20);
      try {
        const outcomes = await Promise.allSettled(slow);
        for (const o of outcomes) {
          if (o.status === "fulfilled") expect(o.value.map((r) => r.code)).toEqual([250]);
          else expect((o.reason as LmtpFault).message).toContain("no LMTP connection free for slow@x.org");
        }
      } finally {
        clearInterval(timer);
      }
      expect(most()).toBe(2);
      expect(p.stats).toMatchObject({ busy: 0, waiting: 0 });
      await p.close();
    });

    test("maxPerMailbox sets the share; a delivery to several mailboxes counts against each", async () => {
      const { s, hanging, release, most } = await slowMailboxServer();
      const p = new LmtpPool(target(s), { maxConnections: 8, maxPerMailbox: 1, timeouts: { ...FAST, dataEnd: 10_000 } });
      const first = p.deliver({ from: "s@x.org", to: ["slow@x.org", "b@x.org"] }, bytes("first\r\n"), null);
      await until("the first hangs at the dot", () => hanging.length === 1);
      const second = p.deliver({ from: "s@x.org", to: ["b@x.org"] }, bytes("second\r\n"), null);
      await sleep(100);
      expect(s.messages).toEqual(["first\r\n"]); // b@x.org's one place is held by the first
      release();
      expect((await first).map((r) => r.code)).toEqual([250, 250]);
      expect((await second).map((r) => r.code)).toEqual([250]);
      expect(most()).toBe(1);
      await p.close();
    });
  });

  describe("any 2xx accepts: 251 and 252 as well as 250 (RFC 5321 4.2.2), in any packet split", () => {
    test.each([true, false])("pipelining %p: 251 to MAIL, 251/252/multi-line 250 to RCPT -> the message is sent to every recipient", async (pipelining) => {
      const s = await start("220 hi\r\n", (l) => {
        if (l.startsWith("LHLO")) return pipelining ? ["250-hi\r\n250-PIPE", "LINING\r\n250 8BITMIME\r\n"] : "250-hi\r\n250 8BITMIME\r\n";
        if (l.startsWith("MAIL")) return "251 2.1.0 ok\r\n";
        if (l === "RCPT TO:<a@x.org>") return "251 2.1.5 User not local; will forward\r\n";
        if (l === "RCPT TO:<b@x.org>") return ["252 2.1.5 Cannot VRFY", " user, but will attempt\r\n"];
        if (l === "RCPT TO:<c@x.org>") return ["250-2.1.5 first line\r\n250 2.1", ".5 ok\r\n"];
        if (l === "DATA") return "354 go\r\n";
        if (l === ".") return ["250 2.0.0 <a@x.org> Saved\r\n25", "2 2.0.0 <b@x.org> will attempt\r\n", "250-2.0.0 <c@x.org>\r\n250 2.0.0 Saved\r\n"];
        return "250 ok\r\n";
      });
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      expect(c.pipelining).toBe(pipelining);
      const r = await c.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org", "c@x.org"] }, bytes("hello\r\n"), null);
      expect(s.messages).toEqual(["hello\r\n"]);
      expect(s.lines.filter((l) => l.startsWith("RCPT") || l === "DATA")).toEqual(["RCPT TO:<a@x.org>", "RCPT TO:<b@x.org>", "RCPT TO:<c@x.org>", "DATA"]);
      expect(r.map((x) => [x.recipient, x.code, x.text, x.afterDot])).toEqual([
        ["a@x.org", 250, "<a@x.org> Saved", true],
        ["b@x.org", 252, "<b@x.org> will attempt", true],
        ["c@x.org", 250, "<c@x.org>\nSaved", true],
      ]);
      expect(c.reusable).toBe(true);
      c.close();
    });

    test.each([true, false])("pipelining %p: a 3xx to RCPT is no acceptance: that recipient is not sent the message, and its reply is temporary", async (pipelining) => {
      const s = await start("220 hi\r\n", (l) => {
        if (l.startsWith("LHLO")) return pipelining ? "250-hi\r\n250 PIPELINING\r\n" : "250 hi\r\n";
        if (l === "RCPT TO:<odd@x.org>") return "334 what?\r\n";
        if (l === "DATA") return "354 go\r\n";
        if (l === ".") return "250 2.0.0 <a@x.org> Saved\r\n";
        return "250 ok\r\n";
      });
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["odd@x.org", "a@x.org"] }, bytes("hello\r\n"), null);
      expect(r.map((x) => [x.recipient, x.code, x.afterDot])).toEqual([
        ["odd@x.org", 334, undefined],
        ["a@x.org", 250, true],
      ]);
      expect(replyClass(r[0]!.code)).toBe("temporary");
      expect(s.messages).toEqual(["hello\r\n"]); // once, for a@x.org
      c.close();
    });

    test("a 2xx to DATA instead of 354 sent nothing: a temporary reply, never a delivery, and the connection is dropped", async () => {
      const s = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "250-hi\r\n250 PIPELINING\r\n" : l === "DATA" ? "250 2.0.0 fine\r\n" : "250 ok\r\n"));
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("hello\r\n"), null);
      expect(r).toEqual([{ recipient: "a@x.org", code: 451, enhanced: "4.5.0", text: "DATA answered 250 2.0.0 fine instead of 354; the message was not sent" }]);
      expect(c.broken).toBeInstanceOf(LmtpFault);
      expect(s.messages).toEqual([]);
    });

    test("a 3xx after the final dot is an unknown outcome, not a refusal", async () => {
      const s = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "250-hi\r\n250 PIPELINING\r\n" : l === "DATA" ? "354 go\r\n" : l === "." ? "334 eh?\r\n" : "250 ok\r\n"));
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("hello\r\n"), null);
      expect(r.map((x) => [x.code, x.afterDot, x.outcomeUnknown])).toEqual([[334, true, true]]);
      expect(replyClass(r[0]!.code)).toBe("temporary");
      expect(r[0]!.text).toContain("outcome unknown");
      expect(c.reusable).toBe(false);
    });

    test("LHLO answered with a 2xx other than 250 is accepted; a 3xx is not", async () => {
      const ok = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "251-hi\r\n251 PIPELINING\r\n" : null));
      const c = await LmtpConnection.open(target(ok), { timeouts: FAST });
      expect(c.pipelining).toBe(true);
      c.close();
      const odd = await start("220 hi\r\n", (l) => (l.startsWith("LHLO") ? "354 hi\r\n" : null));
      await expectFault(LmtpConnection.open(target(odd), { timeouts: FAST }), "protocol", "lhlo");
    });
  });

  describe("non-ASCII addresses and SMTPUTF8 (RFC 6531)", () => {
    const capabilities = (smtputf8: boolean) => `250-hi\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ${smtputf8 ? "SMTPUTF8" : "ENHANCEDSTATUSCODES"}\r\n`;
    const server = (smtputf8: boolean) => {
      let rcpts = 0;
      return start("220 hi\r\n", (l) => {
        if (l.startsWith("LHLO")) return capabilities(smtputf8);
        if (l.startsWith("RCPT")) rcpts++;
        if (l === "DATA") return "354 go\r\n";
        if (l === ".") return "250 2.0.0 Saved\r\n".repeat(rcpts);
        return "250 ok\r\n";
      });
    };
    const unicode = (s: Scripted) => s.lines.map((l) => Buffer.from(l, "latin1").toString("utf8"));

    test("without SMTPUTF8, a non-ASCII sender: every recipient refused for good with the reason, nothing sent", async () => {
      const s = await server(false);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "jürgen@example.org", to: ["a@x.org", "b@x.org"] }, bytes("hello\r\n"), null);
      const reason = "<jürgen@example.org>: non-ASCII sender address, and the LMTP server does not offer SMTPUTF8";
      expect(r).toEqual([
        { recipient: "a@x.org", code: 553, enhanced: "5.6.7", text: reason },
        { recipient: "b@x.org", code: 553, enhanced: "5.6.7", text: reason },
      ]);
      expect(s.lines).toEqual(["LHLO mail-relay"]);
      expect(s.messages).toEqual([]);
      // Nothing started, so the connection is as good as before (no RSET needed either).
      expect(c.reusable).toBe(true);
      await c.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("hello\r\n"), null);
      expect(s.lines).toEqual(["LHLO mail-relay", "MAIL FROM:<s@x.org> BODY=8BITMIME", "RCPT TO:<a@x.org>", "DATA"]);
      c.close();
    });

    test("without SMTPUTF8, a non-ASCII recipient is refused alone; the ASCII one is sent the message", async () => {
      const s = await server(false);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["jürgen@x.org", "a@x.org"] }, bytes("hello\r\n"), null);
      expect(r).toEqual([
        { recipient: "jürgen@x.org", code: 553, enhanced: "5.6.7", text: "<jürgen@x.org>: non-ASCII address, and the LMTP server does not offer SMTPUTF8" },
        { recipient: "a@x.org", code: 250, enhanced: "2.0.0", text: "Saved", afterDot: true },
      ]);
      expect(unicode(s)).toEqual(["LHLO mail-relay", "MAIL FROM:<s@x.org> BODY=8BITMIME", "RCPT TO:<a@x.org>", "DATA"]);
      expect(s.messages).toEqual(["hello\r\n"]);
      c.close();
    });

    test("without SMTPUTF8, the ASCII recipients sent alone keep the delivery id (its LHLO and its mailbox turn)", async () => {
      const s = await server(false);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["jürgen@x.org", "a@x.org"], deliveryId: "0mf1abc" }, bytes("hello\r\n"), null);
      expect(r.map((x) => x.code)).toEqual([553, 250]);
      expect(unicode(s)).toEqual(["LHLO mail-relay", "LHLO 0mf1abc.mail-relay", "MAIL FROM:<s@x.org> BODY=8BITMIME", "RCPT TO:<a@x.org>", "DATA"]);
      c.close();
    });

    test("without SMTPUTF8, only non-ASCII recipients: no transaction at all", async () => {
      const s = await server(false);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "s@x.org", to: ["jürgen@x.org", "日本@x.org"] }, bytes("hello\r\n"), null);
      expect(r.map((x) => [x.code, x.enhanced])).toEqual([
        [553, "5.6.7"],
        [553, "5.6.7"],
      ]);
      expect(s.lines).toEqual(["LHLO mail-relay"]);
      c.close();
    });

    test("with SMTPUTF8 offered, a non-ASCII envelope is sent with SMTPUTF8", async () => {
      const s = await server(true);
      const c = await LmtpConnection.open(target(s), { timeouts: FAST });
      const r = await c.deliver({ from: "jürgen@example.org", to: ["日本@x.org", "a@x.org"] }, bytes("hello\r\n"), null);
      expect(r.map((x) => x.code)).toEqual([250, 250]);
      expect(unicode(s)).toEqual(["LHLO mail-relay", "MAIL FROM:<jürgen@example.org> BODY=8BITMIME SMTPUTF8", "RCPT TO:<日本@x.org>", "RCPT TO:<a@x.org>", "DATA"]);
      c.close();
    });
  });

  test("a greeting timeout closes the client's socket", async () => {
    const s = await start(null, () => null);
    await expectFault(LmtpConnection.open(target(s), { timeouts: FAST }), "timeout", "greeting");
    // The server sees the connection end (a leaked socket would keep it open until the test times out).
    await s.closed;
    expect(s.connections).toBe(1);
  });

  test("an LHLO timeout closes the client's socket", async () => {
    const s = await start("220 hi\r\n", () => null);
    await expectFault(LmtpConnection.open(target(s), { timeouts: FAST }), "timeout", "lhlo");
    await s.closed;
    expect(s.lines).toEqual(["LHLO mail-relay"]);
  });

  test("a garbage greeting is a protocol fault; a non-220 greeting too", async () => {
    const s = await start("hello, I am not LMTP\r\n", () => null);
    await expectFault(LmtpConnection.open(target(s), { timeouts: FAST }), "protocol", "greeting");
    const busy = await start("421 4.3.2 too busy\r\n", () => null);
    const f = await expectFault(LmtpConnection.open(target(busy), { timeouts: FAST }), "protocol", "greeting");
    expect(f.message).toContain("421 4.3.2 too busy");
  });

  test("MAIL refused: its reply is every recipient's answer and no message is sent", async () => {
    const s = await start("220 hi\r\n", (l) => {
      if (l.startsWith("LHLO")) return "250-hi\r\n250 PIPELINING\r\n";
      if (l.startsWith("MAIL")) return "451 4.3.0 try later\r\n";
      if (l.startsWith("RCPT") || l === "DATA") return "503 5.5.1 need MAIL\r\n";
      return "250 ok\r\n";
    });
    const c = await LmtpConnection.open(target(s), { timeouts: FAST });
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org", "b@x.org"] }, bytes("x\r\n"), null);
    expect(r).toEqual([
      { recipient: "a@x.org", code: 451, enhanced: "4.3.0", text: "try later" },
      { recipient: "b@x.org", code: 451, enhanced: "4.3.0", text: "try later" },
    ]);
    expect(s.messages).toEqual([]);
    expect(c.broken).toBeNull();
    c.close();
  });

  test("DATA refused after accepted recipients: the DATA reply is their answer", async () => {
    const s = await start("220 hi\r\n", (l) => {
      if (l.startsWith("LHLO")) return "250-hi\r\n250 PIPELINING\r\n";
      if (l.startsWith("RCPT TO:<no")) return "550 5.1.1 unknown\r\n";
      if (l === "DATA") return "452 4.3.1 out of space\r\n";
      return "250 ok\r\n";
    });
    const c = await LmtpConnection.open(target(s), { timeouts: FAST });
    const r = await c.deliver({ from: "s@x.org", to: ["a@x.org", "no@x.org"] }, bytes("x\r\n"), null);
    expect(r.map((x) => [x.recipient, x.code, x.text])).toEqual([
      ["a@x.org", 452, "out of space"],
      ["no@x.org", 550, "unknown"],
    ]);
    c.close();
  });

  test("a server that accepts DATA although every RCPT was refused: the connection is not reused", async () => {
    // RFC 2920 3.1: the client cannot assume DATA is refused when no RCPT worked. A 354 here
    // leaves the server waiting for message data, so that connection must not carry a next RSET.
    const s = await start("220 hi\r\n", (l) => {
      if (l.startsWith("LHLO")) return "250-hi\r\n250 PIPELINING\r\n";
      if (l.startsWith("RCPT")) return "550 5.1.1 unknown\r\n";
      if (l === "DATA") return "354 go ahead\r\n";
      if (l === ".") return "";
      return "250 ok\r\n";
    });
    const p = new LmtpPool(target(s), { timeouts: FAST });
    try {
      const r = await p.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null);
      expect(r.map((x) => x.code)).toEqual([550]);
      expect(p.stats.idle).toBe(0);
      await p.deliver({ from: "s@x.org", to: ["b@x.org"] }, bytes("y\r\n"), null);
      expect(s.connections).toBe(2);
      // Nothing was taken as message text by the server.
      expect(s.messages.join("")).not.toContain("RSET");
    } finally {
      await p.close();
    }
  });

  test("a server that stops reading during the message -> timeout in phase body (writes wait for the socket)", async () => {
    let dataSocket: net.Socket | null = null;
    const s = await start("220 hi\r\n", (line, sock) => {
      if (line.startsWith("LHLO")) return "250-hi\r\n250 PIPELINING\r\n";
      if (line !== "DATA") return "250 ok\r\n";
      // Stop reading for good: the client's writes back up and never drain.
      dataSocket = sock;
      return { text: "354 go ahead\r\n", then: "stop reading" };
    });
    const c = await LmtpConnection.open(target(s), { timeouts: { ...FAST, body: 300 } });
    // Far more than the socket buffers on both sides take.
    const big = new Uint8Array(64 * 1024 * 1024).fill(0x61);
    const started = Date.now();
    const f = await expectFault(c.deliver({ from: "s@x.org", to: ["a@x.org"] }, big, big.length), "timeout", "body");
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(c.broken).toBe(f);
    expect(dataSocket).not.toBeNull();
  });

  test("a garbage reply mid-transaction is a protocol fault with the waiting phase", async () => {
    const s = await start("220 hi\r\n", (l) => {
      if (l.startsWith("LHLO")) return "250 hi\r\n";
      if (l.startsWith("MAIL")) return "250 ok\r\n";
      if (l.startsWith("RCPT")) return "what?\r\n";
      return null;
    });
    const c = await LmtpConnection.open(target(s), { timeouts: FAST });
    expect(c.pipelining).toBe(false);
    const f = await expectFault(c.deliver({ from: "s@x.org", to: ["a@x.org"] }, bytes("x\r\n"), null), "protocol", "rcpt");
    expect(c.broken).not.toBeNull();
    expect(f.message).toContain("what?");
    await s.closed;
  });
});
