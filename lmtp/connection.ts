// One LMTP connection (RFC 2033), the protocol's state machine: greeting and LHLO when it opens,
// then transactions one after another, each started afresh by RSET or a new LHLO.

import { DotStuffer } from "./dot-stuffer.ts";
import { DELIVERY_ID, nonAscii, notSendable, type LmtpEnvelope, type MessageBody } from "./envelope.ts";
import { BodyAborted, LmtpFault, type LmtpPhase } from "./faults.ts";
import { accepted, formatReply, type LmtpReply, type RecipientReply } from "./replies.ts";
import { LmtpSocket } from "./socket.ts";
import type { LmtpTarget } from "./target.ts";
import { DEFAULT_TIMEOUTS, remaining, type LmtpTimeouts } from "./timeouts.ts";
import type { MailboxTurns } from "./turns.ts";

export interface LmtpConnectionOptions {
  timeouts?: Partial<LmtpTimeouts>;
  /** Name sent in LHLO. */
  lhloName?: string;
  /** Shared by a pool's connections: see MailboxTurns. Without it, no transaction waits its turn. */
  turns?: MailboxTurns;
}

export class LmtpConnection {
  readonly capabilities = new Map<string, string>();
  /** A transaction has run on this connection, so the next one starts with RSET. */
  used = false;

  private readonly lhloName: string;
  private readonly turns: MailboxTurns | null;

  private constructor(
    readonly target: LmtpTarget,
    private readonly socket: LmtpSocket,
    private readonly timeouts: LmtpTimeouts,
    opts: LmtpConnectionOptions,
  ) {
    this.lhloName = opts.lhloName ?? "mail-relay";
    this.turns = opts.turns ?? null;
  }

  /**
   * Connects, reads the greeting and sends LHLO. `deadline` (performance.now() time) is the
   * opening delivery's limit (LmtpTimeouts.transaction); it is an argument, never kept, so later
   * uses of the connection do not inherit it.
   */
  static async open(target: LmtpTarget, opts: LmtpConnectionOptions = {}, deadline = Infinity): Promise<LmtpConnection> {
    const timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    const c = new LmtpConnection(target, await LmtpSocket.connect(target, timeouts, deadline), timeouts, opts);
    try {
      const greeting = await c.socket.read("greeting", c.timeouts.greeting, deadline);
      if (greeting.code !== 220) throw new LmtpFault("protocol", "greeting", `LMTP greeting was ${formatReply(greeting)}`);
      c.socket.send(`LHLO ${c.lhloName}\r\n`);
      const lhlo = await c.socket.read("lhlo", c.timeouts.command, deadline);
      if (!accepted(lhlo)) throw new LmtpFault("protocol", "lhlo", `LHLO answered ${formatReply(lhlo)}`);
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
    return !this.broken && this.socket.inStep;
  }

  /** Set once the connection can no longer be trusted; the pool drops it. */
  get broken(): Error | null {
    return this.socket.broken;
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
    const read = (phase: LmtpPhase) => this.socket.read(phase, this.timeouts.command, deadline);

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
      this.socket.send(`LHLO ${envelope.deliveryId}.${this.lhloName}\r\n`);
      await this.expect2xx("lhlo", deadline);
      rset = "";
    }

    let mailReply: LmtpReply;
    const rcptReplies: LmtpReply[] = [];
    let dataReply: LmtpReply | null = null;

    if (this.pipelining) {
      // One write for the whole envelope; replies come back in order (RFC 2920).
      this.socket.send(rset + mail + rcpts.join("") + "DATA\r\n");
      if (rset) await this.expect2xx("rset", deadline);
      mailReply = await read("mail");
      for (let i = 0; i < rcpts.length; i++) rcptReplies.push(await read("rcpt"));
      dataReply = await read("data");
    } else {
      if (rset) {
        this.socket.send(rset);
        await this.expect2xx("rset", deadline);
      }
      this.socket.send(mail);
      mailReply = await read("mail");
      if (accepted(mailReply)) {
        for (const r of rcpts) {
          this.socket.send(r);
          rcptReplies.push(await read("rcpt"));
        }
        if (rcptReplies.some(accepted)) {
          this.abortIfLate(deadline, "data");
          this.socket.send("DATA\r\n");
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
      await this.socket.write(dot, deadline);
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
          const reply = await this.socket.read("data-end", this.timeouts.dataEnd, Infinity);
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
      await this.socket.write(stuffer.push(body), deadline);
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
          await this.socket.write(stuffer.push(next.value), deadline);
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
    this.socket.send("NOOP\r\n");
    return this.expect2xx("noop", Infinity);
  }

  /** Polite goodbye; never throws. */
  async quit(): Promise<void> {
    if (this.broken) return;
    try {
      this.socket.send("QUIT\r\n");
      await this.socket.read("quit", Math.min(this.timeouts.command, 2_000), Infinity);
    } catch {
      // The server may close first; either way we are done.
    }
    this.close(new Error("closed after QUIT"));
  }

  close(reason: Error = new Error("closed")): void {
    this.socket.close(reason);
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

  private async expect2xx(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    const r = await this.socket.read(phase, this.timeouts.command, deadline);
    if (!accepted(r)) {
      const e = new LmtpFault("protocol", phase, `${phase.toUpperCase()} answered ${formatReply(r)}`);
      this.close(e);
      throw e;
    }
    return r;
  }
}

const UNKNOWN = "outcome unknown: the LMTP server may have stored the message";
