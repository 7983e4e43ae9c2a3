// rspamd's HTTP protocol as the host speaks it (host/spam-scan.ts), against a stand-in that records
// each request and answers what the test says: the request's headers and exact body bytes, the
// verdict read from rspamd's JSON (the shapes rspamd 3.4 writes), and every way a scan can get no
// verdict, each a ScanFailure and never an exception. The real rspamd is in
// tests/integration/spam-filter.test.ts.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { RspamdClient, scanFailed, type ScanRequest, type Verdict } from "../host/spam-scan.ts";
import { freePort } from "../scripts/free-port.ts";
import { streamOf } from "./support/streams.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

interface Seen {
  method: string;
  path: string;
  headers: Headers;
  body: Uint8Array;
}

let server: Server<undefined>;
let seen: Seen[] = [];
let answer: () => Response | Promise<Response> = () => Response.json({ action: "no action", score: 0, required_score: 15, symbols: {} });

beforeAll(() => {
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      seen.push({ method: req.method, path: new URL(req.url).pathname, headers: req.headers, body: new Uint8Array(await req.arrayBuffer()) });
      return answer();
    },
  });
});
afterAll(() => server.stop(true));
beforeEach(() => {
  seen = [];
  answer = () => Response.json({ action: "no action", score: 0, required_score: 15, symbols: {} });
});

const url = () => `http://127.0.0.1:${server.port}`;
const bytes = (s: string) => new Uint8Array(Buffer.from(s, "latin1"));
const request = (over: Partial<ScanRequest> = {}): ScanRequest => ({
  from: "sender@example.org",
  to: ["user@example.test"],
  queueId: "req-1",
  sender: { ip: "203.0.113.5", helo: "mail.example.org" },
  hostname: "mail.example.org",
  body: bytes("Subject: s\r\n\r\nhello\r\n"),
  ...over,
});

async function verdict(req: ScanRequest = request(), client = new RspamdClient(url(), 2_000)): Promise<Verdict> {
  const scan = await client.scan(req);
  if (scanFailed(scan)) throw new Error(`expected a verdict, got: ${scan.failed}`);
  return scan;
}

describe("the request", () => {
  test("POST /checkv2 with the envelope, the queue id and the sending server in rspamd's headers", async () => {
    await verdict(request({ to: ["user@example.test", "other@example.test"] }));
    expect(seen).toHaveLength(1);
    const r = seen[0]!;
    expect({ method: r.method, path: r.path }).toEqual({ method: "POST", path: "/checkv2" });
    expect(r.headers.get("from")).toBe("<sender@example.org>");
    // One Rcpt each; Bun's fetch writes them as one comma-separated line, which rspamd splits.
    expect(r.headers.get("rcpt")).toBe("<user@example.test>, <other@example.test>");
    expect(r.headers.get("queue-id")).toBe("req-1");
    expect(r.headers.get("ip")).toBe("203.0.113.5");
    expect(r.headers.get("helo")).toBe("mail.example.org");
    expect(r.headers.get("hostname")).toBe("mail.example.org");
  });

  test("a trailing slash on the URL is not doubled", async () => {
    await verdict(request(), new RspamdClient(`${url()}/`, 2_000));
    expect(seen[0]!.path).toBe("/checkv2");
  });

  test("the null sender is <>; without a known sending server no IP, Helo or Hostname is sent", async () => {
    await verdict(request({ from: "", sender: null, hostname: null }));
    expect(seen[0]!.headers.get("from")).toBe("<>");
    expect(seen[0]!.headers.has("ip")).toBe(false);
    expect(seen[0]!.headers.has("helo")).toBe(false);
    expect(seen[0]!.headers.has("hostname")).toBe(false);
  });

  test("a UTF-8 address goes out as UTF-8 bytes", async () => {
    await verdict(request({ from: "jürgen@example.org" }));
    const raw = seen[0]!.headers.get("from")!;
    expect(new TextDecoder().decode(Uint8Array.from(raw, (c) => c.charCodeAt(0)))).toBe("<jürgen@example.org>");
  });

  test("the body is the message's bytes, exactly: 8-bit, NUL, bare CR and LF, from a buffer or a stream", async () => {
    const body = new Uint8Array([...bytes("Subject: \x93\xfa\r\n\r\n"), 0, 0x0d, 0x41, 0x0a, 0x2e, 0x0d, 0x0a, 0xff]);
    await verdict(request({ body }));
    await verdict(request({ body: streamOf(body, 3) }));
    expect(Buffer.from(seen[0]!.body).equals(Buffer.from(body))).toBe(true);
    expect(Buffer.from(seen[1]!.body).equals(Buffer.from(body))).toBe(true);
  });
});

describe("the verdict", () => {
  test("action, score, required score, symbols (sorted by name, with their options) and rspamd's SMTP message", async () => {
    answer = () =>
      Response.json({
        is_skipped: false,
        score: 15,
        required_score: 15,
        action: "reject",
        symbols: {
          R_SPF_FAIL: { name: "R_SPF_FAIL", score: 1, metric_score: 1, options: ["-all"] },
          GTUBE: { name: "GTUBE", score: 0, metric_score: 0 },
        },
        messages: { smtp_message: "Gtube pattern" },
        "message-id": "x@example.org",
        time_real: 0.001,
      });
    expect(await verdict()).toEqual({
      action: "reject",
      score: 15,
      required: 15,
      symbols: [
        { name: "GTUBE", score: 0, options: [] },
        { name: "R_SPF_FAIL", score: 1, options: ["-all"] },
      ],
      addHeaders: [],
      smtpMessage: "Gtube pattern",
    });
  });

  test("milter.add_headers in each of its shapes (object, array, plain string), in rspamd's order; remove_headers ignored", async () => {
    answer = () =>
      Response.json({
        action: "add header",
        score: 7,
        required_score: 15,
        symbols: {},
        milter: {
          add_headers: {
            "X-Later": { value: "two", order: 2 },
            "Authentication-Results": { value: "rspamd.test; spf=pass smtp.mailfrom=example.org", order: 0 },
            "X-Many": [
              { value: "a", order: 1 },
              { value: "b", order: 3 },
            ],
            "X-Plain": "p",
          },
          remove_headers: { "X-Spam": 0 },
        },
      });
    expect((await verdict()).addHeaders).toEqual([
      { name: "Authentication-Results", value: "rspamd.test; spf=pass smtp.mailfrom=example.org" },
      { name: "X-Plain", value: "p" },
      { name: "X-Many", value: "a" },
      { name: "X-Later", value: "two" },
      { name: "X-Many", value: "b" },
    ]);
  });

  test("a milter block of an unknown shape loses the fields, not the verdict", async () => {
    answer = () => Response.json({ action: "no action", score: 1, required_score: 15, milter: { add_headers: 42 } });
    expect(await verdict()).toMatchObject({ action: "no action", score: 1, addHeaders: [] });
  });
});

describe("no verdict: a ScanFailure saying why, never an exception", () => {
  const failure = async (client = new RspamdClient(url(), 2_000), req = request()) => {
    const scan = await client.scan(req);
    if (!scanFailed(scan)) throw new Error(`expected a failure, got the verdict ${JSON.stringify(scan)}`);
    return scan.failed;
  };

  test("nothing listens", async () => {
    expect(await failure(new RspamdClient(`http://127.0.0.1:${await freePort()}`, 2_000))).toBeString();
  });

  test("an error status, with what rspamd said", async () => {
    answer = () => Response.json({ error: "Message is too big" }, { status: 413 });
    expect(await failure()).toBe('HTTP 413: {"error":"Message is too big"}');
  });

  test("a reply that is not JSON, or JSON that is not a verdict", async () => {
    answer = () => new Response("<html>proxy error</html>");
    expect(await failure()).toStartWith("the reply is not JSON");
    answer = () => Response.json({ action: "no action" });
    expect(await failure()).toStartWith("the reply is not a verdict");
  });

  test("no answer within the time limit (rspamd silent, or still reading an endless body): the limit ends it and lets the body stream go", async () => {
    answer = () => new Promise<Response>(() => {});
    expect(await failure(new RspamdClient(url(), 300))).toBe("no answer within 300 ms");
    // Headers at once, then half a verdict and nothing more.
    answer = () => new Response(new ReadableStream({ start: (c) => c.enqueue(new TextEncoder().encode('{"action":')) }), { headers: { "content-type": "application/json" } });
    expect(await failure(new RspamdClient(url(), 300))).toBe("no answer within 300 ms");
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      pull: (c) => c.enqueue(bytes("x")),
      cancel: () => void (cancelled = true),
    });
    expect(await failure(new RspamdClient(url(), 300), request({ body }))).toBe("no answer within 300 ms");
    await Bun.sleep(50);
    expect(cancelled).toBe(true);
  });
});
