// Counts of the last hour, by the minute (the /status page's "last hour"): sixty slots, one per
// minute, reused as the clock goes round. Adding is a few array operations and reads no clock
// (coarse-clock.ts); a sum looks at the last sixty slots.

import { coarseNow } from "./coarse-clock.ts";

const SLOTS = 60;
const MINUTE_MS = 60_000;

export class RecentCounts<Name extends string> {
  /** The minute (since the epoch) each slot counts; a slot of an older minute is stale. */
  private readonly minutes = new Float64Array(SLOTS).fill(-Infinity);
  private readonly counts = new Map<Name, Float64Array>();

  /** `now`: ms since the epoch (to within a second will do). */
  add(name: Name, by: number, now = coarseNow()): void {
    const minute = Math.floor(now / MINUTE_MS);
    const slot = minute % SLOTS;
    if (this.minutes[slot] !== minute) {
      // A new minute in this slot: what it held is an hour old (or older) for every name.
      this.minutes[slot] = minute;
      for (const c of this.counts.values()) c[slot] = 0;
    }
    let c = this.counts.get(name);
    if (!c) this.counts.set(name, (c = new Float64Array(SLOTS)));
    c[slot]! += by;
  }

  /** The count of the last sixty minutes, this one included (so 59 to 60 minutes back). */
  sum(name: Name, now = Date.now()): number {
    const c = this.counts.get(name);
    if (!c) return 0;
    const minute = Math.floor(now / MINUTE_MS);
    let total = 0;
    for (let i = 0; i < SLOTS; i++) if (this.minutes[i]! > minute - SLOTS && this.minutes[i]! <= minute) total += c[i]!;
    return total;
  }
}
