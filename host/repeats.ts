// A message offered again: the Worker retrying after a lost answer, the edge's held copy of one the
// host already took, a sender's retry after its client gave up. What of it was delivered before
// (the record of deliveries) or is queued (the spool) is answered from there and never delivered
// a second time; only the recipients left go on. "Again" means the same bytes: the SHA-256 of
// every byte, to the same mailbox; a message that reuses a Message-ID with other bytes is another
// message.
//
// Without a Message-ID a message is a repeat while the first is queued or still under way (the
// repeat waited for it), not once it has been delivered: the same test message posted again by
// hand (the runbook's curl) is delivered again, as an operator expects, and what that leaves open
// (an answer lost after such a message was delivered) is a duplicate, never a loss. Mail without a
// Message-ID is rare, and Dovecot's own duplicate detection keys on Message-ID too.

import type { RecipientResult } from "../shared/contract.ts";
import { alreadyQueuedResult, duplicateResult } from "../shared/replies.ts";
import type { DeliveredLog } from "./delivered-log.ts";

/** Where earlier outcomes are known: the record of deliveries, and (with a spool) what is queued. */
export interface EarlierOutcomes {
  delivered: DeliveredLog;
  /** The spool id of a queued message with these bytes still to go to this recipient (QueueRunner.queuedAs). */
  queuedAs?: (sha256: string, recipient: string) => string | null;
}

/** Recipients split by what became of the message before: an answer for each that had one, and the rest (those still to do). */
export interface Repeats {
  earlier: Map<string, RecipientResult>;
  rest: string[];
}

/**
 * Each recipient that had this message before gets that outcome: delivered (duplicate) or queued
 * (its spool id). `waited`: this request waited for the same bytes under way (OneAtATime), or is
 * the spool's own retry of its file: a delivery on record counts then even without a Message-ID.
 */
export function repeatsOf(known: EarlierOutcomes, to: string[], messageId: string | null, sha256: string | null, waited: boolean): Repeats {
  const earlier = new Map<string, RecipientResult>();
  if (sha256) {
    for (const address of to) {
      if ((messageId !== null || waited) && known.delivered.has(messageId, address, sha256)) earlier.set(address, duplicateResult(address, messageId));
      else {
        const id = known.queuedAs?.(sha256, address);
        if (id) earlier.set(address, alreadyQueuedResult(address, id));
      }
    }
  }
  return { earlier, rest: earlier.size ? to.filter((a) => !earlier.has(a)) : to };
}

/** Every recipient's result in envelope order: its earlier outcome, or the one just given. */
export function inEnvelopeOrder(to: string[], earlier: Map<string, RecipientResult>, now: RecipientResult[]): RecipientResult[] {
  const fresh = new Map(now.map((r) => [r.address, r]));
  return to.map((address) => earlier.get(address) ?? fresh.get(address)!);
}

/**
 * The same bytes one at a time: a repeat that arrives while the first is still being delivered
 * (its client gave up at 25 s and the edge offered it again) waits for the first to end, and is
 * then answered from what it left (delivered, queued, or nothing: then it goes on itself). Two
 * at once would both reach Dovecot.
 */
export class OneAtATime {
  private readonly underway = new Map<string, Promise<void>>();

  /** Runs fn once no other run with this key is under way; fn learns whether it waited for one. */
  async run<T>(key: string | null, fn: (waited: boolean) => Promise<T>): Promise<T> {
    if (key === null) return fn(false);
    let waited = false;
    for (let first = this.underway.get(key); first; first = this.underway.get(key)) {
      waited = true;
      await first;
    }
    let done!: () => void;
    this.underway.set(key, new Promise<void>((resolve) => (done = resolve)));
    try {
      return await fn(waited);
    } finally {
      this.underway.delete(key);
      done();
    }
  }
}
