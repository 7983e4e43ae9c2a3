// Proves the throwaway Dovecot harness works by speaking raw LMTP to it (no relay code involved).
import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import net from "node:net";
import { startDovecot, type DovecotInstance } from "./dovecot.ts";

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

/** Dovecot stores LF line endings and prepends Return-Path + Delivered-To; undo that for comparison. */
function normalise(stored: Uint8Array): string {
  const text = new TextDecoder().decode(stored).replace(/\r\n/g, "\n");
  return text.replace(/^Return-Path: [^\n]*\n/, "").replace(/^Delivered-To: [^\n]*\n/, "");
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
  });
  afterAll(async () => {
    await dv?.dispose();
  });
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
    const text = normalise(stored[0]!);
    expect(text).toBe(msg);
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
      expect(normalise(stored[0]!)).toBe(msg);
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
    expect((await dv.messages(user)).map(normalise)).toEqual(msgs);
  });
});
