// The delivery target's last answer (the /status page): the replies to the latest transaction,
// or the fault that left it without any, and when. Only the latest is kept; noting it is one
// assignment (the one line is made when the page asks).

import type { RecipientResult } from "../shared/contract.ts";
import { isAccepted } from "../shared/replies.ts";
import { coarseNow } from "./coarse-clock.ts";

export interface TargetAnswer {
  /** When it came (ms since the epoch, to within a second). */
  at: number;
  /** The replies as one line ("250 2.0.0 <x@y> Saved"), or the fault ("LMTP connect to ... failed: ..."). */
  text: string;
  /** Whether it accepted: a 2xx for every recipient. */
  accepted: boolean;
}

type Noted = { at: number; results: RecipientResult[] } | { at: number; fault: string };

export class LastAnswer {
  private latest: Noted | null = null;

  /** The replies of a transaction, or the fault (its message) that ended it without any. */
  note(answer: RecipientResult[] | Error, at = coarseNow()): void {
    this.latest = answer instanceof Error ? { at, fault: answer.message } : { at, results: answer };
  }

  get(): TargetAnswer | null {
    const l = this.latest;
    if (!l) return null;
    if ("fault" in l) return { at: l.at, text: l.fault, accepted: false };
    return { at: l.at, text: l.results.map((r) => r.reply).join("; "), accepted: l.results.every(isAccepted) };
  }
}
