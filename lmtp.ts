// LMTP client (RFC 2033) over Bun sockets, TCP or unix.
//
// One LmtpConnection owns one socket and walks the protocol in order:
//   connect -> greeting (220) -> LHLO (capabilities) -> [RSET or LHLO <id>] MAIL FROM -> RCPT TO x N -> DATA (354)
//   -> message bytes, dot-stuffed, CRLF line ends -> "." -> one reply per accepted recipient.
// Every phase has its own timeout. Any fault (timeout, closed socket, unparseable reply) ends the
// connection: a half-finished LMTP transaction is never reused. LmtpPool keeps a few idle
// connections and reuses them through RSET.
//
// The message body is streamed: one chunk at a time is stuffed and written, and the next chunk is
// read only once the socket has taken the previous one, so a 25 MiB message is never held whole
// and a slow reader on the other side slows us down instead of filling memory.

import type { Socket } from "bun";
import { replyClass } from "./shared/replies.ts";

export type LmtpTarget = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };

/** LMTP_HOST starting with "/" names a unix socket; anything else is a TCP host. */
export function lmtpTarget(host: string, port: number): LmtpTarget {
  return host.startsWith("/") ? { kind: "unix", path: host } : { kind: "tcp", host, port };
}

export function describeTarget(t: LmtpTarget): string {
  return t.kind === "unix" ? `unix:${t.path}` : `${t.host}:${t.port}`;
}

export interface LmtpEnvelope {
  /** Envelope sender; "" is the null sender of bounces (sent as MAIL FROM:<>). */
  from: string;
  to: string[];
  /**
   * Names this message's delivery: the same id on every attempt at the same accepted message,
   * another id for any other message. It goes out as the client name of an LHLO that opens the
   * transaction ("LHLO <id>.<lhloName>"); Dovecot writes that name into the Received header it
   * adds, where a Sieve `duplicate` test finds it (docs/operations.md, "Exactly once"). Letters
   * and digits only (one DNS label), so it is a valid LHLO domain.
   */
  deliveryId?: string;
}

const DELIVERY_ID = /^[0-9a-z]{1,63}$/;

/** One server reply, possibly multi-line. `text` is every line's text (after code and separator) joined by "\n". */
export interface LmtpReply {
  code: number;
  /** RFC 3463 enhanced status code ("5.1.1") when the reply carries one. */
  enhanced: string | null;
  text: string;
}

export interface RecipientReply extends LmtpReply {
  recipient: string;
  /** The reply came after the final dot: whatever it says, the server had the whole message. */
  afterDot?: true;
  /**
   * After the final dot, no answer the server can be held to: no reply in time, the connection
   * lost, "421 closing", or a 3xx. The server may have stored the message. The code is temporary
   * (it is offered again: a duplicate beats a loss) and the text says the outcome is unknown.
   */
  outcomeUnknown?: true;
}

export type LmtpPhase =
  | "connect"
  | "greeting"
  | "lhlo"
  | "rset"
  | "mail"
  | "rcpt"
  | "data"
  | "body"
  | "data-end"
  | "noop"
  | "quit";

export interface LmtpTimeouts {
  connect: number;
  greeting: number;
  /** LHLO, RSET, MAIL, RCPT, DATA, NOOP, QUIT replies. */
  command: number;
  /** Longest wait for the socket to take the next chunk of the message. */
  body: number;
  /** Wait for the replies after the final dot (Dovecot writes and fsyncs here). */
  dataEnd: number;
  /**
   * A whole delivery through the pool up to the final dot: waiting for a free connection, opening
   * one, the envelope and the body. Each wait before the dot is cut short to fit it, so a server
   * (or a body) that is slow at every step still gets an answer to the sender before the Worker
   * gives up (25 s). Once it has passed, the final dot is never sent: the transaction is dropped
   * without it and the server discards the message. Once the dot is sent, the replies get their
   * full dataEnd, whatever is left of this limit: the server may be storing the message by then.
   */
  transaction: number;
}

// Short enough that the host still answers well inside the Worker's 25 s, long enough for a busy disk.
export const DEFAULT_TIMEOUTS: LmtpTimeouts = {
  connect: 5_000,
  greeting: 10_000,
  command: 10_000,
  body: 10_000,
  dataEnd: 15_000,
  transaction: 20_000,
};

/**
 * A fault of the connection itself: the outcome for the message is temporary (retry later).
 * LmtpConnection.deliver() throws one only before the final dot, so it always means "not
 * delivered"; after the dot a fault becomes the unanswered recipients' reply (outcomeUnknown).
 */
export class LmtpFault extends Error {
  constructor(
    readonly kind: "timeout" | "connect" | "closed" | "protocol",
    readonly phase: LmtpPhase,
    message: string,
  ) {
    super(message);
    this.name = "LmtpFault";
  }
}

/** Thrown by the body stream's reader, it means "abort the transaction": no final dot is sent. */
export class BodyAborted extends Error {
  override name = "BodyAborted";
}

// ---------------------------------------------------------------------------------------------
// Replies

const REPLY_LINE = /^([2-5]\d\d)([ -])(.*)$/s;
const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)/;

/**
 * Turns the byte stream from the server into whole replies. Lines end in CRLF (a bare LF is
 * tolerated); continuation lines are "250-..." and the last line "250 ...". A line that is not a
 * reply line, or a continuation whose code changes, is a protocol error.
 */
export class ReplyParser {
  private pending = "";
  private lines: string[] = [];
  private code = 0;
  private readonly decoder = new TextDecoder("utf-8", { fatal: false });

  /** Feed bytes; returns every reply completed by them. Throws LmtpFault("protocol") on garbage. */
  push(chunk: Uint8Array | string): LmtpReply[] {
    this.pending += typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    const replies: LmtpReply[] = [];
    let nl: number;
    while ((nl = this.pending.indexOf("\n")) !== -1) {
      let line = this.pending.slice(0, nl);
      this.pending = this.pending.slice(nl + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      const reply = this.line(line);
      if (reply) replies.push(reply);
    }
    // A reply line is short (RFC 5321: 512 octets); a flood without line ends is not a server.
    if (this.pending.length > 4096) throw new LmtpFault("protocol", "data", "reply line too long");
    return replies;
  }

  private line(line: string): LmtpReply | null {
    const m = REPLY_LINE.exec(line) ?? (/^[2-5]\d\d$/.test(line) ? [line, line, " ", ""] : null);
    if (!m) throw new LmtpFault("protocol", "data", `not an LMTP reply line: ${JSON.stringify(line.slice(0, 80))}`);
    const code = Number(m[1]);
    if (this.lines.length > 0 && code !== this.code) {
      throw new LmtpFault("protocol", "data", `reply code changed inside a multi-line reply (${this.code} then ${code})`);
    }
    this.code = code;
    this.lines.push(m[3] ?? "");
    if (m[2] === "-") return null;
    const lines = this.lines;
    this.lines = [];
    return toReply(code, lines);
  }
}

function toReply(code: number, lines: string[]): LmtpReply {
  // The enhanced code is taken from the first line; its class must agree with the basic code.
  const first = lines[0] ?? "";
  const em = ENHANCED.exec(first);
  const enhanced = em && em[1] === String(code)[0] ? `${em[1]}.${Number(em[2])}.${Number(em[3])}` : null;
  const strip = (l: string) => (enhanced ? l.replace(ENHANCED, "").trimStart() : l);
  return { code, enhanced, text: lines.map(strip).join("\n") };
}

/** "550 5.1.1 <x@y> User doesn't exist" - the reply as one line, for logs and bounce texts. */
export function formatReply(r: LmtpReply): string {
  return [String(r.code), r.enhanced, r.text.replace(/\n/g, " ")].filter(Boolean).join(" ");
}

// ---------------------------------------------------------------------------------------------
// DATA encoding

const LF = 0x0a;
const CR = 0x0d;
const DOT = 0x2e;

/**
 * Encodes message bytes for DATA: a bare LF becomes CRLF, a line starting with "." gets another
 * "." (RFC 5321 4.5.2), and end() closes with CRLF "." CRLF. It keeps two bits of state across
 * chunks (previous byte, start of line) so chunk boundaries change nothing. A chunk that needs no
 * change is passed through as is, without a copy.
 */
export class DotStuffer {
  private prev = LF; // the message starts at the start of a line
  bytesIn = 0;

  push(chunk: Uint8Array): Uint8Array {
    if (chunk.length === 0) return chunk;
    this.bytesIn += chunk.length;
    let extra = 0;
    if (chunk[0] === DOT && this.prev === LF) extra++;
    // An LF at index 0 counts too, for the byte after it: "\n." starting a chunk needs both a CR
    // (unless the previous chunk ended in CR) and a second dot. The count must be exact, the
    // output buffer is sized by it and a typed array drops writes past its end.
    for (let i = chunk.indexOf(LF); i !== -1; i = chunk.indexOf(LF, i + 1)) {
      if ((i === 0 ? this.prev : chunk[i - 1]) !== CR) extra++;
      if (chunk[i + 1] === DOT) extra++;
    }
    if (extra === 0) {
      this.prev = chunk[chunk.length - 1]!;
      return chunk;
    }
    const out = new Uint8Array(chunk.length + extra);
    let o = 0;
    let prev = this.prev;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === LF && prev !== CR) out[o++] = CR;
      else if (b === DOT && prev === LF) out[o++] = DOT;
      out[o++] = b;
      prev = b;
    }
    this.prev = prev;
    return out;
  }

  /** The terminator; a message without a final line end gets one (the protocol needs it). */
  end(): Uint8Array {
    return new TextEncoder().encode(this.prev === LF ? ".\r\n" : "\r\n.\r\n");
  }
}

// ---------------------------------------------------------------------------------------------
// One connection

export interface LmtpConnectionOptions {
  timeouts?: Partial<LmtpTimeouts>;
  /** Name sent in LHLO. */
  lhloName?: string;
  /** Shared by a pool's connections: see MailboxTurns. Without it, no transaction waits its turn. */
  turns?: MailboxTurns;
}

type Waiter = { resolve: (r: LmtpReply) => void; reject: (e: Error) => void };

/** A body is either bytes already in memory or a stream read chunk by chunk. */
export type MessageBody = Uint8Array | ReadableStream<Uint8Array>;

const encoder = new TextEncoder();

export class LmtpConnection {
  readonly capabilities = new Map<string, string>();
  /** Set once the connection can no longer be trusted; the pool drops it. */
  broken: Error | null = null;
  /** A transaction has run on this connection, so the next one starts with RSET. */
  used = false;

  private socket!: Socket<undefined>;
  private readonly parser = new ReplyParser();
  private readonly replies: LmtpReply[] = [];
  private readonly waiters: Waiter[] = [];
  private drainWaiter: (() => void) | null = null;
  private readonly timeouts: LmtpTimeouts;
  private readonly lhloName: string;
  private readonly turns: MailboxTurns | null;

  private constructor(
    readonly target: LmtpTarget,
    opts: LmtpConnectionOptions,
  ) {
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    this.lhloName = opts.lhloName ?? "mail-relay";
    this.turns = opts.turns ?? null;
  }

  /**
   * Connects, reads the greeting and sends LHLO. `deadline` (performance.now() time) is the
   * opening delivery's limit (LmtpTimeouts.transaction); it is an argument, never kept, so later
   * uses of the connection do not inherit it.
   */
  static async open(target: LmtpTarget, opts: LmtpConnectionOptions = {}, deadline = Infinity): Promise<LmtpConnection> {
    const c = new LmtpConnection(target, opts);
    await c.connect(deadline);
    try {
      const greeting = await c.read("greeting", c.timeouts.greeting, deadline);
      if (greeting.code !== 220) throw new LmtpFault("protocol", "greeting", `LMTP greeting was ${formatReply(greeting)}`);
      c.send(`LHLO ${c.lhloName}\r\n`);
      const lhlo = await c.read("lhlo", c.timeouts.command, deadline);
      if (replyClass(lhlo.code) !== "accepted") throw new LmtpFault("protocol", "lhlo", `LHLO answered ${formatReply(lhlo)}`);
      for (const line of lhlo.text.split("\n").slice(1)) {
        const [kw, ...rest] = line.trim().split(/\s+/);
        if (kw) c.capabilities.set(kw.toUpperCase(), rest.join(" "));
      }
      return c;
    } catch (e) {
      c.close(e as Error);
      throw e;
    }
  }

  /**
   * Healthy and in step: no fault, and no reply waiting that nobody asked for (an unsolicited
   * "421 ... closing" from an idle server, or an exchange that went out of step).
   */
  get reusable(): boolean {
    return !this.broken && this.replies.length === 0;
  }

  get pipelining(): boolean {
    return this.capabilities.has("PIPELINING");
  }

  /**
   * Runs one transaction. Returns one reply per recipient, in envelope order: the RCPT reply for
   * a recipient refused there, otherwise the reply after the final dot (or the MAIL/DATA reply
   * that ended the transaction early). A fault after the final dot is the reply of every
   * recipient it left unanswered (outcomeUnknown). Throws LmtpFault when the connection fails
   * before the final dot; nothing was delivered then, and the outcome for every recipient is
   * temporary. `deadline` (performance.now() time): the final dot is not sent after it.
   */
  async deliver(envelope: LmtpEnvelope, body: MessageBody, size: number | null, deadline = Infinity): Promise<RecipientReply[]> {
    if (this.broken) throw new LmtpFault("closed", "mail", `connection already failed: ${this.broken.message}`);
    // RFC 6531 3.2: without SMTPUTF8 a non-ASCII address must not be sent at all (Dovecot 2.3
    // takes a UTF-8 MAIL FROM and stores "Return-Path: <>"). Refused here for good, with the
    // reason; a non-ASCII sender refuses every recipient, a non-ASCII recipient only itself.
    if (!this.capabilities.has("SMTPUTF8")) {
      if (nonAscii(envelope.from)) return envelope.to.map((recipient) => ({ recipient, ...notSendable(envelope.from, "sender address") }));
      if (envelope.to.some(nonAscii)) {
        const sendable = envelope.to.filter((r) => !nonAscii(r));
        const replies = sendable.length ? await this.transaction({ from: envelope.from, to: sendable }, body, size, deadline) : [];
        let next = 0;
        return envelope.to.map((recipient) => (nonAscii(recipient) ? { recipient, ...notSendable(recipient, "address") } : replies[next++]!));
      }
    }
    return this.transaction(envelope, body, size, deadline);
  }

  private async transaction(envelope: LmtpEnvelope, body: MessageBody, size: number | null, deadline: number): Promise<RecipientReply[]> {
    if (envelope.deliveryId !== undefined && !DELIVERY_ID.test(envelope.deliveryId)) {
      throw new Error(`delivery id must be 1-63 letters and digits: ${JSON.stringify(envelope.deliveryId)}`);
    }
    const wasUsed = this.used;
    this.used = true;
    const read = (phase: LmtpPhase) => this.read(phase, this.timeouts.command, deadline);

    let params = "";
    if (size !== null && this.capabilities.has("SIZE")) params += ` SIZE=${size}`;
    if (this.capabilities.has("8BITMIME")) params += " BODY=8BITMIME";
    if ([envelope.from, ...envelope.to].some(nonAscii)) params += " SMTPUTF8"; // offered, or deliver() refused them
    const mail = `MAIL FROM:<${envelope.from}>${params}\r\n`;
    const rcpts = envelope.to.map((r) => `RCPT TO:<${r}>\r\n`);
    let rset = wasUsed ? "RSET\r\n" : "";
    if (envelope.deliveryId !== undefined) {
      // A new LHLO resets the transaction as RSET does. It may only end a pipelined group
      // (RFC 2920 3.1), so its reply comes before the envelope is sent.
      this.send(`LHLO ${envelope.deliveryId}.${this.lhloName}\r\n`);
      await this.expect2xx("lhlo", deadline);
      rset = "";
    }

    let mailReply: LmtpReply;
    const rcptReplies: LmtpReply[] = [];
    let dataReply: LmtpReply | null = null;

    if (this.pipelining) {
      // One write for the whole envelope; replies come back in order (RFC 2920).
      this.send(rset + mail + rcpts.join("") + "DATA\r\n");
      if (rset) await this.expect2xx("rset", deadline);
      mailReply = await read("mail");
      for (let i = 0; i < rcpts.length; i++) rcptReplies.push(await read("rcpt"));
      dataReply = await read("data");
    } else {
      if (rset) {
        this.send(rset);
        await this.expect2xx("rset", deadline);
      }
      this.send(mail);
      mailReply = await read("mail");
      if (accepted(mailReply)) {
        for (const r of rcpts) {
          this.send(r);
          rcptReplies.push(await read("rcpt"));
        }
        if (rcptReplies.some(accepted)) {
          this.abortIfLate(deadline, "data");
          this.send("DATA\r\n");
          dataReply = await read("data");
        }
      }
    }

    // Any 2xx accepts (RFC 5321 4.2.2: 251 and 252 too), and an accepted recipient is sent the message.
    const taken = envelope.to.filter((_, i) => accepted(mailReply) && rcptReplies[i] !== undefined && accepted(rcptReplies[i]!));
    // RFC 2920 3.1: a pipelined DATA may be accepted even though MAIL or every RCPT was not. The
    // server then waits for message data and would take our next RSET as part of it; drop the
    // connection rather than guess how it answers a lone "." with no recipients.
    if (taken.length === 0 && dataReply?.code === 354) {
      this.close(new LmtpFault("protocol", "data", "LMTP server accepted DATA with no recipients"));
    }

    // MAIL refused: its reply is every recipient's answer (the RCPT replies are only "need MAIL").
    if (!accepted(mailReply)) return envelope.to.map((recipient) => ({ recipient, ...mailReply }));

    const result = envelope.to.map((recipient, i) => ({ recipient, ...rcptReplies[i]! }));
    if (taken.length === 0) return result;
    if (!dataReply || dataReply.code !== 354) {
      let reply = dataReply ?? { code: 451, enhanced: "4.5.0", text: "DATA not answered" };
      if (accepted(reply)) {
        // A 2xx to DATA sent nothing: it must not pass for a delivery, and the server is out of step.
        this.close(new LmtpFault("protocol", "data", `DATA answered ${formatReply(reply)} instead of 354`));
        reply = { code: 451, enhanced: "4.5.0", text: `DATA answered ${formatReply(reply)} instead of 354; the message was not sent` };
      }
      return result.map((r) => (accepted(r) ? { ...r, ...reply } : r));
    }

    const dot = await this.writeBody(body, deadline);
    const release = envelope.deliveryId !== undefined ? await this.waitTurn(taken, deadline) : null;
    try {
      this.abortIfLate(deadline, "body");
      await this.write(dot, deadline);
      return await this.finalReplies(result);
    } finally {
      release?.();
    }
  }

  /**
   * RFC 2033 4.2: after the final dot, one reply for each recipient accepted at RCPT, in order.
   * The server has the whole message now: each reply gets its full limit, and a fault leaves the
   * outcome unknown for every recipient still unanswered (never "not delivered").
   */
  private async finalReplies(result: RecipientReply[]): Promise<RecipientReply[]> {
    let fault: LmtpFault | null = null;
    const finals: RecipientReply[] = [];
    for (const r of result) {
      if (!accepted(r)) {
        finals.push(r);
        continue;
      }
      if (!fault) {
        try {
          const reply = await this.read("data-end", this.timeouts.dataEnd, Infinity);
          if (reply.code === 421 || (reply.code >= 300 && reply.code < 400)) {
            // "421 closing" (Dovecot being stopped while it saves): it may have saved the message.
            // A 3xx here says nothing at all, and leaves the exchange out of step.
            finals.push({ recipient: r.recipient, ...reply, text: `${reply.text} (${UNKNOWN})`, afterDot: true, outcomeUnknown: true });
            this.close(new LmtpFault("closed", "data-end", `LMTP server answered ${formatReply(reply)}`));
          } else {
            finals.push({ recipient: r.recipient, ...reply, afterDot: true });
          }
          continue;
        } catch (e) {
          if (!(e instanceof LmtpFault)) throw e;
          fault = e;
        }
      }
      const enhanced = fault.kind === "timeout" ? "4.4.1" : "4.4.2"; // RFC 3463: no answer / bad connection
      finals.push({ recipient: r.recipient, code: 451, enhanced, text: `${fault.message} after the final dot; ${UNKNOWN}`, afterDot: true, outcomeUnknown: true });
    }
    return finals;
  }

  /** The turn to send the final dot to these recipients (see MailboxTurns); no turns, no wait. */
  private async waitTurn(recipients: string[], deadline: number): Promise<(() => void) | null> {
    if (!this.turns) return null;
    try {
      return await this.turns.take(recipients, deadline);
    } catch (e) {
      // Out of time before the dot: the server discards the message, nothing was delivered.
      this.close(e as Error);
      throw e;
    }
  }

  /** Sends the message data; returns the final dot (with a line end before it if needed), not yet sent. */
  private async writeBody(body: MessageBody, deadline: number): Promise<Uint8Array> {
    const stuffer = new DotStuffer();
    this.abortIfLate(deadline, "body");
    if (body instanceof Uint8Array) {
      await this.write(stuffer.push(body), deadline);
    } else {
      // A body that arrives too slowly is dropped at the deadline, not only checked once it ends:
      // the sender hears "not delivered" while it is still waiting for an answer.
      let late: ((e: LmtpFault) => void) | undefined;
      const lateness = new Promise<never>((_, reject) => (late = reject));
      const ms = remaining(deadline);
      const timer = Number.isFinite(ms) ? setTimeout(() => late!(this.abort("body")), ms) : undefined;
      const reader = body.getReader();
      try {
        for (;;) {
          const chunk = reader.read().catch((e: unknown) => {
            // The sender's stream failed (client gone, size limit): drop the connection without
            // the final dot, so the server discards the partial message.
            const err = new BodyAborted(`message stream failed: ${(e as Error).message}`, { cause: e });
            this.close(err);
            throw err;
          });
          const next = await Promise.race([chunk, lateness]);
          if (next.done) break;
          await this.write(stuffer.push(next.value), deadline);
        }
      } finally {
        clearTimeout(timer);
        // A read still pending (the deadline won) is rejected by this, and its chunk stays in the
        // stream for whoever reads it next (the spool).
        reader.releaseLock();
      }
    }
    return stuffer.end();
  }

  async noop(): Promise<LmtpReply> {
    this.send("NOOP\r\n");
    return this.expect2xx("noop", Infinity);
  }

  /** Polite goodbye; never throws. */
  async quit(): Promise<void> {
    if (this.broken) return;
    try {
      this.send("QUIT\r\n");
      await this.read("quit", Math.min(this.timeouts.command, 2_000), Infinity);
    } catch {
      // The server may close first; either way we are done.
    }
    this.close(new Error("closed after QUIT"));
  }

  close(reason: Error = new Error("closed")): void {
    if (!this.broken) this.broken = reason;
    for (const w of this.waiters.splice(0)) w.reject(reason);
    this.drainWaiter?.();
    this.socket?.terminate();
  }

  // --- socket plumbing ------------------------------------------------------------------------

  private async connect(deadline: number): Promise<void> {
    const fail = (e: Error) => this.fail(e instanceof LmtpFault ? e : new LmtpFault("closed", "data", e.message));
    const handlers = {
      data: (_s: Socket<undefined>, chunk: Uint8Array) => {
        try {
          for (const r of this.parser.push(chunk)) this.replies.push(r);
        } catch (e) {
          return fail(e as Error);
        }
        while (this.waiters.length && this.replies.length) this.waiters.shift()!.resolve(this.replies.shift()!);
      },
      drain: () => {
        const w = this.drainWaiter;
        this.drainWaiter = null;
        w?.();
      },
      close: () => this.fail(new LmtpFault("closed", "data", "LMTP server closed the connection")),
      end: () => this.fail(new LmtpFault("closed", "data", "LMTP server closed the connection")),
      error: (_s: Socket<undefined>, e: Error) => fail(e),
    };
    const where = describeTarget(this.target);
    const connecting =
      this.target.kind === "unix"
        ? Bun.connect({ unix: this.target.path, socket: handlers })
        : Bun.connect({ hostname: this.target.host, port: this.target.port, socket: handlers });
    let timer: Timer | undefined;
    const timeout = new Promise<never>((_, reject) => {
      const ms = within(this.timeouts.connect, deadline);
      timer = setTimeout(() => reject(new LmtpFault("timeout", "connect", `LMTP connect to ${where} timed out after ${ms} ms`)), ms);
    });
    try {
      this.socket = await Promise.race([connecting, timeout]);
    } catch (e) {
      // A connect that completes after the timeout must not leak a socket.
      connecting.then((s) => s.terminate(), () => {});
      if (e instanceof LmtpFault) throw e;
      throw new LmtpFault("connect", "connect", `LMTP connect to ${where} failed: ${(e as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Marks the connection broken and wakes everyone waiting on it. */
  private fail(e: Error): void {
    if (this.broken) return;
    this.close(e);
  }

  /**
   * The delivery's limit has passed before the final dot: drop the connection (the server
   * discards a message without its dot), and say so. Nothing was delivered.
   */
  private abort(phase: LmtpPhase): LmtpFault {
    const e = new LmtpFault("timeout", phase, "LMTP delivery time limit reached before the final dot; the transaction was dropped without it");
    this.close(e);
    return e;
  }

  private abortIfLate(deadline: number, phase: LmtpPhase): void {
    if (performance.now() >= deadline) throw this.abort(phase);
  }

  private send(line: string): void {
    // Commands are short; they fit the socket buffer unless the server stopped reading, in which
    // case the next read times out and the connection is dropped.
    const bytes = encoder.encode(line);
    const n = this.socket.write(bytes);
    if (n < bytes.length) void this.write(bytes.subarray(Math.max(n, 0)), Infinity).catch(() => {});
  }

  private async write(bytes: Uint8Array, deadline: number): Promise<void> {
    let off = 0;
    while (off < bytes.length) {
      if (this.broken) throw this.faultFrom(this.broken, "body");
      const n = this.socket.write(bytes.subarray(off));
      if (n < 0) throw new LmtpFault("closed", "body", "LMTP socket closed while writing");
      off += n;
      if (off < bytes.length) await this.waitDrain(deadline);
    }
  }

  private waitDrain(deadline: number): Promise<void> {
    const ms = within(this.timeouts.body, deadline);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new LmtpFault("timeout", "body", `LMTP server did not take message data for ${ms} ms`);
        this.close(e);
        reject(e);
      }, ms);
      this.drainWaiter = () => {
        clearTimeout(timer);
        this.broken ? reject(this.faultFrom(this.broken, "body")) : resolve();
      };
    });
  }

  private read(phase: LmtpPhase, phaseMs: number, deadline: number): Promise<LmtpReply> {
    const queued = this.replies.shift();
    if (queued) return Promise.resolve(queued);
    if (this.broken) return Promise.reject(this.faultFrom(this.broken, phase));
    const ms = within(phaseMs, deadline);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new LmtpFault("timeout", phase, `no LMTP reply to ${phase.toUpperCase()} within ${ms} ms`);
        this.close(e);
        reject(e);
      }, ms);
      this.waiters.push({
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(this.faultFrom(e, phase));
        },
      });
    });
  }

  private async expect2xx(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    const r = await this.read(phase, this.timeouts.command, deadline);
    if (!accepted(r)) {
      const e = new LmtpFault("protocol", phase, `${phase.toUpperCase()} answered ${formatReply(r)}`);
      this.close(e);
      throw e;
    }
    return r;
  }

  /** Re-labels a connection-level error with the phase that was waiting on it. */
  private faultFrom(e: Error, phase: LmtpPhase): Error {
    if (e instanceof LmtpFault) return e.phase === phase || e.kind === "timeout" ? e : new LmtpFault(e.kind, phase, e.message);
    if (e instanceof BodyAborted) return e;
    return new LmtpFault("closed", phase, e.message);
  }
}

const UNKNOWN = "outcome unknown: the LMTP server may have stored the message";

const accepted = (r: { code: number }) => replyClass(r.code) === "accepted";

/** An address that needs SMTPUTF8 (RFC 6531): any character outside ASCII. */
export const nonAscii = (address: string) => /[^\x00-\x7f]/.test(address);

/** RFC 6531 3.7.4.1 / RFC 3463 X.6.7: "non-ASCII addresses not permitted for that sender/recipient". */
function notSendable(address: string, what: string): LmtpReply {
  return { code: 553, enhanced: "5.6.7", text: `<${address}>: non-ASCII ${what}, and the LMTP server does not offer SMTPUTF8` };
}

/** Milliseconds left until a deadline (performance.now() time); Infinity when there is none. */
function remaining(deadline: number): number {
  return Math.max(0, Math.ceil(deadline - performance.now()));
}

/** A phase's own limit, cut to what is left of the delivery's. */
function within(ms: number, deadline: number): number {
  return Math.min(ms, remaining(deadline));
}

// ---------------------------------------------------------------------------------------------
// Turns

/**
 * One final dot at a time per mailbox, for transactions that carry a delivery id. Dovecot's
 * duplicate database (where the Sieve duplicate test keeps ids: ~/.dovecot.lda-dupes) loses ids
 * when two deliveries to one user save at the same time: each rewrites the whole file from what it
 * read before the other's write (Dovecot 2.3.19, seen losing 172 of 200 ids at 16 at once; the same
 * code in Dovecot's main branch). So such a transaction waits for its turn after its message data,
 * before its final dot, and hands the turn on once its replies are in: uploads still run side by
 * side, only Dovecot's saving for one mailbox goes one at a time. Several recipients' turns are
 * taken in sorted order, so two transactions never wait for each other.
 */
export class MailboxTurns {
  /** Mailboxes whose turn is taken, each with the callers waiting for it, first come first. */
  private readonly taken = new Map<string, (() => void)[]>();

  /** Resolves with a release function once every recipient's turn is the caller's; rejects at the deadline. */
  async take(recipients: string[], deadline: number): Promise<() => void> {
    const keys = [...new Set(recipients.map(mailboxKey))].sort();
    const held: string[] = [];
    const release = () => {
      for (const key of held.splice(0)) this.handOn(key);
    };
    try {
      for (const key of keys) {
        await this.takeOne(key, deadline);
        held.push(key);
      }
    } catch (e) {
      release();
      throw e;
    }
    return release;
  }

  private takeOne(key: string, deadline: number): Promise<void> {
    const waiting = this.taken.get(key);
    if (!waiting) {
      this.taken.set(key, []);
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const ms = Math.max(0, Math.ceil(deadline - performance.now()));
      const timer = Number.isFinite(ms)
        ? setTimeout(() => {
            const i = waiting.indexOf(take);
            if (i !== -1) waiting.splice(i, 1);
            reject(new LmtpFault("timeout", "body", `no turn to deliver to ${key} within ${ms} ms`));
          }, ms)
        : undefined;
      const take = () => {
        clearTimeout(timer);
        resolve();
      };
      waiting.push(take);
    });
  }

  /** The next in line gets the turn as it is; with nobody waiting, the mailbox is free. */
  private handOn(key: string): void {
    const next = this.taken.get(key)?.shift();
    if (next) next();
    else this.taken.delete(key);
  }
}

/**
 * Recipients that reach one mailbox share a turn: case does not matter, nor a "+detail" (Dovecot's
 * usual recipient_delimiter). Aliases that the userdb maps to one user are not known here.
 */
function mailboxKey(address: string): string {
  const a = address.toLowerCase();
  const at = a.lastIndexOf("@");
  const local = at === -1 ? a : a.slice(0, at);
  const plus = local.indexOf("+");
  return plus === -1 ? a : local.slice(0, plus) + a.slice(local.length);
}

// ---------------------------------------------------------------------------------------------
// The pool

/** How long a readiness probe's outcome is reused (LmtpPool.check). */
const CHECK_REUSE_MS = 1_000;

type Probe = { result: Promise<string[]>; settledAt: number | null; failed: boolean };

export interface LmtpPoolOptions extends LmtpConnectionOptions {
  /** Most connections open at once; further deliveries wait for one. */
  maxConnections?: number;
  /** Idle connections kept for reuse. */
  maxIdle?: number;
  /** An idle connection older than this is closed with QUIT. */
  idleMs?: number;
}

/**
 * A few LMTP connections for reuse. At most `maxConnections` deliveries run at once (a slot
 * each); the rest wait their turn. A connection goes back to the idle list only after a
 * transaction that ran to its end; any fault drops it. A reused connection may have been closed
 * by the server while idle: if it fails before the server answered LHLO, RSET or MAIL, nothing
 * of the message was sent, so the delivery is tried once more on a fresh connection.
 */
export class LmtpPool {
  private readonly idle: { conn: LmtpConnection; since: number }[] = [];
  private busy = 0;
  private readonly waiting: (() => void)[] = [];
  private readonly maxConnections: number;
  private readonly maxIdle: number;
  private readonly idleMs: number;
  private closed = false;
  private readonly sweeper: Timer;

  private readonly opts: LmtpPoolOptions;

  constructor(
    readonly target: LmtpTarget,
    opts: LmtpPoolOptions = {},
  ) {
    this.opts = { ...opts, turns: opts.turns ?? new MailboxTurns() };
    this.maxConnections = opts.maxConnections ?? 16;
    this.maxIdle = opts.maxIdle ?? 8;
    this.idleMs = opts.idleMs ?? 30_000;
    this.sweeper = setInterval(() => this.sweep(), Math.max(1_000, this.idleMs / 2));
    this.sweeper.unref?.();
  }

  async deliver(envelope: LmtpEnvelope, body: MessageBody, size: number | null): Promise<RecipientReply[]> {
    const deadline = performance.now() + (this.opts.timeouts?.transaction ?? DEFAULT_TIMEOUTS.transaction);
    return this.withConnection(deadline, async (conn, reused) => {
      try {
        return await conn.deliver(envelope, body, size, deadline);
      } catch (e) {
        const stale = reused && e instanceof LmtpFault && e.kind === "closed" && (e.phase === "lhlo" || e.phase === "rset" || e.phase === "mail");
        if (!stale) throw e;
        return this.withFresh(deadline, (fresh) => fresh.deliver(envelope, body, size, deadline));
      }
    });
  }

  /**
   * Readiness: a new connection that greets, answers LHLO and NOOP. Returns the capabilities.
   * Probes must not compete with deliveries: a probe takes no delivery slot, callers at the same
   * time share one probe, and its outcome (either way) is reused for CHECK_REUSE_MS after it, so
   * a flood of /ready calls opens one connection at a time, at most a few a second. A failure is
   * forgotten as soon as a delivery has worked again.
   */
  check(): Promise<string[]> {
    const last = this.lastCheck;
    if (last && (last.settledAt === null || performance.now() - last.settledAt < CHECK_REUSE_MS)) return last.result;
    const probe: Probe = { result: this.probe(), settledAt: null, failed: false };
    probe.result.then(
      () => void (probe.settledAt = performance.now()),
      () => void ((probe.settledAt = performance.now()), (probe.failed = true)),
    );
    this.lastCheck = probe;
    return probe.result;
  }

  private lastCheck: Probe | null = null;

  private async probe(): Promise<string[]> {
    if (this.closed) throw new LmtpFault("closed", "connect", "LMTP pool is shut down");
    const conn = await LmtpConnection.open(this.target, this.opts);
    try {
      await conn.noop();
      return [...conn.capabilities.keys()];
    } finally {
      await conn.quit();
    }
  }

  /** Sends QUIT on every idle connection and refuses new deliveries. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.sweeper);
    await Promise.all(this.idle.splice(0).map(({ conn }) => conn.quit()));
  }

  get stats() {
    return { busy: this.busy, idle: this.idle.length, waiting: this.waiting.length };
  }

  private async withConnection<T>(deadline: number, fn: (conn: LmtpConnection, reused: boolean) => Promise<T>): Promise<T> {
    await this.takeSlot(deadline);
    try {
      let entry = this.idle.pop(); // most recently used first: the likeliest to be alive
      while (entry && !entry.conn.reusable) {
        entry.conn.close(new Error("dropped from the idle list"));
        entry = this.idle.pop();
      }
      const conn = entry?.conn ?? (await LmtpConnection.open(this.target, this.opts, deadline));
      return await this.settle(conn, () => fn(conn, entry !== undefined));
    } finally {
      this.giveSlot();
    }
  }

  private async withFresh<T>(deadline: number, fn: (conn: LmtpConnection) => Promise<T>): Promise<T> {
    const conn = await LmtpConnection.open(this.target, this.opts, deadline);
    return this.settle(conn, () => fn(conn));
  }

  /**
   * Whether the server offered a capability when a connection of this pool last greeted it; null
   * before any has. The host asks it of SMTPUTF8 before it spools a non-ASCII envelope that it
   * could not deliver now: one the server does not take would sit in the spool only to fail.
   */
  offered(capability: string): boolean | null {
    return this.seen ? this.seen.has(capability) : null;
  }

  private seen: ReadonlyMap<string, string> | null = null;

  /** Runs fn on conn; afterwards the connection is kept idle if healthy, otherwise closed. */
  private async settle<T>(conn: LmtpConnection, fn: () => Promise<T>): Promise<T> {
    this.seen = conn.capabilities;
    try {
      return await fn();
    } catch (e) {
      conn.close(e as Error);
      throw e;
    } finally {
      if (!conn.reusable) conn.close(new Error("not reusable"));
      else {
        if (this.lastCheck?.failed) this.lastCheck = null; // LMTP answers again
        if (this.closed || this.idle.length >= this.maxIdle) void conn.quit();
        else this.idle.push({ conn, since: Date.now() });
      }
    }
  }

  private async takeSlot(deadline = Infinity): Promise<void> {
    if (this.closed) throw new LmtpFault("closed", "connect", "LMTP pool is shut down");
    if (this.busy < this.maxConnections) {
      this.busy++;
      return;
    }
    // The slot is handed over as is. A delivery whose time runs out while it waits leaves the
    // queue, so no slot is ever handed to nobody.
    await new Promise<void>((resolve, reject) => {
      const ms = Math.max(0, Math.ceil(deadline - performance.now()));
      const timer = Number.isFinite(ms)
        ? setTimeout(() => {
            const i = this.waiting.indexOf(take);
            if (i !== -1) this.waiting.splice(i, 1);
            reject(new LmtpFault("timeout", "connect", `no LMTP connection free within ${ms} ms (${this.maxConnections} busy)`));
          }, ms)
        : undefined;
      const take = () => {
        clearTimeout(timer);
        resolve();
      };
      this.waiting.push(take);
    });
  }

  private giveSlot(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.busy--;
  }

  private sweep(): void {
    const now = Date.now();
    for (let i = this.idle.length - 1; i >= 0; i--) {
      const e = this.idle[i]!;
      if (!e.conn.reusable || now - e.since > this.idleMs) {
        this.idle.splice(i, 1);
        void e.conn.quit();
      }
    }
  }
}
