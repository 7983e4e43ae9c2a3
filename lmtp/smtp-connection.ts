// One SMTP connection (RFC 5321), the protocol's state machine: greeting and EHLO when it opens,
// then transactions one after another, each started afresh by RSET. LMTP (RFC 2033) is this
// protocol with its own states where the two differ (lmtp/connection.ts): LHLO instead of EHLO,
// and one reply per recipient after the final dot instead of one for all.

import { DotStuffer } from "./dot-stuffer.ts";
import { mailCommand, nonAscii, notSendable, rcptCommand, sizeLimit, tooLarge, xforwardCommand, type LmtpEnvelope, type MessageBody } from "./envelope.ts";
import { BodyAborted, LmtpFault, type LmtpPhase } from "./faults.ts";
import { accepted, formatReply, type LmtpReply, type RecipientReply } from "./replies.ts";
import { LmtpSocket } from "./socket.ts";
import type { LmtpTarget } from "./target.ts";
import { DEFAULT_TIMEOUTS, remaining, type LmtpTimeouts } from "./timeouts.ts";
import type { MailboxTurns } from "./turns.ts";

export interface LmtpConnectionOptions {
  timeouts?: Partial<LmtpTimeouts>;
  /** Name sent in LHLO or EHLO. */
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

export class SmtpConnection {
  readonly capabilities = new Map<string, string>();
  /** The server's 220 greeting and its answer to EHLO/HELO (LHLO for LMTP), as they came (the doctor shows them). */
  greeting: LmtpReply | null = null;
  helloReply: LmtpReply | null = null;
  protected readonly lhloName: string;
  /** A transaction has run on this connection, so the next one starts with RSET. */
  protected used = false;
  /** "SMTP" or "LMTP", for what the server is called in faults and replies. */
  protected readonly protocol: string = "SMTP";

  protected constructor(
    readonly target: LmtpTarget,
    protected readonly socket: LmtpSocket,
    protected readonly timeouts: LmtpTimeouts,
    opts: LmtpConnectionOptions,
  ) {
    this.lhloName = opts.lhloName ?? "mail-relay";
  }

  /**
   * Connects, reads the greeting and says hello (EHLO). `deadline` (performance.now() time) is the
   * opening delivery's limit (LmtpTimeouts.transaction); it is an argument, never kept, so later
   * uses of the connection do not inherit it.
   */
  static async open(target: LmtpTarget, opts: LmtpConnectionOptions = {}, deadline = Infinity): Promise<SmtpConnection> {
    const timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    return new SmtpConnection(target, await LmtpSocket.connect(target, timeouts, deadline), timeouts, opts).start(deadline);
  }

  /** The greeting (220), then hello; on any fault the connection is closed. */
  protected async start(deadline: number): Promise<this> {
    try {
      const greeting = await this.socket.read("greeting", this.timeouts.greeting, deadline);
      if (greeting.code !== 220) throw new LmtpFault("protocol", "greeting", `${this.protocol} greeting was ${formatReply(greeting)}`);
      this.greeting = greeting;
      await this.hello(deadline);
      return this;
    } catch (e) {
      this.close(e as Error);
      throw e;
    }
  }

  /**
   * RFC 5321 4.1.1.1: EHLO, and the extensions it lists; a server that does not know EHLO (5xx)
   * is greeted with HELO and offers none.
   */
  protected async hello(deadline: number): Promise<void> {
    this.socket.send(`EHLO ${this.lhloName}\r\n`);
    const ehlo = await this.reply("ehlo", deadline);
    if (accepted(ehlo)) {
      this.helloReply = ehlo;
      return this.learnCapabilities(ehlo);
    }
    if (ehlo.code < 500) throw new LmtpFault("protocol", "ehlo", `EHLO answered ${formatReply(ehlo)}`);
    this.socket.send(`HELO ${this.lhloName}\r\n`);
    const helo = await this.reply("helo", deadline);
    if (!accepted(helo)) throw new LmtpFault("protocol", "helo", `HELO answered ${formatReply(helo)}`);
    this.helloReply = helo;
  }

  /** The extensions of an EHLO or LHLO reply: every line after the first, keyword and parameters. */
  protected learnCapabilities(reply: LmtpReply): void {
    for (const line of reply.text.split("\n").slice(1)) {
      const [kw, ...rest] = line.trim().split(/\s+/);
      if (kw) this.capabilities.set(kw.toUpperCase(), rest.join(" "));
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
    // RFC 1870: a message known to be larger than the server's SIZE is not offered (the server
    // would refuse it at MAIL, or after the whole upload).
    const limit = sizeLimit(this.capabilities);
    if (size !== null && limit !== null && size > limit) return envelope.to.map((recipient) => ({ recipient, ...tooLarge(size, limit) }));
    // RFC 6531 3.2: without SMTPUTF8 a non-ASCII address must not be sent at all (Dovecot 2.3
    // takes a UTF-8 MAIL FROM and stores "Return-Path: <>"). Refused here for good, with the
    // reason; a non-ASCII sender refuses every recipient, a non-ASCII recipient only itself.
    if (!this.capabilities.has("SMTPUTF8")) {
      if (nonAscii(envelope.from)) return envelope.to.map((recipient) => ({ recipient, ...notSendable(envelope.from, "sender address", this.protocol) }));
      if (envelope.to.some(nonAscii)) {
        const sendable = envelope.to.filter((r) => !nonAscii(r));
        const replies = sendable.length ? await this.transaction({ ...envelope, to: sendable }, body, size, deadline, signal) : [];
        let next = 0;
        return envelope.to.map((recipient) => (nonAscii(recipient) ? { recipient, ...notSendable(recipient, "address", this.protocol) } : replies[next++]!));
      }
    }
    return this.transaction(envelope, body, size, deadline, signal);
  }

  /**
   * One transaction, step by step (RFC 5321 3.3, RFC 2033 4.2): the envelope (MAIL FROM, one RCPT
   * TO per recipient, DATA) and its replies; if a recipient was accepted and DATA answered 354, the
   * message data and the final dot; then the reply (SMTP) or replies (LMTP) to it.
   */
  private async transaction(envelope: LmtpEnvelope, body: MessageBody, size: number | null, deadline: number, signal: AbortSignal | undefined): Promise<RecipientReply[]> {
    const replies = await this.sendEnvelope(envelope, size, deadline);
    const answers = this.envelopeAnswers(envelope.to, replies);
    // Any 2xx accepts (RFC 5321 4.2.2: 251 and 252 too), and an accepted recipient is sent the message.
    const taken = answers.filter(accepted).map((r) => r.recipient);
    if (taken.length === 0) return answers;
    const dot = await this.sendData(body, deadline);
    const release = await this.beforeDot(envelope, taken, deadline);
    try {
      // The final dot: never after the deadline, and never for a client that is gone.
      this.abortIfLate(deadline, "body");
      this.abortIfGone(signal);
      await this.socket.write(dot, deadline);
      return await this.finalReplies(answers);
    } finally {
      release?.();
    }
  }

  /** What waits after the message data, before the final dot; SMTP waits for nothing (see LmtpConnection). */
  protected async beforeDot(_envelope: LmtpEnvelope, _recipients: string[], _deadline: number): Promise<(() => void) | null> {
    return null;
  }

  /**
   * What starts a transaction: RSET on a connection used before (returned, to go out with the
   * envelope). LMTP may start it with an LHLO instead (LmtpConnection).
   */
  protected async reset(_envelope: LmtpEnvelope, _deadline: number): Promise<string> {
    const rset = this.used ? "RSET\r\n" : "";
    this.used = true;
    return rset;
  }

  /**
   * Starts the transaction and sends the envelope; returns its replies. XFORWARD goes before MAIL
   * (never inside a transaction) when the server offers it and the sending server is known; a
   * refusal of it changes nothing (the message goes on without it).
   */
  private async sendEnvelope(envelope: LmtpEnvelope, size: number | null, deadline: number): Promise<EnvelopeReplies> {
    const rset = await this.reset(envelope, deadline);
    const offered = this.capabilities.get("XFORWARD");
    const xforward = offered !== undefined && envelope.client ? xforwardCommand(envelope.client, offered) : "";
    const mail = mailCommand(envelope, size, this.capabilities);
    const rcpts = envelope.to.map((r) => rcptCommand(r, envelope.orcpt?.get(r)));
    return this.pipelining ? this.pipelinedEnvelope(rset, xforward, mail, rcpts, deadline) : this.lockStepEnvelope(rset, xforward, mail, rcpts, deadline);
  }

  /** RFC 2920: RSET, XFORWARD and the whole envelope in one write, then the replies, which come in order. */
  private async pipelinedEnvelope(rset: string, xforward: string, mail: string, rcpts: string[], deadline: number): Promise<EnvelopeReplies> {
    this.socket.send(rset + xforward + mail + rcpts.join("") + "DATA\r\n");
    if (rset) await this.expect2xx("rset", deadline);
    if (xforward) await this.reply("xforward", deadline);
    const mailReply = await this.reply("mail", deadline);
    const rcptReplies: LmtpReply[] = [];
    for (let i = 0; i < rcpts.length; i++) rcptReplies.push(await this.reply("rcpt", deadline));
    return { mail: mailReply, rcpts: rcptReplies, data: await this.reply("data", deadline) };
  }

  /**
   * One command at a time, each after the reply to the one before: RCPT only once MAIL is
   * accepted, DATA only once a recipient is, and not after the deadline.
   */
  private async lockStepEnvelope(rset: string, xforward: string, mail: string, rcpts: string[], deadline: number): Promise<EnvelopeReplies> {
    if (rset) {
      this.socket.send(rset);
      await this.expect2xx("rset", deadline);
    }
    if (xforward) await this.command(xforward, "xforward", deadline);
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
      if (data.code === 354) this.close(new LmtpFault("protocol", "data", `${this.protocol} server accepted DATA with no recipients`));
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
   * RFC 5321 4.1.1.4: after the final dot, ONE reply for every recipient accepted at RCPT. A 250
   * means the server took responsibility for the message (an MTA has its own queue). The server
   * has the whole message now: the reply gets its full limit, and a fault, a "421 closing" or a
   * 3xx leaves the outcome unknown (never "not delivered").
   */
  protected async finalReplies(answers: RecipientReply[]): Promise<RecipientReply[]> {
    const reply = await this.finalReply();
    return answers.map((r) => (accepted(r) ? { recipient: r.recipient, ...reply } : r));
  }

  /** One reply after the final dot, as an answer: unknown outcome on a fault, 421 or 3xx. */
  protected async finalReply(): Promise<LmtpReply & { afterDot: true; outcomeUnknown?: true }> {
    let reply: LmtpReply;
    try {
      reply = await this.socket.read("data-end", this.timeouts.dataEnd, Infinity);
    } catch (e) {
      if (!(e instanceof LmtpFault)) throw e;
      const enhanced = e.kind === "timeout" ? "4.4.1" : "4.4.2"; // RFC 3463: no answer / bad connection
      return { code: 451, enhanced, text: `${e.message} after the final dot; ${this.unknown}`, afterDot: true, outcomeUnknown: true };
    }
    if (reply.code === 421 || (reply.code >= 300 && reply.code < 400)) {
      // "421 closing" (the server being stopped while it saves): it may have saved the message.
      // A 3xx here says nothing at all, and leaves the exchange out of step.
      this.close(new LmtpFault("closed", "data-end", `${this.protocol} server answered ${formatReply(reply)}`));
      return { ...reply, text: `${reply.text} (${this.unknown})`, afterDot: true, outcomeUnknown: true };
    }
    return { ...reply, afterDot: true };
  }

  private get unknown(): string {
    return `outcome unknown: the ${this.protocol} server may have ${this.protocol === "LMTP" ? "stored" : "accepted"} the message`;
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

  /**
   * Whether the server would take mail for `address`, without sending any: MAIL FROM:<> and RCPT
   * TO, then RSET (RFC 5321 4.1.1.5), lock-step. Returns the RCPT reply (the MAIL reply when MAIL
   * was refused). For a start-up or doctor's check, e.g. of postmaster@ (RFC 5321 4.5.1).
   */
  async probeRecipient(address: string, deadline = Infinity): Promise<LmtpReply> {
    // Called between transactions (a finished one allows a new MAIL); RSET ends this one, and
    // the next transaction starts with RSET all the same.
    this.used = true;
    const mail = await this.command("MAIL FROM:<>\r\n", "mail", deadline);
    const answer = accepted(mail) ? await this.command(rcptCommand(address), "rcpt", deadline) : mail;
    this.socket.send("RSET\r\n");
    await this.expect2xx("rset", deadline);
    return answer;
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
  protected abort(phase: LmtpPhase): LmtpFault {
    const e = new LmtpFault("timeout", phase, `${this.protocol} delivery time limit reached before the final dot; the transaction was dropped without it`);
    this.close(e);
    return e;
  }

  private abortIfGone(signal: AbortSignal | undefined): void {
    if (!signal?.aborted) return;
    const e = new BodyAborted("the client left before the final dot; the transaction was dropped without it", { cause: signal.reason });
    this.close(e);
    throw e;
  }

  protected abortIfLate(deadline: number, phase: LmtpPhase): void {
    if (performance.now() >= deadline) throw this.abort(phase);
  }

  /** Sends one command and reads its reply. */
  protected command(line: string, phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    this.socket.send(line);
    return this.reply(phase, deadline);
  }

  protected reply(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    return this.socket.read(phase, this.timeouts.command, deadline);
  }

  protected async expect2xx(phase: LmtpPhase, deadline: number): Promise<LmtpReply> {
    const r = await this.reply(phase, deadline);
    if (!accepted(r)) {
      const e = new LmtpFault("protocol", phase, `${phase.toUpperCase()} answered ${formatReply(r)}`);
      this.close(e);
      throw e;
    }
    return r;
  }
}

