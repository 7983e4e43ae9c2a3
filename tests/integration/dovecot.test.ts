// The relay against a real Dovecot 2.3 (tests/support/dovecot.ts): HTTP in, LMTP out, Maildir
// files checked byte for byte. No fakes: if Dovecot is not installed, startDovecot() throws and
// every test here fails (locally and in CI alike).
//
// Dovecot runs with its defaults, so each stored file is Return-Path / Delivered-To / Received
// (prepended by Dovecot) + the message with LF line ends; expectStoredAs checks exactly that.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { LmtpConnection } from "../../lmtp.ts";
import type { LogLine } from "../../shared/log.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { expectStoredAs, startDovecot, type DovecotInstance, type PrependedField } from "../support/dovecot.ts";
import { streamOf } from "../support/streams.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const MiB = 1024 * 1024;
const INBOUND = "/api/v1/inbound-mail";
const USER = "user@kuma8088.com";
const ALICE = "alice@example.test";
const SENDER = "sender@example.org";
// 6 + 48 characters; random per run, so finding it in a log can only mean it was logged.
const API_KEY = `itest_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;

let dv: DovecotInstance;
let server: RunningServer;
/** Every line the server's access log wrote, from every server this file starts. */
const logLines: LogLine[] = [];
const collect = (line: LogLine) => void logLines.push(line);

/** Text put into message bodies; the access log must never contain any of it. */
const bodyMarkers: string[] = [];
function marker(label: string): string {
  const m = `${label}-bodytext-${crypto.randomUUID()}`;
  bodyMarkers.push(m);
  return m;
}

function config(lmtpHost: string) {
  return { apiKeys: [API_KEY], lmtpHost, lmtpPort: dv.port, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * MiB };
}

beforeAll(async () => {
  dv = await startDovecot(); // throws when Dovecot is missing: a failure, never a skip
  server = startServer(config(dv.host), { log: collect });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await server?.stop();
  await dv?.dispose();
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  await dv.clear();
});

// --- building messages ----------------------------------------------------------------------

type Part = string | number[] | Uint8Array;
/** An ArrayBuffer-backed byte array (what fetch takes as a body). */
type Bytes = Uint8Array<ArrayBuffer>;

/** Concatenates ASCII strings, byte values and byte arrays. Strings must be ASCII: 8-bit data is written as bytes. */
function bytes(...parts: Part[]): Bytes {
  const arrays = parts.map((p) => {
    if (typeof p !== "string") return p instanceof Uint8Array ? p : new Uint8Array(p);
    if (/[^\x00-\x7f]/.test(p)) throw new Error(`bytes(): non-ASCII string ${JSON.stringify(p)}; pass the bytes`);
    return Buffer.from(p, "latin1");
  });
  const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0));
  let o = 0;
  for (const a of arrays) {
    out.set(a, o);
    o += a.length;
  }
  return out;
}

/** A message: standard header block (CRLF unless told) + the given body parts, which carry their own line ends. */
function rfc822(subject: string, body: Part[], opts: { headers?: string[]; eol?: string; messageId?: string } = {}): Bytes {
  const eol = opts.eol ?? "\r\n";
  const head = [
    `From: Sender <${SENDER}>`,
    `To: ${USER}`,
    `Subject: ${subject}`,
    `Message-ID: ${opts.messageId ?? `<${crypto.randomUUID()}@itest.example>`}`,
    "Date: Wed, 12 Nov 2025 10:00:00 +0000",
    "MIME-Version: 1.0",
    ...(opts.headers ?? []),
  ];
  return bytes(head.join(eol) + eol + eol, ...body);
}

// --- talking to the relay -------------------------------------------------------------------

interface Answer {
  status: number;
  headers: Headers;
  // The relay's JSON answer (status, message, recipients, request_id, ...).
  json: any;
}

async function post(
  body: BodyInit,
  opts: { from?: string; to?: string; key?: string; url?: string; headers?: Record<string, string> } = {},
): Promise<Answer> {
  const res = await fetch(`${opts.url ?? server.url}${INBOUND}`, {
    method: "POST",
    headers: {
      "Content-Type": "message/rfc822",
      "X-API-Key": opts.key ?? API_KEY,
      "X-Envelope-From": opts.from ?? SENDER,
      "X-Envelope-To": opts.to ?? USER,
      ...opts.headers,
    },
    body,
  });
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new Error(`HTTP ${res.status}, not JSON: ${text.slice(0, 300)}`);
  }
  return { status: res.status, headers: res.headers, json };
}

function expectDelivered(a: Answer, recipients = [USER]): void {
  if (a.status !== 200) throw new Error(`expected 200, got ${a.status}: ${JSON.stringify(a.json)}`);
  expect(a.json.status).toBe("success");
  expect(a.json.recipients.map((r: { address: string }) => r.address)).toEqual(recipients);
  // Each recipient's answer is Dovecot's reply after the final dot ("250 2.0.0 <rcpt> <id> Saved"),
  // not the RCPT reply ("250 2.1.5 OK"): only the former says the message was stored.
  for (const r of a.json.recipients) {
    expect(r.code).toBe(250);
    expect(r.reply).toMatch(new RegExp(`^250 2\\.0\\.0 <${r.address.replace(/\./g, "\\.")}> \\S+ Saved$`));
  }
}

/** The one message in a mailbox (fails if there are none or several). */
async function onlyMessage(user: string): Promise<Uint8Array> {
  const msgs = await dv.messages(user);
  expect(msgs).toHaveLength(1);
  return msgs[0]!;
}

async function expectNothingStored(): Promise<void> {
  for (const u of dv.users) expect({ user: u, count: (await dv.messages(u)).length }).toEqual({ user: u, count: 0 });
}

function field(fields: PrependedField[], name: PrependedField["name"]): string | undefined {
  return fields.find((f) => f.name === name)?.value;
}

async function dovecotLog(): Promise<string> {
  return Bun.file(`${dv.dir}/dovecot.log`).text();
}

/** Dovecot writes its log through a separate process: wait until `ready(text)` holds. */
async function waitForDovecotLog(ready: (text: string) => boolean): Promise<string> {
  for (let i = 0; ; i++) {
    const text = await dovecotLog();
    if (ready(text)) return text;
    if (i >= 200) throw new Error(`Dovecot log never showed what was expected; its tail:\n${text.split("\n").slice(-20).join("\n")}`);
    await Bun.sleep(25);
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Runs the real curl binary; answers the HTTP status and the body. */
async function curl(args: string[]): Promise<{ status: number; body: string }> {
  const env: Record<string, string | undefined> = { ...process.env };
  for (const k of ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"]) delete env[k];
  const p = Bun.spawn(["curl", ...args, "--silent", "--show-error", "--write-out", "\n%{http_code}"], { stdout: "pipe", stderr: "pipe", env });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  if (code !== 0) throw new Error(`curl exited with ${code}: ${err}`);
  const nl = out.lastIndexOf("\n");
  return { status: Number(out.slice(nl + 1)), body: out.slice(0, nl) };
}

// ---------------------------------------------------------------------------------------------

describe("byte-exact delivery to a real Dovecot", () => {
  const cases: { name: string; message: () => Bytes }[] = [
    {
      name: "8-bit Shift_JIS body",
      message: () =>
        rfc822(
          "Shift_JIS",
          [
            [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea], "\r\n", // 日本語
            [0x95, 0x5c, 0x83, 0x5c], "\r\n", // 表ソ: the trail byte is 0x5C ("\")
            [0x82, 0xa0, 0x82, 0xa2, 0x82, 0xa4], "\r\n", // あいう
            [0xb1, 0xb2, 0xb3], "\r\n", // ｱｲｳ, half-width katakana: single bytes
            marker("sjis"), "\r\n",
          ],
          { headers: ["Content-Type: text/plain; charset=Shift_JIS", "Content-Transfer-Encoding: 8bit"] },
        ),
    },
    {
      name: "ISO-2022-JP (7-bit with escape sequences), encoded-word subject",
      message: () =>
        rfc822(
          "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=",
          [
            [0x1b, 0x24, 0x42, 0x46, 0x7c, 0x4b, 0x5c, 0x38, 0x6c, 0x1b, 0x28, 0x42], "\r\n", // ESC $ B 日本語 ESC ( B
            [0x1b, 0x24, 0x42, 0x24, 0x22, 0x1b, 0x28, 0x42], " ascii after the escape\r\n", // あ
            marker("iso2022jp"), "\r\n",
          ],
          { headers: ["Content-Type: text/plain; charset=ISO-2022-JP", "Content-Transfer-Encoding: 7bit"] },
        ),
    },
    {
      name: "Latin-1 body",
      message: () =>
        rfc822(
          "Latin-1",
          ["Caf", [0xe9], ", fid", [0xe8], "le, ", [0xfc], "ber, ", [0xff], [0xa0], "nbsp\r\n", marker("latin1"), "\r\n"],
          { headers: ["Content-Type: text/plain; charset=ISO-8859-1", "Content-Transfer-Encoding: 8bit"] },
        ),
    },
    {
      name: "every byte value but CR and LF in one body line (NUL included)",
      message: () => {
        const all: number[] = [];
        for (let b = 0; b < 256; b++) if (b !== 0x0a && b !== 0x0d) all.push(b);
        return rfc822("binary", [all, "\r\n", marker("binary"), "\r\n"], { headers: ["Content-Type: application/octet-stream", "Content-Transfer-Encoding: binary"] });
      },
    },
    {
      name: "raw UTF-8 in a header and the body",
      message: () => {
        const utf8 = (t: string) => new TextEncoder().encode(t);
        return bytes(
          `From: ${SENDER}\r\nTo: ${USER}\r\nSubject: `, utf8("日本語, raw 8-bit"), `\r\nMessage-ID: <${crypto.randomUUID()}@itest.example>\r\n`,
          "Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
          utf8("Grüße, 日本語 ✓\r\n"), marker("utf8"), "\r\n",
        );
      },
    },
    {
      name: "lines that start with dots, and a lone '.' line mid-body that must not end the message",
      message: () =>
        rfc822("dots", [
          ".\r\n",
          "..\r\n",
          ".foo\r\n",
          "...three dots\r\n",
          "text before a lone dot\r\n",
          ".\r\n",
          "text after the lone dot: if the message ended above, this line is lost\r\n",
          ". dot space\r\n",
          marker("dots"), "\r\n",
          ".\r\n", // and a lone dot as the last line
        ]),
    },
    {
      name: "a message whose very first byte is a dot",
      message: () => bytes(".first line starts with a dot\r\n", `Subject: dot first\r\n\r\n${marker("dotfirst")}\r\n`),
    },
    {
      name: "no final newline",
      message: () => rfc822("no final newline", ["first line\r\n", "last line, no line end: ", marker("nofinal")]),
    },
    {
      name: "no final newline, and the last line is a lone dot",
      message: () => rfc822("ends in a dot", [marker("enddot"), "\r\n", "."]),
    },
    {
      name: "bare LF line ends throughout",
      message: () => rfc822("bare LF", ["line one\n", ".dot line\n", "..\n", "\n", marker("barelf"), "\n"], { eol: "\n" }),
    },
    {
      name: "mixed CRLF and bare LF line ends",
      message: () => rfc822("mixed", ["crlf line\r\n", "lf line\n", ".\n", "crlf again\r\n", marker("mixed"), "\n"]),
    },
  ];

  for (const c of cases) {
    test(c.name, async () => {
      const message = c.message();
      expectDelivered(await post(message));
      const fields = expectStoredAs(await onlyMessage(USER), message);
      expect(field(fields, "Return-Path")).toBe(`<${SENDER}>`);
      expect(field(fields, "Delivered-To")).toBe(USER);
      await expect(dv.messages(ALICE)).resolves.toEqual([]);
    });
  }

  // The relay stuffs dots chunk by chunk, so chunk boundaries must change nothing: each size puts
  // boundaries between CR and LF, between LF and ".", and just before "\n." somewhere.
  for (const chunk of [1, 2, 3, 5]) {
    test(`dot lines streamed in ${chunk}-byte chunks without Content-Length`, async () => {
      const lines: Part[] = [];
      for (let pad = 0; pad < 6; pad++) lines.push("x".repeat(pad), "\r\n", ".", "x".repeat(pad), "\n", "..\r\n", ".\n");
      const message = rfc822("dots, streamed", [...lines, ".\r", "\n", marker("dotstream"), "\r\n", "."]);
      expectDelivered(await post(streamOf(message, chunk)));
      expectStoredAs(await onlyMessage(USER), message);
    });
  }

  for (const from of ["<>", ""]) {
    test(`the null sender (X-Envelope-From: ${JSON.stringify(from)}) is stored as Return-Path: <>`, async () => {
      const message = rfc822("Undelivered Mail Returned to Sender", [`This is the mail system.\r\n${marker("bounce")}\r\n`], {
        headers: ["Auto-Submitted: auto-replied"],
      });
      const a = await post(message, { from });
      expectDelivered(a);
      const fields = expectStoredAs(await onlyMessage(USER), message);
      expect(field(fields, "Return-Path")).toBe("<>");
      expect(field(fields, "Received")).toContain("(envelope-from <>)");
    });
  }

  // Streamed from one buffer through views, never copied here; the stored file is the only other copy.
  for (const declared of [true, false]) {
    test(`a 24 MiB message, streamed ${declared ? "with Content-Length" : "chunked (no Content-Length)"}, long base64-like lines and dot-leading lines`, async () => {
      const size = 24 * MiB;
      const message = bigMessage(size);
      // With Content-Length as the Worker sends it (it knows the raw size), and without: then the
      // relay counts the bytes against its 25 MiB limit as they pass.
      const a = await post(streamOf(message, 65_537), declared ? { headers: { "Content-Length": String(size) } } : {});
      expect(a.status).toBe(200);
      expectDelivered(a);
      expectStoredAs(await onlyMessage(USER), message);
    });
  }
});

/**
 * A deterministic `size`-byte message: headers, then CRLF lines of base64 alphabet up to 998
 * characters long; about one line in 50 starts with a dot, and some of those are "." or "..".
 */
function bigMessage(size: number): Bytes {
  const out = new Uint8Array(size);
  const head = bytes(
    `From: ${SENDER}\r\nTo: ${USER}\r\nSubject: big\r\nMessage-ID: <big@itest.example>\r\nMIME-Version: 1.0\r\n` +
      `Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n`,
  );
  out.set(head);
  let o = head.length;
  const alphabet = bytes("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/");
  let x = 0x2545f491; // xorshift32 state
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const line = (len: number, dot: boolean) => {
    for (let i = 0; i < len; i++) out[o + i] = alphabet[rnd() & 63]!;
    if (dot && len > 0) out[o] = 0x2e;
    o += len;
    out[o++] = 0x0d;
    out[o++] = 0x0a;
  };
  // Lines take at most 999 bytes with their CRLF, so after the loop 2..1000 bytes remain.
  while (size - o >= 1001) {
    const r = rnd();
    const dot = r % 50 === 0;
    const len = dot && r % 3 === 0 ? 1 + (r % 2) : 1 + (r % 997); // "." / ".." now and then
    line(len, dot);
  }
  line(size - o - 2, true);
  return out;
}

describe("envelopes and answers", () => {
  test("two recipients in one request land in both mailboxes", async () => {
    const message = rfc822("two recipients", [marker("tworcpt"), "\r\n"]);
    const a = await post(message, { to: `${USER}, ${ALICE}` });
    expectDelivered(a, [USER, ALICE]);
    for (const u of [USER, ALICE]) expectStoredAs(await onlyMessage(u), message);
    await expect(dv.messages("bob@example.test")).resolves.toEqual([]);
  });

  test("unknown user: 422 with Dovecot's reason, nothing stored", async () => {
    const a = await post(rfc822("unknown", [marker("unknown"), "\r\n"]), { to: "nobody-here@kuma8088.com" });
    expect(a.status).toBe(422);
    expect(a.json.status).toBe("rejected");
    expect(a.json.message).toContain("5.1.1");
    expect(a.json.message).toContain("User doesn't exist");
    expect(a.json.recipients).toEqual([expect.objectContaining({ address: "nobody-here@kuma8088.com", code: 550, enhanced: "5.1.1" })]);
    await expectNothingStored();
  });

  test("a recipient in another case reaches the same mailbox (Dovecot's default auth_username_format %Lu)", async () => {
    const message = rfc822("mixed case", [marker("mixedcase"), "\r\n"]);
    const a = await post(message, { to: "Alice@Example.TEST" });
    expectDelivered(a, ["Alice@Example.TEST"]);
    expectStoredAs(await onlyMessage(ALICE), message);
  });

  test("the same recipient twice in different cases gets one copy, not two", async () => {
    const message = rfc822("same mailbox twice", [marker("twice"), "\r\n"]);
    const a = await post(message, { to: `${ALICE}, ALICE@EXAMPLE.TEST, ${USER}, User@Kuma8088.com` });
    expectDelivered(a, [ALICE, USER]);
    expectStoredAs(await onlyMessage(ALICE), message);
    expectStoredAs(await onlyMessage(USER), message);
  });

  test("a known and an unknown recipient: the known one gets exactly one copy, the answer says which failed", async () => {
    const message = rfc822("half known", [marker("halfknown"), "\r\n"]);
    const a = await post(message, { to: `nobody-here@kuma8088.com, ${USER}` });
    expect(a.status).toBe(422);
    expect(a.json.recipients).toEqual([
      expect.objectContaining({ address: "nobody-here@kuma8088.com", code: 550 }),
      expect.objectContaining({ address: USER, code: 250 }),
    ]);
    expect(a.json.message).toContain("nobody-here@kuma8088.com");
    expect(a.json.message).not.toContain(USER);
    expectStoredAs(await onlyMessage(USER), message);
  });
});

describe("non-ASCII envelopes: Dovecot 2.3 does not offer SMTPUTF8", () => {
  // The JSON body is UTF-8 by definition, so the envelope arrives as sent.
  async function postJson(body: Record<string, unknown>): Promise<Answer> {
    const res = await fetch(`${server.url}${INBOUND}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-API-Key": API_KEY },
      body: JSON.stringify(body),
    });
    return { status: res.status, headers: res.headers, json: await res.json() };
  }
  const reason = (address: string, what = "address") => `553 5.6.7 <${address}>: non-ASCII ${what}, and the LMTP server does not offer SMTPUTF8`;

  test("Dovecot's LHLO has no SMTPUTF8 (what the refusals below rest on)", async () => {
    const c = await LmtpConnection.open({ kind: "tcp", host: dv.host, port: dv.port });
    try {
      expect(c.capabilities.has("SMTPUTF8")).toBe(false);
      expect(c.capabilities.has("8BITMIME")).toBe(true);
    } finally {
      await c.quit();
    }
  });

  test("a UTF-8 sender: 422 naming the reason, and nothing stored (not a Return-Path: <> copy)", async () => {
    const a = await postJson({ from: "jürgen@example.org", to: `${USER}, ${ALICE}`, raw: `Subject: utf-8 sender\r\n\r\n${marker("utf8from")}\r\n` });
    expect(a.status).toBe(422);
    expect(a.json.status).toBe("rejected");
    expect(a.json.recipients.map((r: { reply: string }) => r.reply)).toEqual([reason("jürgen@example.org", "sender address"), reason("jürgen@example.org", "sender address")]);
    expect(a.json.message).toContain("does not offer SMTPUTF8");
    await expectNothingStored();
  });

  test("an ASCII and a UTF-8 recipient: the ASCII one gets exactly one copy, the other is refused with the reason", async () => {
    const raw = `Subject: utf-8 recipient\r\n\r\n${marker("utf8rcpt")}\r\n`;
    const a = await postJson({ from: SENDER, to: `jürgen@kuma8088.com, ${USER}`, raw });
    expect(a.status).toBe(422);
    expect(a.json.recipients).toEqual([
      expect.objectContaining({ address: "jürgen@kuma8088.com", code: 553, enhanced: "5.6.7", reply: reason("jürgen@kuma8088.com") }),
      expect.objectContaining({ address: USER, code: 250 }),
    ]);
    expect(a.json.message).toBe(reason("jürgen@kuma8088.com"));
    const fields = expectStoredAs(await onlyMessage(USER), bytes(raw));
    expect(field(fields, "Return-Path")).toBe(`<${SENDER}>`);
  });
});

describe("time limits", () => {
  // Without a spool the host holds the first MiB before it takes a connection, then streams the
  // rest: past that MiB a slow body meets the delivery's limit inside the LMTP transaction.
  test("a body past its first MiB that arrives slower than the delivery's limit: 503 'not delivered', and truly nothing in the mailbox", async () => {
    const slow = startServer(config(dv.host), { log: collect, lmtp: { timeouts: { transaction: 1_000 } } });
    try {
      const messageId = `<${crypto.randomUUID()}@itest.example>`;
      const head = rfc822("slow body", [marker("slow"), "\r\n", `${"x".repeat(76)}\r\n`.repeat(15_000)], { messageId });
      const unfinished = (t: string) => t.split("(unfinished DATA command)").length - 1;
      const unfinishedBefore = unfinished(await dovecotLog());
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(c) {
          if (sent === 0) c.enqueue(head);
          else if (sent <= 25) {
            await Bun.sleep(100); // 2.5 s of body for a 1 s limit
            c.enqueue(bytes(`slow line ${sent}\r\n`));
          } else return c.close();
          sent++;
        },
      });
      const a = await post(body, { url: slow.url });
      expect(a.status).toBe(503);
      expect(a.json.message).toStartWith("temporary failure, not delivered: ");
      // Dovecot got everything but the final dot, then a dropped connection: it says so in its
      // log, and stores nothing. (Had the dot gone out, the log would show this Message-ID saved.)
      const log = await waitForDovecotLog((t) => unfinished(t) > unfinishedBefore || t.includes(`msgid=${messageId}`));
      expect(log).not.toContain(`msgid=${messageId}`);
      await expectNothingStored();
      expect(slow.metrics.get("unknown_outcome")).toBe(0);
    } finally {
      await slow.stop();
    }
  });
});

describe("the runbook's curl commands, with the real curl", () => {
  // Section 4.1, the -d argument exactly as the shell passes it (the runbook's indentation kept).
  const RUNBOOK_4_1 = String.raw`{
    "from": "test@example.com",
    "to": "user@kuma8088.com",
    "subject": "Test Email",
    "raw": "From: test@example.com\r\nTo: user@kuma8088.com\r\nSubject: Test Email\r\n\r\nThis is a test message.",
    "timestamp": "2025-11-12T10:00:00Z"
  }`;
  // The same body on one line.
  const RUNBOOK_4_1_FLAT = String.raw`{"from": "test@example.com","to": "user@kuma8088.com","subject": "Test Email","raw": "From: test@example.com\r\nTo: user@kuma8088.com\r\nSubject: Test Email\r\n\r\nThis is a test message.","timestamp": "2025-11-12T10:00:00Z"}`;
  const RAW = bytes("From: test@example.com\r\nTo: user@kuma8088.com\r\nSubject: Test Email\r\n\r\nThis is a test message.");

  const runbookCurl = (key: string, data: string) => [
    "-X", "POST", `${server.url}${INBOUND}`,
    "-H", "Content-Type: application/json",
    "-H", `X-API-Key: ${key}`,
    "-d", data,
  ];

  for (const [name, body] of [["as printed", RUNBOOK_4_1], ["on one line", RUNBOOK_4_1_FLAT]] as const) {
    test(`4.1 test mail (JSON body ${name}) -> 200 "success", stored in user@kuma8088.com's mailbox`, async () => {
      const r = await curl(runbookCurl(API_KEY, body));
      expect(r.status).toBe(200);
      // The runbook's expected answer, field for field.
      expect(JSON.parse(r.body)).toMatchObject({ status: "success", message: "Email delivered to LMTP", recipient: "user@kuma8088.com" });
      const fields = expectStoredAs(await onlyMessage(USER), RAW);
      expect(field(fields, "Return-Path")).toBe("<test@example.com>");
    });
  }

  test("4.3.1 X-API-Key: invalid-key -> 401, nothing delivered", async () => {
    for (const data of [RUNBOOK_4_1, "{...}" /* the runbook's literal placeholder */]) {
      const r = await curl(runbookCurl("invalid-key", data));
      expect(r.status).toBe(401);
      expect(JSON.parse(r.body)).toMatchObject({ status: "error" });
    }
    await expectNothingStored();
  });
});

describe("Dovecot down, other transports, connection reuse", () => {
  test("Dovecot stopped: 503 deferred + Retry-After, /ready 503; started again: delivered without restarting the relay", async () => {
    // First a delivery, so that the pool holds an idle connection to the Dovecot about to go away.
    const before = rfc822("before the outage", [marker("before"), "\r\n"]);
    expectDelivered(await post(before));

    await dv.stop();
    try {
      const a = await post(rfc822("during the outage", [marker("during"), "\r\n"]));
      expect(a.status).toBe(503);
      expect(a.json.status).toBe("deferred");
      expect(a.headers.get("retry-after")).toMatch(/^[1-9]\d*$/);

      const ready = await fetch(`${server.url}/ready`);
      expect(ready.status).toBe(503);
      expect(ready.headers.get("retry-after")).toMatch(/^[1-9]\d*$/);
    } finally {
      await dv.start();
    }

    const after = rfc822("after the outage", [marker("after"), "\r\n"]);
    expectDelivered(await post(after));
    expect((await fetch(`${server.url}/ready`)).status).toBe(200);
    // The message refused during the outage is not there; the others are, once each.
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(2);
    expectStoredAs(stored[0]!, before);
    expectStoredAs(stored[1]!, after);
  });

  test("delivery over the unix socket (LMTP_HOST = a path)", async () => {
    const viaUnix = startServer(config(dv.socketPath), { log: collect });
    try {
      const message = rfc822("over the unix socket", [marker("unix"), "\r\n"]);
      expectDelivered(await post(message, { url: viaUnix.url }));
      const fields = expectStoredAs(await onlyMessage(USER), message);
      // Over TCP Dovecot names the peer address; over the unix socket there is none.
      expect(field(fields, "Received")).not.toContain("127.0.0.1");
      await waitForDovecotLog((t) => t.includes("Connect from local"));
    } finally {
      await viaUnix.stop();
    }
  });

  test("sequential deliveries reuse one LMTP connection", async () => {
    // Dovecot names each LMTP connection with a session id; transactions on it are
    // "<session>:T2", "<session>:T3", ... It shows in every reply after the final dot and in
    // every "saved mail" line of its log.
    const ids: string[] = [];
    const fromReplies = new Set<string>();
    for (let i = 0; i < 5; i++) {
      const id = `<seq-${i}-${crypto.randomUUID()}@itest.example>`;
      ids.push(id);
      const a = await post(rfc822(`sequential ${i}`, [marker("seq"), "\r\n"], { messageId: id }));
      expectDelivered(a);
      const m = /^250 2\.0\.0 <[^>]+> ([A-Za-z0-9+/]+)(?::\S+)? Saved$/.exec(a.json.recipients[0].reply);
      if (!m) throw new Error(`unexpected LMTP reply ${JSON.stringify(a.json.recipients[0].reply)}`);
      fromReplies.add(m[1]!);
    }
    expect(fromReplies.size).toBe(1);

    // Dovecot's own log agrees: the five messages were saved in one session.
    const log = await waitForDovecotLog((t) => ids.every((id) => t.includes(`msgid=${id}: saved mail`)));
    const fromLog = new Set(
      ids.map((id) => new RegExp(`<\\d+><([A-Za-z0-9+/]+)(?::[^>]*)?>: Info: msgid=${escapeRegExp(id)}: saved mail`).exec(log)?.[1]),
    );
    expect(fromLog).toEqual(fromReplies);

    expect(server.pool.stats).toMatchObject({ busy: 0, waiting: 0 });
    expect(server.pool.stats.idle).toBeGreaterThanOrEqual(1);
    expect(await dv.messages(USER)).toHaveLength(5);
  });

  test("20 concurrent deliveries all land exactly once", async () => {
    const sent = new Map<string, Bytes>();
    for (let i = 0; i < 20; i++) {
      const id = `<conc-${i}-${crypto.randomUUID()}@itest.example>`;
      sent.set(id, rfc822(`concurrent ${i}`, [`message ${i}\r\n`, marker("conc"), "\r\n"], { messageId: id }));
    }
    const answers = await Promise.all([...sent.values()].map((m) => post(m)));
    for (const a of answers) expectDelivered(a);

    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(20);
    const seen = new Map<string, number>();
    for (const s of stored) {
      const id = /^Message-ID: (<[^>]+>)$/m.exec(Buffer.from(s).toString("latin1"))?.[1];
      if (!id || !sent.has(id)) throw new Error(`stored message with unknown Message-ID ${id}`);
      seen.set(id, (seen.get(id) ?? 0) + 1);
      expectStoredAs(s, sent.get(id)!);
    }
    expect([...seen.values()].every((n) => n === 1)).toBe(true);
    expect(seen.size).toBe(20);
    expect(server.pool.stats).toMatchObject({ busy: 0, waiting: 0 });
  });
});

describe("access log", () => {
  test("log lines carry no body text and no key (right or wrong)", async () => {
    const WRONG_KEY = `wrong_${crypto.randomUUID().replace(/-/g, "")}`;
    const secret = marker("logcheck");
    const ok = await post(rfc822("log check", [`${secret}\r\n`]));
    const wrong = await post(rfc822("log check, wrong key", [`${secret}\r\n`]), { key: WRONG_KEY });
    const viaJson = await fetch(`${server.url}${INBOUND}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ from: SENDER, to: USER, raw: `Subject: json\r\n\r\n${secret}\r\n` }),
    });
    expect([ok.status, wrong.status, viaJson.status]).toEqual([200, 401, 200]);
    const jsonAnswer = (await viaJson.json()) as { request_id: string };

    // The log is not silent: one line per request, with its status.
    for (const [id, status] of [[ok.json.request_id, 200], [wrong.json.request_id, 401], [jsonAnswer.request_id, 200]] as const) {
      expect(logLines.filter((l) => l.request_id === id).map((l) => l.status)).toEqual([status]);
    }

    const text = logLines.map((l) => JSON.stringify(l)).join("\n");
    for (const key of [API_KEY, WRONG_KEY, "invalid-key"]) {
      expect(text).not.toContain(key);
      expect(text).not.toContain(key.slice(0, 10)); // the runbook logged the first 10 characters
    }
    for (const m of bodyMarkers) expect(text).not.toContain(m);
    expect(text).not.toContain("This is a test message.");
  });
});
