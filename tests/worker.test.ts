// The edge's email() in Bun, against the project's real host (startServer) in front of the
// scriptable fake LMTP server, and against a tiny stub host for statuses the real host only gives
// in rare cases. One test per row of the status table of docs/contract.md, from the
// sender's side:
//   accept  -> no setReject, no exception;
//   bounce  -> setReject(reason), no exception;
//   retry   -> an exception, never setReject (a bounce cannot be taken back).

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, spyOn, test, type Mock } from "bun:test";
import type { Server } from "bun";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import type { LogLine } from "../shared/log.ts";
import { startServer, type RunningServer } from "../server.ts";
import { MAX_ENVELOPE_TO_BYTES, headerText } from "../shared/contract.ts";
import worker, { email, type IncomingEmail } from "../worker.ts";
import { startScripted } from "./support/scripted-lmtp.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

// Random per run: finding either in a log line can only mean it was logged.
const KEY = `wkey_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const WRONG_KEY = `wrong_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const MiB = 1024 * 1024;
const USER = "user@kuma8088.com";
const SENDER = "sender@example.org";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let fake: FakeLmtpServer;
let server: RunningServer;
/** A host that answers whatever the current test scripts (handler), and records what it got. */
let stub: Server<undefined>;
let stubHandler: (req: Request) => Response | Promise<Response>;
let stubRequests: { headers: Headers; body: Uint8Array | null }[] = [];
/** Whether the stub reads the request body before answering (a host refusing on Content-Length does not). */
let stubReadsBody = true;

/** The host's access log (startServer's log option) and the Worker's console.log lines. */
const hostLines: LogLine[] = [];
const workerLines: string[] = [];
let consoleSpy: Mock<typeof console.log>;

beforeAll(async () => {
  fake = await startFakeLmtp();
  server = startServer(
    { apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * MiB },
    { log: (l) => void hostLines.push(l) },
  );
  stub = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      stubRequests.push({ headers: req.headers, body: stubReadsBody ? new Uint8Array(await req.arrayBuffer()) : null });
      return stubHandler(req);
    },
  });
  consoleSpy = spyOn(console, "log").mockImplementation((...args: unknown[]) => void workerLines.push(args.map(String).join(" ")));
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  consoleSpy.mockRestore();
  await server.stop();
  await stub.stop(true);
  await fake.close();
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  fake.reset();
  stubRequests = [];
  stubReadsBody = true;
  stubHandler = () => Response.json({ status: "success", message: "stub delivered" });
});

afterEach(() => {
  // Whatever a test did, no line may carry either key (or a prefix of one, as the runbook logged).
  for (const line of [...workerLines, ...hostLines.map((l) => JSON.stringify(l))]) {
    expect(line).not.toContain(KEY.slice(0, 10));
    expect(line).not.toContain(WRONG_KEY.slice(0, 10));
  }
});

// --- the fake ForwardableEmailMessage ---------------------------------------------------------

interface FakeMessage extends IncomingEmail {
  rejects: string[];
  forwards: unknown[];
}

/** ASCII text and byte values into one byte array (8-bit data is always written as bytes). */
function bytes(...parts: (string | number[] | Uint8Array)[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p, "latin1") : Buffer.from(p)))));
}

function rfc822(subject: string, body: (string | number[])[] = ["Hello.\r\n"], extra: string[] = []): Uint8Array {
  const id = `<${crypto.randomUUID()}@example.org>`;
  const head = [`From: <${SENDER}>`, `To: <${USER}>`, `Subject: ${subject}`, `Message-ID: ${id}`, ...extra].join("\r\n");
  return bytes(head, "\r\n\r\n", ...body);
}

/** The message as Cloudflare hands it to email(): raw is a stream of several chunks. */
function incoming(raw: Uint8Array, opts: { from?: string; to?: string; chunk?: number } = {}): FakeMessage {
  const chunk = opts.chunk ?? Math.max(1, Math.ceil(raw.length / 5));
  let at = 0;
  const msg: FakeMessage = {
    from: opts.from ?? SENDER,
    to: opts.to ?? USER,
    headers: new Headers({ "message-id": "<x@example.org>", subject: "test" }),
    raw: new ReadableStream<Uint8Array>({
      pull(controller) {
        if (at >= raw.length) return controller.close();
        controller.enqueue(raw.slice(at, at + chunk));
        at += chunk;
      },
    }),
    rawSize: raw.length,
    rejects: [],
    forwards: [],
    setReject(reason: string) {
      msg.rejects.push(reason);
    },
  };
  (msg as unknown as { forward: (...a: unknown[]) => Promise<void> }).forward = async (...a: unknown[]) => void msg.forwards.push(a);
  return msg;
}

const hostEnv = (extra: Record<string, string> = {}) => ({ API_KEY: KEY, DELL_API_ENDPOINT: `${server.url}/api/v1/inbound-mail`, ...extra });
const stubEnv = (extra: Record<string, string> = {}) => ({ API_KEY: KEY, DELL_API_ENDPOINT: `http://127.0.0.1:${stub.port}/api/v1/inbound-mail`, ...extra });

/** Runs email(); answers the exception (or null) and the Worker's log lines written meanwhile. */
async function run(msg: FakeMessage, env: Record<string, unknown>) {
  const before = workerLines.length;
  const hostBefore = hostLines.length;
  let error: Error | null = null;
  try {
    await email(msg, env);
  } catch (e) {
    error = e as Error;
  }
  const worker = workerLines.slice(before).map((l) => JSON.parse(l) as LogLine);
  const host = hostLines.slice(hostBefore).filter((l) => l.path === "/api/v1/inbound-mail");
  expect(msg.forwards).toEqual([]);
  return { error, worker, host };
}

/** A stub answer in the host's JSON shape. */
const answer = (status: number, message: string, extra: Record<string, unknown> = {}) => () =>
  Response.json({ status: status < 300 ? "success" : "error", message, ...extra }, { status });

// --- accept ---------------------------------------------------------------------------------

describe("accept", () => {
  test("200: delivered over LMTP; no setReject, no exception, the bytes and the envelope arrive", async () => {
    const raw = rfc822("accept");
    const msg = incoming(raw);
    const { error, worker, host } = await run(msg, hostEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual([]);
    expect(fake.received).toHaveLength(1);
    expect(fake.received[0]!.from).toBe(SENDER);
    expect(fake.received[0]!.to).toEqual([USER]);
    expect(fake.received[0]!.data).toEqual(raw);
    expect(host).toHaveLength(1);
    expect(host[0]).toMatchObject({ status: 200, from: SENDER, to: [USER] });
    expect(worker).toHaveLength(1);
    expect(worker[0]).toMatchObject({ outcome: "accept", status: 200, from: SENDER, to: USER, size: raw.length });
  });

  test("202 (queued on the host) is accepted too", async () => {
    stubHandler = () => Response.json({ status: "queued", message: "spooled", recipients: [{ address: USER, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 queued", queued: true }] }, { status: 202 });
    const msg = incoming(rfc822("queued"));
    const { error } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual([]);
    expect(stubRequests).toHaveLength(1);
  });

  test("one X-Request-Id: the Worker's log line, the header the host receives and the host's log line agree", async () => {
    // Real host: its access log's request_id is taken from the Worker's X-Request-Id.
    const { worker, host } = await run(incoming(rfc822("request id")), hostEnv());
    const id = worker[0]!.request_id;
    expect(id).toMatch(UUID);
    expect(host).toHaveLength(1);
    expect(host[0]!.request_id).toBe(id);

    // Stub host: the header itself, as sent.
    const second = await run(incoming(rfc822("request id 2")), stubEnv());
    expect(stubRequests[0]!.headers.get("x-request-id")).toBe(second.worker[0]!.request_id as string);
    expect(second.worker[0]!.request_id).not.toBe(id);
  });

  test("the request carries the key, the envelope and message/rfc822, and the body is the message", async () => {
    const raw = rfc822("headers");
    await run(incoming(raw), stubEnv());
    const { headers, body } = stubRequests[0]!;
    expect(headers.get("x-api-key")).toBe(KEY);
    expect(headers.get("content-type")).toBe("message/rfc822");
    expect(headers.get("x-envelope-from")).toBe(SENDER);
    expect(headers.get("x-envelope-to")).toBe(USER);
    expect(body).toEqual(raw);
  });

  for (const nullSender of ["", "<>"]) {
    test(`null sender (from = ${JSON.stringify(nullSender)}): X-Envelope-From "<>" and MAIL FROM:<>`, async () => {
      await run(incoming(rfc822("bounce"), { from: nullSender }), stubEnv());
      expect(stubRequests[0]!.headers.get("x-envelope-from")).toBe("<>");

      const msg = incoming(rfc822("bounce"), { from: nullSender });
      const { error, host } = await run(msg, hostEnv());
      expect(error).toBeNull();
      expect(msg.rejects).toEqual([]);
      expect(fake.received).toHaveLength(1);
      expect(fake.received[0]!.from).toBe("");
      expect(host[0]).toMatchObject({ status: 200, from: "" });
    });
  }
});

// --- 8-bit bytes --------------------------------------------------------------------------------

describe("8-bit messages arrive byte for byte (CRLF kept)", () => {
  // "日本語のテスト" in Shift_JIS; "café déjà vu" in Latin-1; every byte 0x80-0xFF once.
  const SJIS = [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea, 0x82, 0xcc, 0x83, 0x65, 0x83, 0x58, 0x83, 0x67];
  const LATIN1 = [0x63, 0x61, 0x66, 0xe9, 0x20, 0x64, 0xe9, 0x6a, 0xe0, 0x20, 0x76, 0x75];
  const HIGH = Array.from({ length: 128 }, (_, i) => 0x80 + i);
  const cases: [string, string[], number[]][] = [
    ["Shift_JIS", ["Content-Type: text/plain; charset=Shift_JIS", "Content-Transfer-Encoding: 8bit"], SJIS],
    ["ISO-8859-1", ["Content-Type: text/plain; charset=ISO-8859-1", "Content-Transfer-Encoding: 8bit"], LATIN1],
    ["binary-ish 0x80-0xFF run", ["Content-Type: application/octet-stream", "Content-Transfer-Encoding: 8bit"], HIGH],
  ];
  for (const [name, extra, body] of cases) {
    test(name, async () => {
      const raw = rfc822(name, [body, "\r\n", "line two ", body, "\r\n.leading dot\r\n"], extra);
      // Chunks of 7 bytes split multi-byte characters and CRLF pairs across chunk boundaries.
      const msg = incoming(raw, { chunk: 7 });
      const { error } = await run(msg, hostEnv());
      expect(error).toBeNull();
      expect(msg.rejects).toEqual([]);
      expect(fake.received).toHaveLength(1);
      expect(Buffer.from(fake.received[0]!.data).equals(Buffer.from(raw))).toBe(true);
    });
  }
});

// --- bounce: setReject ----------------------------------------------------------------------

describe("bounce (setReject, no exception)", () => {
  test("422 from LMTP 550 5.1.1 at RCPT: the reason is the LMTP server's own reply", async () => {
    fake.behaviour.rcpt = () => 550;
    const msg = incoming(rfc822("unknown user"), { to: "nobody@kuma8088.com" });
    const { error, worker, host } = await run(msg, hostEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toContain("5.1.1");
    expect(msg.rejects[0]).toContain("<nobody@kuma8088.com> User unknown"); // the fake's text
    expect(msg.rejects[0]).toMatch(/^550 /);
    expect(fake.received).toHaveLength(0);
    expect(host[0]).toMatchObject({ status: 422 });
    expect(worker[0]).toMatchObject({ outcome: "reject", status: 422 });
  });

  test("422 from a 5xx after DATA (mailbox full for good) bounces with that reply", async () => {
    fake.behaviour.afterData = () => 552;
    const msg = incoming(rfc822("full"));
    const { error } = await run(msg, hostEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toContain("5.2.2 Mailbox full");
  });

  test("400 from the host (stub): setReject with the host's message", async () => {
    stubHandler = answer(400, "x-envelope-to: something the host refuses", { error: "invalid_envelope" });
    const msg = incoming(rfc822("400"));
    const { error, worker } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual(["x-envelope-to: something the host refuses"]);
    expect(worker[0]).toMatchObject({ outcome: "reject", status: 400 });
  });

  test("400 for an envelope the shared validation refuses: bounced before anything reaches the host", async () => {
    const msg = incoming(rfc822("bad rcpt"), { to: "two words@kuma8088.com" });
    const { error, host } = await run(msg, hostEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toContain("forbidden character");
    expect(host).toHaveLength(0);
    expect(fake.received).toHaveLength(0);
  });

  test("413 from the host (stub): a 552-style reason", async () => {
    stubHandler = answer(413, "the message is larger than 1000 bytes", { error: "payload_too_large" });
    const msg = incoming(rfc822("413"));
    const { error } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toMatch(/^552 5\.3\.4 /);
    expect(msg.rejects[0]).toContain("larger than 1000 bytes");
  });

  test("413 whose message is the delivery target's own 552 5.3.4 (stub): that reply, one code, not a second one in front", async () => {
    stubHandler = answer(413, "552 5.3.4 Message size exceeds fixed limit", { error: "payload_too_large" });
    const msg = incoming(rfc822("413 with the target's code"));
    const { error, worker } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual(["552 5.3.4 Message size exceeds fixed limit"]);
    expect(worker[0]).toMatchObject({ outcome: "reject", status: 413 });
  });

  test("413 from a real host whose MTA (DELIVER_TO=smtp://) refuses the data with 552 5.3.4: the MTA's reply, one code", async () => {
    const mta = await startScripted("220 mx.test ESMTP\r\n", (line) => {
      if (line.startsWith("EHLO")) return "250-mx.test\r\n250 PIPELINING\r\n";
      if (line === "DATA") return "354 End data with <CR><LF>.<CR><LF>\r\n";
      if (line === ".") return "552 5.3.4 Message size exceeds fixed limit\r\n";
      if (line === "QUIT") return "221 2.0.0 Bye\r\n";
      return "250 2.1.0 Ok\r\n";
    });
    const viaMta = startServer({ apiKeys: [KEY], lmtpHost: "unused", lmtpPort: 2525, deliverTo: { kind: "tcp", host: "127.0.0.1", port: mta.port, protocol: "smtp" }, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * MiB }, { log: () => {} });
    try {
      const msg = incoming(rfc822("too big for the MTA"));
      const { error, worker } = await run(msg, { API_KEY: KEY, DELL_API_ENDPOINT: `${viaMta.url}/api/v1/inbound-mail` });
      expect(error).toBeNull();
      expect(msg.rejects).toEqual(["552 5.3.4 Message size exceeds fixed limit"]);
      expect(worker[0]).toMatchObject({ outcome: "reject", status: 413 });
      expect(mta.messages).toHaveLength(1); // refused after the data, as an MTA over its limit does
    } finally {
      await viaMta.stop();
      await mta.close();
    }
  });

  test("413 answered before the body is read (a large message): still a 552 bounce, not a network error", async () => {
    stubReadsBody = false;
    stubHandler = answer(413, "the message is larger than 1000 bytes", { error: "payload_too_large" });
    const msg = incoming(rfc822("413 early", ["y".repeat(2 * MiB), "\r\n"]), { chunk: 64 * 1024 });
    const { error } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toMatch(/^552 5\.3\.4 .*larger than 1000 bytes/);
  });

  test("413 from a real host with a small MAX_MESSAGE_BYTES: 552, nothing delivered", async () => {
    const lines: LogLine[] = [];
    const small = startServer({ apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 1000 }, { log: (l) => void lines.push(l) });
    try {
      const msg = incoming(rfc822("too big", ["x".repeat(3000), "\r\n"]));
      const { error } = await run(msg, { API_KEY: KEY, DELL_API_ENDPOINT: `${small.url}/api/v1/inbound-mail` });
      expect(error).toBeNull();
      expect(msg.rejects).toHaveLength(1);
      expect(msg.rejects[0]).toMatch(/^552 5\.3\.4 .*larger than 1000 bytes/);
      expect(fake.received).toHaveLength(0);
      expect(lines.find((l) => l.path === "/api/v1/inbound-mail")).toMatchObject({ status: 413 });
    } finally {
      await small.stop();
    }
  });

  test("413 at the edge (the Worker's MAX_MESSAGE_BYTES): 552 and the host is never called", async () => {
    const msg = incoming(rfc822("too big for the edge", ["x".repeat(3000), "\r\n"]));
    const { error, host } = await run(msg, hostEnv({ MAX_MESSAGE_BYTES: "1000" }));
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toMatch(/^552 5\.3\.4 /);
    expect(host).toHaveLength(0);
  });

  test("415 from the host (stub): setReject", async () => {
    stubHandler = answer(415, "Content-Type is wrong", { error: "unsupported_media_type" });
    const msg = incoming(rfc822("415"));
    const { error } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual(["Content-Type is wrong"]);
  });

  test("setReject is awaited: in local workerd it is an RPC call, and an unawaited one lands after email() returned", async () => {
    fake.behaviour.rcpt = () => 550;
    const cases: [FakeMessage, Record<string, string>][] = [
      [incoming(rfc822("rpc"), { to: "nobody@kuma8088.com" }), hostEnv()],
      [incoming(rfc822("rpc allow-list"), { to: "x@elsewhere.example" }), hostEnv({ ALLOWED_RECIPIENTS: "kuma8088.com" })],
    ];
    for (const [msg, env] of cases) {
      const landed: string[] = [];
      msg.setReject = (reason: string) => Bun.sleep(20).then(() => void landed.push(reason));
      const { error } = await run(msg, env);
      expect(error).toBeNull();
      expect(landed).toHaveLength(1);
      expect(landed[0]).toMatch(/^550 5\.1\.1 /);
    }
  });

  test("a reason with line breaks or control characters is flattened to one line", async () => {
    stubHandler = answer(422, "550 5.1.1 <x@y> no such user\r\n250 2.0.0 injected\u0000 line");
    const msg = incoming(rfc822("flatten"));
    const { error } = await run(msg, stubEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toHaveLength(1);
    expect(msg.rejects[0]).toContain("550 5.1.1 <x@y> no such user");
    expect(msg.rejects[0]).not.toMatch(/[\x00-\x1f\x7f]/);
  });
});

// --- retry: an exception ---------------------------------------------------------------------

describe("temporary (throws, never setReject)", () => {
  test("401: the Worker's key is not the host's; the mail waits, it does not bounce", async () => {
    const msg = incoming(rfc822("wrong key"));
    const { error, worker, host } = await run(msg, hostEnv({ API_KEY: WRONG_KEY }));
    expect(error).toBeInstanceOf(Error);
    expect(error!.message).toContain("401");
    expect(msg.rejects).toEqual([]);
    expect(host[0]).toMatchObject({ status: 401 });
    expect(fake.received).toHaveLength(0);
    expect(worker[0]).toMatchObject({ outcome: "retry" });
  });

  for (const status of [403, 404, 429, 500, 502, 503]) {
    test(`${status} from the host (stub)`, async () => {
      stubHandler = answer(status, `stub says ${status}`);
      const msg = incoming(rfc822(String(status)));
      const { error, worker } = await run(msg, stubEnv());
      expect(error).toBeInstanceOf(Error);
      expect(error!.message).toContain(`host answered ${status}: stub says ${status}`);
      expect(msg.rejects).toEqual([]);
      expect(worker[0]).toMatchObject({ outcome: "retry", status: 503 });
    });
  }

  test("a 2xx that is not the host's delivery confirmation (wrong endpoint, a proxy's page) is not an acceptance", async () => {
    const answers: (() => Response)[] = [
      () => new Response("<html>OK</html>", { headers: { "content-type": "text/html" } }),
      () => Response.json({ status: "healthy", timestamp: new Date().toISOString() }), // GET /health's answer
      () => new Response(null, { status: 204 }),
    ];
    for (const a of answers) {
      stubHandler = a;
      const msg = incoming(rfc822("not a confirmation"));
      const { error } = await run(msg, stubEnv());
      expect(error?.message).toMatch(/host answered 20[04] without a delivery confirmation/);
      expect(msg.rejects).toEqual([]);
    }
  });

  describe("a redirect is never followed: the key stays with the host, the mail waits", () => {
    // What a misconfigured Access application or tunnel answers: a login page on another origin.
    let elsewhere: Server<undefined>;
    let elsewhereRequests: { method: string; key: string | null }[] = [];
    beforeAll(() => {
      elsewhere = Bun.serve({
        hostname: "127.0.0.1",
        port: 0,
        async fetch(req) {
          elsewhereRequests.push({ method: req.method, key: req.headers.get("x-api-key") });
          await req.arrayBuffer();
          return Response.json({ status: "success", message: "a login page that says 200" });
        },
      });
    });
    afterAll(() => elsewhere.stop(true));

    for (const status of [301, 302, 303, 307, 308]) {
      test(`${status} to another origin: a temporary failure naming the Location; the other origin sees no request`, async () => {
        elsewhereRequests = [];
        const location = `http://127.0.0.1:${elsewhere.port}/cdn-cgi/access/login?redirect_url=%2F`;
        stubHandler = () => new Response(null, { status, headers: { location } });
        const msg = incoming(rfc822(`redirect ${status}`));
        const { error, worker: lines } = await run(msg, stubEnv());
        expect(error?.message).toContain(`host answered ${status}: a redirect to ${location}, not followed`);
        expect(msg.rejects).toEqual([]);
        expect(lines[0]).toMatchObject({ outcome: "retry", status: 503 });
        expect(stubRequests).toHaveLength(1);
        expect(elsewhereRequests).toEqual([]);

        // A JSON body through the Worker's HTTP face is bytes, which a fetch that follows redirects can replay.
        stubRequests = [];
        const res = await worker.fetch(
          new Request("http://edge/api/v1/inbound-mail", {
            method: "POST",
            headers: { "content-type": "application/json", "x-api-key": KEY },
            body: JSON.stringify({ from: SENDER, to: USER, raw: `Subject: redirect ${status}\r\n\r\nx\r\n` }),
          }),
          stubEnv(),
        );
        expect(res.status).toBe(503);
        expect(((await res.json()) as { message: string }).message).toContain(`a redirect to ${location}, not followed`);
        expect(stubRequests).toHaveLength(1);
        expect(elsewhereRequests).toEqual([]);
      });
    }
  });

  test("502 with an HTML body (a proxy's error page, not the host's JSON)", async () => {
    stubHandler = () => new Response("<html>Bad gateway</html>", { status: 502, headers: { "content-type": "text/html" } });
    const msg = incoming(rfc822("html"));
    const { error } = await run(msg, stubEnv());
    expect(error?.message).toContain("host answered 502");
    expect(msg.rejects).toEqual([]);
  });

  test("LMTP 450 at RCPT -> host 503 -> throws", async () => {
    fake.behaviour.rcpt = () => 450;
    const msg = incoming(rfc822("450"));
    const { error, host } = await run(msg, hostEnv());
    expect(error?.message).toContain("4.2.0 Mailbox temporarily unavailable");
    expect(msg.rejects).toEqual([]);
    expect(host[0]).toMatchObject({ status: 503 });
  });

  test("LMTP 452 after DATA -> host 503 -> throws", async () => {
    fake.behaviour.afterData = () => 452;
    const msg = incoming(rfc822("452"));
    const { error, host } = await run(msg, hostEnv());
    expect(error?.message).toContain("4.2.2 Mailbox full");
    expect(msg.rejects).toEqual([]);
    expect(host[0]).toMatchObject({ status: 503 });
  });

  test("the host unreachable (nothing listens on the port)", async () => {
    const closed = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = closed.port;
    await closed.stop(true);
    const msg = incoming(rfc822("unreachable"));
    const { error } = await run(msg, { API_KEY: KEY, DELL_API_ENDPOINT: `http://127.0.0.1:${port}/api/v1/inbound-mail` });
    expect(error?.message).toContain("host unreachable");
    expect(msg.rejects).toEqual([]);
  });

  test("the host never answers: HOST_TIMEOUT_MS fires, throws, no setReject", async () => {
    stubHandler = () => new Promise<Response>(() => {});
    const msg = incoming(rfc822("timeout"));
    const started = performance.now();
    const { error } = await run(msg, stubEnv({ HOST_TIMEOUT_MS: "1000" }));
    const took = performance.now() - started;
    expect(error?.message).toContain("no answer within 1000 ms");
    expect(msg.rejects).toEqual([]);
    expect(took).toBeGreaterThanOrEqual(900);
    expect(took).toBeLessThan(8_000);
  });
});

// --- configuration --------------------------------------------------------------------------

describe("a bad setting throws, naming it (never a bounce)", () => {
  const cases: [string, Record<string, string>, RegExp][] = [
    ["API_KEY missing", { DELL_API_ENDPOINT: "https://mail-api.example.com/api/v1/inbound-mail" }, /API_KEY is not set/],
    ["API_KEY short", { API_KEY: "short-key", DELL_API_ENDPOINT: "https://mail-api.example.com/api/v1/inbound-mail" }, /API_KEY is shorter than 32/],
    ["DELL_API_ENDPOINT missing", { API_KEY: KEY }, /DELL_API_ENDPOINT is not set/],
    ["DELL_API_ENDPOINT not a URL", { API_KEY: KEY, DELL_API_ENDPOINT: "mail-api.example.com" }, /DELL_API_ENDPOINT must be a URL/],
    ["DELL_API_ENDPOINT http:// to another host", { API_KEY: KEY, DELL_API_ENDPOINT: "http://mail-api.example.com/api/v1/inbound-mail" }, /DELL_API_ENDPOINT must be https:\/\//],
    ["HOST_TIMEOUT_MS not a number", { API_KEY: KEY, DELL_API_ENDPOINT: "https://mail-api.example.com/x", HOST_TIMEOUT_MS: "soon" }, /HOST_TIMEOUT_MS/],
    ["ALLOWED_RECIPIENTS with a bad entry", { API_KEY: KEY, DELL_API_ENDPOINT: "https://mail-api.example.com/x", ALLOWED_RECIPIENTS: "kuma8088.com, not a domain" }, /ALLOWED_RECIPIENTS/],
  ];
  for (const [name, env, pattern] of cases) {
    test(name, async () => {
      const msg = incoming(rfc822(name));
      const { error, host } = await run(msg, env);
      expect(error?.message).toMatch(pattern);
      expect(msg.rejects).toEqual([]);
      expect(host).toHaveLength(0);
    });
  }

  test("http:// is allowed for localhost (the tests and wrangler dev use it)", async () => {
    const msg = incoming(rfc822("localhost"));
    const { error } = await run(msg, { API_KEY: KEY, DELL_API_ENDPOINT: `http://localhost:${server.port}/api/v1/inbound-mail` });
    expect(error).toBeNull();
    expect(fake.received).toHaveLength(1);
  });
});

// --- ALLOWED_RECIPIENTS ------------------------------------------------------------------------

describe("ALLOWED_RECIPIENTS", () => {
  test("off by default: a recipient at any domain goes to the host", async () => {
    const msg = incoming(rfc822("anywhere"), { to: "someone@elsewhere.example" });
    const { error, host } = await run(msg, hostEnv());
    expect(error).toBeNull();
    expect(msg.rejects).toEqual([]);
    expect(host).toHaveLength(1);
    expect(fake.received[0]!.to).toEqual(["someone@elsewhere.example"]);
  });

  test("a domain entry: other domains bounce 550 5.1.1 and the host receives nothing", async () => {
    const env = hostEnv({ ALLOWED_RECIPIENTS: "kuma8088.com" });
    for (const to of ["someone@elsewhere.example", "user@evil-kuma8088.com", "user@kuma8088.com.evil.example"]) {
      const msg = incoming(rfc822("outside"), { to });
      const { error, host, worker } = await run(msg, env);
      expect(error).toBeNull();
      expect(msg.rejects).toHaveLength(1);
      expect(msg.rejects[0]).toMatch(/^550 5\.1\.1 /);
      expect(msg.rejects[0]).toContain(to);
      expect(host).toHaveLength(0);
      expect(worker[0]).toMatchObject({ outcome: "reject" });
    }
    expect(fake.received).toHaveLength(0);

    // Inside the domain (in any case) it is delivered.
    const inside = incoming(rfc822("inside"), { to: "User@KUMA8088.com" });
    const { error } = await run(inside, env);
    expect(error).toBeNull();
    expect(inside.rejects).toEqual([]);
    expect(fake.received).toHaveLength(1);
  });

  test("an exact address entry: only that address of its domain passes", async () => {
    const env = hostEnv({ ALLOWED_RECIPIENTS: "alice@example.test, kuma8088.com" });
    const bob = incoming(rfc822("bob"), { to: "bob@example.test" });
    expect((await run(bob, env)).host).toHaveLength(0);
    expect(bob.rejects[0]).toMatch(/^550 5\.1\.1 <bob@example\.test>/);

    const alice = incoming(rfc822("alice"), { to: "alice@example.test" });
    const { error } = await run(alice, env);
    expect(error).toBeNull();
    expect(alice.rejects).toEqual([]);
    expect(fake.received.map((r) => r.to)).toEqual([["alice@example.test"]]);
  });
});

describe("RECIPIENT_DELIMITER", () => {
  test("user+tag@ passes an allow-list that lists user@; without the setting it bounces as before", async () => {
    const tagged = incoming(rfc822("tagged"), { to: "alice+lists@example.test" });
    expect((await run(tagged, hostEnv({ ALLOWED_RECIPIENTS: "alice@example.test" }))).host).toHaveLength(0);
    expect(tagged.rejects[0]).toMatch(/^550 5\.1\.1 <alice\+lists@example\.test>/);

    const env = hostEnv({ ALLOWED_RECIPIENTS: "alice@example.test", RECIPIENT_DELIMITER: "+" });
    const ok = incoming(rfc822("tagged"), { to: "alice+lists@example.test" });
    const { error } = await run(ok, env);
    expect(error).toBeNull();
    expect(ok.rejects).toEqual([]);
    expect(fake.received.map((r) => r.to)).toEqual([["alice+lists@example.test"]]); // the address as sent goes on
    const other = incoming(rfc822("other"), { to: "mallory+alice@example.test" });
    await run(other, env);
    expect(other.rejects).toHaveLength(1);
  });

  test("a delimiter with @, blanks or commas stops the Worker's configuration naming it", async () => {
    const msg = incoming(rfc822("bad delimiter"));
    const { error } = await run(msg, hostEnv({ RECIPIENT_DELIMITER: "+@" }));
    expect(error?.message).toContain("RECIPIENT_DELIMITER");
    expect(msg.rejects).toEqual([]);
  });
});

// --- logs ---------------------------------------------------------------------------------------

describe("answers that are not the host's own (Bun's HTTP parser, a proxy) never bounce", () => {
  // Bun answers 400 (a header it cannot parse) and 431 (a header block of 16 KiB or more) before
  // the app runs, without a body: no reason to bounce with, and not the host's refusal.
  for (const status of [400, 413, 415, 422, 431]) {
    test(`a bare ${status} without the host's JSON -> throws (the sender retries), no setReject`, async () => {
      stubHandler = () => new Response(null, { status, headers: { connection: "close" } });
      const msg = incoming(rfc822(`bare ${status}`));
      const { error, worker: lines } = await run(msg, stubEnv());
      expect(error?.message).toContain(`host answered ${status}`);
      expect(msg.rejects).toEqual([]);
      expect(lines[0]).toMatchObject({ outcome: "retry" });
    });
  }
});

describe("a non-ASCII envelope (SMTPUTF8 mail) crosses to the host as UTF-8", () => {
  for (const from of ["jürgen@example.org", "用户@例子.广告"]) {
    test(`sender ${from}: the host reads it as sent, and so does LMTP`, async () => {
      const msg = incoming(rfc822("utf-8 envelope"), { from });
      const { error, host } = await run(msg, hostEnv());
      expect(error).toBeNull();
      expect(msg.rejects).toEqual([]);
      expect(host[0]).toMatchObject({ status: 200, from, to: [USER] });
      expect(fake.received[0]!.from).toBe(from);

      // On the wire: the UTF-8 bytes, one header character per byte as Bun hands them over.
      await run(incoming(rfc822("utf-8 envelope, stub"), { from }), stubEnv());
      const sent = stubRequests[0]!.headers.get("x-envelope-from")!;
      expect(Buffer.from(sent, "latin1")).toEqual(Buffer.from(from, "utf8"));
      expect(headerText(sent)).toBe(from);
    });
  }
});

describe(`the Worker's HTTP face refuses recipients over ${MAX_ENVELOPE_TO_BYTES} bytes before sending anything`, () => {
  const post = (to: string[]) =>
    worker.fetch(
      new Request("http://edge/api/v1/inbound-mail", {
        method: "POST",
        headers: { "content-type": "application/json", "x-api-key": KEY },
        body: JSON.stringify({ from: SENDER, to, raw: "Subject: x\r\n\r\nx\r\n" }),
      }),
      stubEnv(),
    );
  /** 41 distinct addresses that take `total` bytes as "a, b". */
  const listOf = (total: number) => {
    const list = Array.from({ length: 41 }, (_, i) => `r${i}`.padEnd(40, "x") + "@" + "d".repeat(152) + ".com");
    list[0] = list[0]!.replace("@", "@" + "d".repeat(total - list.join(", ").length));
    return list;
  };

  test("exactly the limit goes to the host in X-Envelope-To; one byte more is a 400 and the host hears nothing", async () => {
    const ok = await post(listOf(MAX_ENVELOPE_TO_BYTES));
    expect(ok.status).toBe(200);
    expect(stubRequests).toHaveLength(1);
    expect(stubRequests[0]!.headers.get("x-envelope-to")).toHaveLength(MAX_ENVELOPE_TO_BYTES);

    stubRequests = [];
    const over = await post(listOf(MAX_ENVELOPE_TO_BYTES + 1));
    expect(over.status).toBe(400);
    expect(((await over.json()) as { message: string }).message).toContain(`take ${MAX_ENVELOPE_TO_BYTES + 1} bytes as "a, b" (X-Envelope-To)`);
    expect(stubRequests).toEqual([]);
  });
});

test("no log line, the Worker's or the host's, contains the API key (the wrong one included)", () => {
  // afterEach checked every test; this one says so by name and makes sure there was something to check.
  expect(workerLines.length).toBeGreaterThan(20);
  expect(hostLines.length).toBeGreaterThan(10);
  expect(workerLines.every((l) => JSON.parse(l).request_id)).toBe(true);
  const all = [...workerLines, ...hostLines.map((l) => JSON.stringify(l))].join("\n");
  expect(all).not.toContain(KEY);
  expect(all).not.toContain(WRONG_KEY);
  expect(all).not.toContain(KEY.slice(0, 10));
  expect(all).not.toContain(WRONG_KEY.slice(0, 10));
});
