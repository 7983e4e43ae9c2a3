import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Minimal raw LMTP client: writes bytes, reads whole (possibly multi-line) replies. */
class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  received = 0; // total bytes ever received
  closed = false;
  readonly closedPromise: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.received += chunk.length;
      this.buf = Buffer.concat([this.buf, chunk]);
      this.wake?.();
    });
    socket.on("error", () => {});
    this.closedPromise = new Promise((resolve) =>
      socket.on("close", () => {
        this.closed = true;
        this.wake?.();
        resolve();
      }),
    );
  }

  static connect(target: { port: number; host: string } | { path: string }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = "path" in target ? net.connect(target.path) : net.connect(target.port, target.host);
      socket.once("connect", () => resolve(new RawClient(socket)));
      socket.once("error", reject);
    });
  }

  write(data: string | Uint8Array): void {
    this.socket.write(data);
  }

  /** Next complete reply; its lines without CRLF. Rejects on close or timeout. */
  async reply(timeoutMs = 2000): Promise<string[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines: string[] = [];
      let offset = 0;
      for (;;) {
        const eol = this.buf.indexOf("\r\n", offset);
        if (eol < 0) break;
        const line = this.buf.subarray(offset, eol).toString("latin1");
        offset = eol + 2;
        lines.push(line);
        if (/^\d{3} /.test(line) || /^\d{3}$/.test(line)) {
          this.buf = this.buf.subarray(offset);
          return lines;
        }
      }
      if (this.closed) throw new Error("connection closed");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error("timeout waiting for reply");
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
  }

  /** Reads the greeting and does LHLO; returns the LHLO reply. */
  async hello(): Promise<string[]> {
    expect((await this.reply())[0]).toStartWith("220 ");
    this.write("LHLO client.test\r\n");
    return this.reply();
  }

  /** Sends MAIL, RCPTs and DATA pipelined; returns the last line of each reply. */
  async envelope(from: string, to: string[], params = ""): Promise<string[]> {
    const cmds = [`MAIL FROM:<${from}>${params}`, ...to.map((rcpt) => `RCPT TO:<${rcpt}>`), "DATA"];
    this.write(cmds.map((cmd) => cmd + "\r\n").join(""));
    const replies: string[] = [];
    for (let i = 0; i < cmds.length; i++) {
      const reply = (await this.reply()).at(-1)!;
      replies.push(reply);
      if (i === cmds.length - 1 || reply.startsWith("354")) break;
    }
    return replies;
  }

  close(): void {
    this.socket.destroy();
  }
}

let server: FakeLmtpServer;
const clients: RawClient[] = [];
const target = () => ({ port: server.port, host: server.host });
async function client(): Promise<RawClient> {
  const c = await RawClient.connect(target());
  clients.push(c);
  return c;
}

beforeAll(async () => {
  server = await startFakeLmtp();
}, HOOK_TIMEOUT_MS);
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  server.reset();
});
afterAll(() => server.close());

describe("fake LMTP server", () => {
  test("greets and advertises PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES and SIZE on LHLO", async () => {
    const c = await client();
    const caps = await c.hello();
    expect(caps.at(-1)).toStartWith("250 ");
    const names = caps.slice(1).map((line) => line.slice(4));
    expect(names).toContain("PIPELINING");
    expect(names).toContain("8BITMIME");
    expect(names).toContain("ENHANCEDSTATUSCODES");
    expect(names.some((n) => /^SIZE \d+$/.test(n))).toBe(true);
  });

  test("gives one reply per recipient after the final dot, in RCPT order", async () => {
    server.behaviour.afterData = (address) => (address === "full@example.org" ? 452 : 250);
    const c = await client();
    await c.hello();
    const replies = await c.envelope("sender@example.com", ["ok@example.org", "full@example.org"]);
    expect(replies).toEqual(["250 2.1.0 Accepted", "250 2.1.5 Accepted", "250 2.1.5 Accepted", expect.stringMatching(/^354 /)]);
    c.write("Subject: hi\r\n\r\nbody\r\n.\r\n");
    expect(await c.reply()).toEqual(["250 2.0.0 <ok@example.org> Saved"]);
    expect(await c.reply()).toEqual(["452 4.2.2 Mailbox full"]);
    expect(server.received).toHaveLength(1);
    expect(server.received[0]!.to).toEqual(["ok@example.org"]);
    expect(server.received[0]!.from).toBe("sender@example.com");
  });

  test("answers rejected recipients at RCPT time (550 5.1.1, 450 4.2.0)", async () => {
    server.behaviour.rcpt = (address) => (address.startsWith("nobody") ? 550 : address.startsWith("busy") ? 450 : 250);
    const c = await client();
    await c.hello();
    const replies = await c.envelope("", ["nobody@example.org", "busy@example.org", "ok@example.org"]);
    expect(replies).toEqual([
      "250 2.1.0 Accepted",
      "550 5.1.1 <nobody@example.org> User unknown",
      "450 4.2.0 Mailbox temporarily unavailable",
      "250 2.1.5 Accepted",
      expect.stringMatching(/^354 /),
    ]);
    c.write("x\r\n.\r\n");
    // only the one accepted recipient gets a reply after the dot
    expect(await c.reply()).toEqual(["250 2.0.0 <ok@example.org> Saved"]);
    c.write("NOOP\r\n");
    expect((await c.reply())[0]).toStartWith("250 ");
    expect(server.received[0]!.from).toBe("");
    expect(server.received[0]!.to).toEqual(["ok@example.org"]);
  });

  test("dot-unstuffs to the exact bytes, CRLF and 8-bit bytes kept", async () => {
    const c = await client();
    await c.hello();
    await c.envelope("a@example.com", ["b@example.org"], " BODY=8BITMIME");
    const original = Buffer.concat([
      Buffer.from(".x first line\r\nSubject: dots\r\n\r\n"),
      Buffer.from([0xe9, 0xff, 0x00, 0x0d, 0x0a]),
      Buffer.from(".\r\n..\r\nend.\r\n. \r\n"),
    ]);
    // dot-stuff: every line starting with "." gets one more
    const stuffed = Buffer.from(original.toString("latin1").replace(/^\./gm, ".."), "latin1");
    // split the write so the escape dots cross packet boundaries
    c.write(stuffed.subarray(0, 1));
    await sleep(5);
    c.write(stuffed.subarray(1, 40));
    await sleep(5);
    c.write(Buffer.concat([stuffed.subarray(40), Buffer.from(".\r\n")]));
    expect((await c.reply())[0]).toStartWith("250 ");
    expect(Buffer.from(server.received[0]!.data).equals(original)).toBe(true);
    expect(server.received[0]!.mailParams).toEqual({ BODY: "8BITMIME" });
  });

  test("records exact command lines, including MAIL FROM parameters", async () => {
    const c = await client();
    await c.hello();
    c.write("MAIL FROM:<a@example.com> SIZE=1234 BODY=8BITMIME\r\nRSET\r\nQUIT\r\n");
    expect(await c.reply()).toEqual(["250 2.1.0 Accepted"]);
    expect((await c.reply())[0]).toStartWith("250 ");
    expect((await c.reply())[0]).toStartWith("221 ");
    expect(server.commands).toEqual([
      "LHLO client.test",
      "MAIL FROM:<a@example.com> SIZE=1234 BODY=8BITMIME",
      "RSET",
      "QUIT",
    ]);
  });

  test("counts connections and reset() clears state", async () => {
    const a = await client();
    const b = await client();
    await a.hello();
    await b.hello();
    a.close();
    const c = await client();
    await c.hello();
    expect(server.connections).toBe(3);
    server.behaviour.stall = "rcpt";
    server.reset();
    expect(server.connections).toBe(0);
    expect(server.commands).toEqual([]);
    expect(server.behaviour.stall).toBeNull();
  });

  test('stall "greeting": TCP is accepted but no bytes arrive', async () => {
    server.behaviour.stall = "greeting";
    const c = await client();
    await sleep(300);
    expect(c.received).toBe(0);
    expect(c.closed).toBe(false);
    expect(server.connections).toBe(1);
  });

  test('stall "rcpt": MAIL is answered, RCPT never is', async () => {
    server.behaviour.stall = "rcpt";
    const c = await client();
    await c.hello();
    c.write("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
    expect(await c.reply()).toEqual(["250 2.1.0 Accepted"]);
    await expect(c.reply(200)).rejects.toThrow("timeout");
  });

  test('stall "afterData": the final dot is never answered', async () => {
    server.behaviour.stall = "afterData";
    const c = await client();
    await c.hello();
    await c.envelope("a@example.com", ["b@example.org"]);
    c.write("x\r\n.\r\n");
    await expect(c.reply(200)).rejects.toThrow("timeout");
    expect(server.received).toEqual([]);
  });

  test("dropMidData closes the connection before the final dot is answered", async () => {
    server.behaviour.dropMidData = true;
    const c = await client();
    await c.hello();
    await c.envelope("a@example.com", ["b@example.org"]);
    c.write("Subject: partial\r\n\r\nsome of the body\r\n");
    await Promise.race([c.closedPromise, sleep(1000)]);
    expect(c.closed).toBe(true);
    await expect(c.reply(50)).rejects.toThrow("connection closed");
    expect(server.received).toEqual([]);
  });

  test("slowReader throttles the DATA stream", async () => {
    server.behaviour.slowReader = { bytesPerSecond: 400_000 };
    const c = await client();
    await c.hello();
    await c.envelope("a@example.com", ["b@example.org"]);
    const body = Buffer.alloc(120_000, "a".charCodeAt(0));
    for (let i = 78; i < body.length; i += 80) body.set([0x0d, 0x0a], i);
    const started = Date.now();
    c.write(Buffer.concat([body, Buffer.from("\r\n.\r\n")]));
    expect((await c.reply())[0]).toStartWith("250 ");
    // 120 kB at 400 kB/s takes 300 ms (timers may fire a little early)
    expect(Date.now() - started).toBeGreaterThanOrEqual(280);
    expect(server.received[0]!.data.length).toBe(body.length + 2);
  });
});

describe("fake LMTP server with a Maildir on a unix socket", () => {
  let dir: string;
  let local: FakeLmtpServer;

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "fake-lmtp-"));
    local = await startFakeLmtp({ socketPath: path.join(dir, "lmtp.sock"), maildir: path.join(dir, "Maildir") });
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await local.close();
    await rm(dir, { recursive: true, force: true });
  }, HOOK_TIMEOUT_MS);

  test("writes each delivered message to <maildir>/<address>/new with exact bytes", async () => {
    local.behaviour.afterData = (address) => (address.startsWith("full") ? 552 : 250);
    const c = await RawClient.connect({ path: local.socketPath! });
    try {
      await c.hello();
      await c.envelope("a@example.com", ["user@example.org", "full@example.org"]);
      const message = "Subject: stored\r\n\r\n.leading dot\r\nbye\r\n";
      c.write(message.replace(/^\./gm, "..") + ".\r\n");
      expect(await c.reply()).toEqual(["250 2.0.0 <user@example.org> Saved"]);
      expect(await c.reply()).toEqual(["552 5.2.2 Mailbox full"]);

      const box = path.join(dir, "Maildir", "user@example.org");
      const files = await readdir(path.join(box, "new"));
      expect(files).toHaveLength(1);
      expect(await readFile(path.join(box, "new", files[0]!), "latin1")).toBe(message);
      expect(await readdir(path.join(box, "tmp"))).toEqual([]);
      expect(await readdir(path.join(box, "cur"))).toEqual([]);
      // the rejected recipient gets no mailbox
      expect(await readdir(path.join(dir, "Maildir"))).toEqual(["user@example.org"]);
    } finally {
      c.close();
    }
  });

  test("close() drops open connections without waiting for QUIT", async () => {
    const other = await startFakeLmtp();
    const c = await RawClient.connect({ port: other.port, host: other.host });
    await c.hello();
    const started = Date.now();
    await other.close();
    await Promise.race([c.closedPromise, sleep(1000)]);
    expect(c.closed).toBe(true);
    expect(Date.now() - started).toBeLessThan(1000);
  });
});
