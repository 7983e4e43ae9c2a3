// One LMTP connection (RFC 2033): SMTP's state machine (smtp-connection.ts) with LMTP's own states
// where the two differ: LHLO instead of EHLO; a transaction may start with an LHLO that names the
// delivery (instead of RSET), whose final dot then waits for its mailboxes' turn; and after the
// final dot, one reply per accepted recipient instead of one for all.

import { checkDeliveryId, type LmtpEnvelope } from "./envelope.ts";
import { LmtpFault } from "./faults.ts";
import { accepted, formatReply, type RecipientReply } from "./replies.ts";
import { SmtpConnection, type LmtpConnectionOptions } from "./smtp-connection.ts";
import { LmtpSocket } from "./socket.ts";
import { protocolOf, type LmtpTarget } from "./target.ts";
import { DEFAULT_TIMEOUTS, type LmtpTimeouts } from "./timeouts.ts";
import type { MailboxTurns } from "./turns.ts";

export type { LmtpConnectionOptions } from "./smtp-connection.ts";

export class LmtpConnection extends SmtpConnection {
  protected override readonly protocol = "LMTP";
  private readonly turns: MailboxTurns | null;

  protected constructor(target: LmtpTarget, socket: LmtpSocket, timeouts: LmtpTimeouts, opts: LmtpConnectionOptions) {
    super(target, socket, timeouts, opts);
    this.turns = opts.turns ?? null;
  }

  /** Connects, reads the greeting and sends LHLO; see SmtpConnection.open. */
  static override async open(target: LmtpTarget, opts: LmtpConnectionOptions = {}, deadline = Infinity): Promise<LmtpConnection> {
    const timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    return new LmtpConnection(target, await LmtpSocket.connect(target, timeouts, deadline), timeouts, opts).start(deadline);
  }

  /** RFC 2033 4.1: LHLO, and the extensions it lists. */
  protected override async hello(deadline: number): Promise<void> {
    this.socket.send(`LHLO ${this.lhloName}\r\n`);
    const lhlo = await this.reply("lhlo", deadline);
    if (!accepted(lhlo)) throw new LmtpFault("protocol", "lhlo", `LHLO answered ${formatReply(lhlo)}`);
    this.helloReply = lhlo;
    this.learnCapabilities(lhlo);
  }

  /**
   * A delivery that is named starts with "LHLO <id>.<name>" instead of RSET: a new LHLO resets the
   * transaction as RSET does, and as it may only end a pipelined group (RFC 2920 3.1), it is
   * answered before the envelope goes out. See LmtpEnvelope.deliveryId.
   */
  protected override async reset(envelope: LmtpEnvelope, deadline: number): Promise<string> {
    checkDeliveryId(envelope.deliveryId);
    if (envelope.deliveryId === undefined) return super.reset(envelope, deadline);
    this.used = true;
    this.socket.send(`LHLO ${envelope.deliveryId}.${this.lhloName}\r\n`);
    await this.expect2xx("lhlo", deadline);
    return "";
  }

  /** The final dot of a named delivery waits for its mailboxes' turn (see MailboxTurns). */
  protected override async beforeDot(envelope: LmtpEnvelope, recipients: string[], deadline: number): Promise<(() => void) | null> {
    if (envelope.deliveryId === undefined || !this.turns) return null;
    try {
      return await this.turns.take(recipients, deadline);
    } catch (e) {
      // Out of time before the dot: the server discards the message, nothing was delivered.
      this.close(e as Error);
      throw e;
    }
  }

  /**
   * RFC 2033 4.2: after the final dot, one reply for each recipient accepted at RCPT, in order.
   * Each reply gets its full limit; a fault, a "421 closing" or a 3xx leaves the outcome unknown
   * for every recipient still unanswered (never "not delivered").
   */
  protected override async finalReplies(answers: RecipientReply[]): Promise<RecipientReply[]> {
    const finals: RecipientReply[] = [];
    // Once the connection failed, every read fails at once with the same fault.
    for (const r of answers) finals.push(accepted(r) ? { recipient: r.recipient, ...(await this.finalReply()) } : r);
    return finals;
  }
}

/** Opens a connection that speaks the target's protocol. */
export function openConnection(target: LmtpTarget, opts: LmtpConnectionOptions = {}, deadline = Infinity): Promise<SmtpConnection> {
  return protocolOf(target) === "smtp" ? SmtpConnection.open(target, opts, deadline) : LmtpConnection.open(target, opts, deadline);
}
