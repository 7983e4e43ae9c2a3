// One LMTP connection (RFC 2033), the protocol's state machine: greeting and LHLO when it opens,
// then transactions one after another, each started afresh by RSET or a new LHLO.

import { DotStuffer } from "./dot-stuffer.ts";
import { checkDeliveryId, mailCommand, nonAscii, notSendable, rcptCommand, type LmtpEnvelope, type MessageBody } from "./envelope.ts";
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

/** The replies to the envelope, in order; lock-step leaves out what it did not send. */
interface EnvelopeReplies {
  mail: LmtpReply;
  rcpts: LmtpReply[];
  data: LmtpReply | null;
}

export class LmtpConnection {
  readonly capabilities = new Map<string, string>();
  private readonly lhloName: string;
  /** A transaction has run on this connection, so the next one starts with RSET. */
  private used = false;
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
   * temporary. `deadline` (performance.now() time): the final dot is not sent after it; nor once
   * `signal` has aborted (the client that sent the message is gone: nobody would hear the outcome,
   * and its retry would be a second copy).
   */
  async deliver(envelope: LmtpEnvelope, body: MessageBody, size: number | null, deadline = Infinity, signal?: AbortSignal): Promise<RecipientReply[]> {
    if (this.broken) throw new LmtpFault("closed", "mail", `connection already failed: ${this.broken.message}`);
    // RFC 6531 3.2: without SMTPUTF8 a non-ASCII address must not be sent at all (Dovecot 2.3
    // takes a UTF-8 MAIL FROM and stores "Return-Path: <>"). Refused here for good, with the
    // reason; a non-ASCII sender refuses every recipient, a non-ASCII recipient only itself.
    if (!this.capabilities.has("SMTPUTF8")) {
      if (nonAscii(envelope.from)) return envelope.to.map((recipient) => ({ recipient, ...notSendable(envelope.from, "sender address") }));
      if (envelope.to.some(nonAscii)) {
        const sendable = envelope.to.filter((r) => !nonAscii(r));
        const replies = sendable.length ? await this.transaction({ ...envelope, to: sendable }, body, size, deadline, signal) : [];
        let next = 0;
        return envelope.to.map((recipient) => (nonAscii(recipient) ? { recipient, ...notSendable(recipient, "address") } : replies[next++]!));
      }
    }
    return this.transaction(envelope, body, size, deadline, signal);
  }

  /**
   * RFC 2033 4.2, step by step: the envelope (MAIL FROM, one RCPT TO per recipient, DATA) and its
   * replies; if a recipient was accepted and DATA answered 354, the message data and the final dot;
   * then one reply per accepted recipient.
   */
  private async transaction(envelope: LmtpEnvelope, body: MessageBody, size: number | null, deadline: number, signal: AbortSignal | undefined): Promise<RecipientReply[]> {
    checkDeliveryId(envelope.deliveryId);
    const replies = await this.sendEnvelope(envelope, size, deadline);
    const answers = this.envelopeAnswers(envelope.to, replies);
    // Any 2xx accepts (RFC 5321 4.2.2: 251 and 252 too), and an accepted recipient is sent the message.
    const taken = answers.filter(accepted).map((r) => r.recipient);
    if (taken.length === 0) return answers;
    const dot = await this.sendData(body, deadline);
    // The final dot: in the mailboxes' turn when the delivery is named, never after the deadline,
    // and never for a client that is gone.
    const release = envelope.deliveryId !== undefined ? await this.waitTurn(taken, deadline) : null;
    try {
      this.abortIfLate(deadline, "body");
      this.abortIfGone(signal);
      await this.socket.write(dot, deadline);
      return await this.finalReplies(answers);
    } finally {
      release?.();
    }
  }

  /**
   * Starts the transaction and sends the envelope; returns its replies. A connection used before
   * is reset by RSET, or by the LHLO that names the delivery: a new LHLO resets the transaction as
   * RSET does, and as it may only end a pipelined group (RFC 2920 3.1), it is answered before the
   * envelope goes out.
   */
  private async sendEnvelope(envelope: LmtpEnvelope, size: number | null, deadline: number): Promise<EnvelopeReplies> {
    let rset = this.used ? "RSET\r\n" : "";
    this.used = true;
    if (envelope.deliveryId !== undefined) {
      this.socket.send(`LHLO ${envelope.deliveryId}.${this.lhloName}\r\n`);
      await this.expect2xx("lhlo", deadline);
      rset = "";
    }
    const mail = mailCommand(envelope, size, this.capabilities);
    const rcpts = envelope.to.map(rcptCommand);
    return this.pipelining ? this.pipelinedEnvelope(rset, mail, rcpts, deadline) : this.lockStepEnvelope(rset, mail, rcpts, deadline);
  }

  /** RFC 2920: RSET and the whole envelope in one write, then the replies, which come in order. */
  private async pipelinedEnvelope(rset: string, mail: string, rcpts: string[], deadline: number): Promise<EnvelopeReplies> {
    this.socket.send(rset + mail + rcpts.join("") + "DATA\r\n");
    if (rset) await this.expect2xx("rset", deadline);
    const mailReply = await this.reply("mail", deadline);
    const rcptReplies: LmtpReply[] = [];
    for (let i = 0; i < rcpts.length; i++) rcptReplies.push(await this.reply("rcpt", deadline));
    return { mail: mailReply, rcpts: rcptReplies, data: await this.reply("data", deadline) };
  }

  /**
   * One command at a time, each after the reply to the one before: RCPT only once MAIL is
   * accepted, DATA only once a recipient is, and not after the deadline.
   */
  private async lockStepEnvelope(rset: string, mail: string, rcpts: string[], deadline: number): Promise<EnvelopeReplies> {
    if (rset) {
      this.socket.send(rset);
      await this.expect2xx("rset", deadline);
    }
    const replies: EnvelopeReplies = { mail: await this.command(mail, "mail", deadline), rcpts: [], data: null };
    if (!accepted(replies.mail)) return replies;
    for (const rcpt of rcpts) replies.rcpts.push(await this.command(rcpt, "rcpt", deadline));
    if (!replies.rcpts.some(accepted)) return replies;
    this.abortIfLate(deadline, "data");
    replies.data = await this.command("DATA\r\n", "data", deadline);
    return replies;
  }

  /**
   * Each recipient's answer from the envelope's replies: a refused MAIL is every recipient's
   * answer, otherwise its RCPT reply; a DATA not answered 354 is the answer of every recipient
   * RCPT accepted. The recipients still accepted after this are sent the message.
   */
  private envelopeAnswers(to: string[], { mail, rcpts, data }: EnvelopeReplies): RecipientReply[] {
    // MAIL refused: its reply is every recipient's answer (the RCPT replies are only "need MAIL").
    const answers = accepted(mail) ? to.map((recipient, i) => ({ recipient, ...rcpts[i]! })) : to.map((recipient) => ({ recipient, ...mail }));
    if (!data) return answers; // lock-step sends DATA only when a recipient is accepted
    if (!answers.some(accepted)) {
      // RFC 2920 3.1: a pipelined DATA may be accepted even though MAIL or every RCPT was not. The
      // server then waits for message data and would take our next RSET as part of it; drop the
      // connection rather than guess how it answers a lone "." with no recipients.
      if (data.code === 354) this.close(new LmtpFault("protocol", "data", "LMTP server accepted DATA with no recipients"));
      return answers;
    }
    if (data.code === 354) return answers;
    let refusal = data;
    if (accepted(refusal)) {
      // A 2xx to DATA sent nothing: it must not pass for a delivery, and the server is out of step.
      this.close(new LmtpFault("protocol", "data", `DATA answered ${formatReply(refusal)} instead of 354`));
      refusal = { code: 451, enhanced: "4.5.0", text: `DATA answered ${formatReply(refusal)} instead of 354; the message was not sent` };
    }
    return answers.map((r) => (accepted(r) ? { ...r, ...refusal } : r));
  }

  /**
   * RFC 2033 4.2: after the final dot, one reply for each recipient accepted at RCPT, in order.
   * The server has the whole message now: each reply gets its full limit, and a fault leaves the
   * outcome unknown for every recipient still unanswered (never "not delivered").
   */
  private async finalReplies(answers: RecipientReply[]): Promise<RecipientReply[]> {
    let fault: LmtpFault | null = null;
    const finals: RecipientReply[] = [];
    for (const r of answers) {
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
  private async sendData(body: MessageBody, deadline: number): Promise<Uint8Array> {
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

  /** The client is gone before the final dot: dropped without it, as at the deadline. Nothing was delivered. */
  private abortIfGone(signal: AbortSignal | undefined): void {
    if (!signal?.aborted) return;
    const e = new BodyAborted("the client left before the final dot; the transaction was dropped without it", { cause: signal.reason });
    this.close(e);
    throw e;
  }

  /** Sends one command and reads its reply. */
  private command(line: string, phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    this.socket.send(line);
    return this.reply(phase, deadline);
  }

  private reply(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    return this.socket.read(phase, this.timeouts.command, deadline);
  }

  private async expect2xx(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    const r = await this.reply(phase, deadline);
    if (!accepted(r)) {
      const e = new LmtpFault("protocol", phase, `${phase.toUpperCase()} answered ${formatReply(r)}`);
      this.close(e);
      throw e;
    }
    return r;
  }
}

const UNKNOWN = "outcome unknown: the LMTP server may have stored the message";
