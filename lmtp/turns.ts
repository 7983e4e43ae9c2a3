// Whose turn it is to send the final dot to a mailbox (MailboxTurns): one transaction at a time.

import { LmtpFault } from "./faults.ts";
import { waitInLine } from "./timeouts.ts";

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
    return waitInLine(waiting, deadline, (ms) => new LmtpFault("timeout", "body", `no turn to deliver to ${key} within ${ms} ms`));
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
