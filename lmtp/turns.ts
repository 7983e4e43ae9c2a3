// How many transactions may be at one mailbox at once (MailboxTurns): one at a time for the final
// dot of a named delivery, a share of the pool's connections for a whole delivery.

import { mailboxKey } from "../shared/contract.ts";
import { LmtpFault } from "./faults.ts";
import { waitInLine } from "./timeouts.ts";

/**
 * At most `each` holders per mailbox; the rest wait in line, first come first. Several recipients'
 * places are taken in sorted order, so two callers never wait for each other.
 *
 * With `each` = 1 (the default) it gives the turn to send the final dot, for transactions that
 * carry a delivery id. Dovecot's duplicate database (where the Sieve duplicate test keeps ids:
 * ~/.dovecot.lda-dupes) loses ids when two deliveries to one user save at the same time: each
 * rewrites the whole file from what it read before the other's write (Dovecot 2.3.19, seen losing
 * 172 of 200 ids at 16 at once; the same code in Dovecot's main branch). So such a transaction
 * waits for its turn after its message data, before its final dot, and hands the turn on once its
 * replies are in: uploads still run side by side, only Dovecot's saving for one mailbox goes one
 * at a time.
 *
 * With a larger `each` it is a mailbox's share of the pool's connections (LmtpPool): deliveries
 * that hang in one mailbox's save (a slow disk, a locked Maildir, a full quota check) hold at most
 * that many, and the others stay free for everyone else's mail.
 */
export class MailboxTurns {
  /** Mailboxes held: by how many, and who waits for a place, first come first. */
  private readonly held = new Map<string, { holders: number; waiting: (() => void)[] }>();

  constructor(
    private readonly each = 1,
    private readonly late: (mailbox: string, ms: number) => Error = (mailbox, ms) => new LmtpFault("timeout", "body", `no turn to deliver to ${mailbox} within ${ms} ms`),
  ) {
    if (!(Number.isInteger(each) && each >= 1)) throw new Error(`MailboxTurns: each must be a whole number of at least 1, not ${each}`);
  }

  /**
   * Every recipient's place if each is free now, with no waiting (and no turn of the event loop,
   * so that a caller that finds them free goes on at once); else null, and nothing is taken.
   */
  takeNow(recipients: string[]): (() => void) | null {
    const keys = [...new Set(recipients.map(placeKey))];
    if (!keys.every((key) => (this.held.get(key)?.holders ?? 0) < this.each)) return null;
    for (const key of keys) {
      const place = this.held.get(key);
      if (place) place.holders++;
      else this.held.set(key, { holders: 1, waiting: [] });
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const key of keys) this.handOn(key);
    };
  }

  /** Resolves with a release function once the caller holds a place at every recipient's mailbox; rejects at the deadline. */
  async take(recipients: string[], deadline: number): Promise<() => void> {
    const keys = [...new Set(recipients.map(placeKey))].sort();
    const taken: string[] = [];
    const release = () => {
      for (const key of taken.splice(0)) this.handOn(key);
    };
    try {
      for (const key of keys) {
        await this.takeOne(key, deadline);
        taken.push(key);
      }
    } catch (e) {
      release();
      throw e;
    }
    return release;
  }

  private takeOne(key: string, deadline: number): Promise<void> {
    const place = this.held.get(key);
    if (!place) {
      this.held.set(key, { holders: 1, waiting: [] });
      return Promise.resolve();
    }
    if (place.holders < this.each) {
      place.holders++;
      return Promise.resolve();
    }
    return waitInLine(place.waiting, deadline, (ms) => this.late(key, ms));
  }

  /** The next in line gets the place as it is; with nobody waiting, one place more is free. */
  private handOn(key: string): void {
    const place = this.held.get(key)!;
    const next = place.waiting.shift();
    if (next) next();
    else if (--place.holders === 0) this.held.delete(key);
  }
}

/**
 * Recipients that reach one mailbox share its places: the mailbox as Dovecot finds it (mailboxKey:
 * ASCII letters in any case), with or without a "+detail" (Dovecot's usual recipient_delimiter).
 * Aliases that the userdb maps to one user are not known here.
 */
function placeKey(address: string): string {
  const a = mailboxKey(address);
  const at = a.lastIndexOf("@");
  const local = at === -1 ? a : a.slice(0, at);
  const plus = local.indexOf("+");
  return plus === -1 ? a : local.slice(0, plus) + a.slice(local.length);
}
