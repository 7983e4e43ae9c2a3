// The delivery target's last answer (the /status page): the reply to the latest transaction, or
// the fault that left it without one, and when. Only the latest is kept.

export interface TargetAnswer {
  /** When it came (ms since the epoch). */
  at: number;
  /** The reply as one line ("250 2.0.0 <x@y> Saved"), or the fault ("LMTP connect to ... failed: ..."). */
  text: string;
  /** Whether it accepted: a 2xx for every recipient. */
  accepted: boolean;
}

export class LastAnswer {
  private latest: TargetAnswer | null = null;

  note(text: string, accepted: boolean, at = Date.now()): void {
    this.latest = { at, text, accepted };
  }

  get(): TargetAnswer | null {
    return this.latest;
  }
}
