// What one invocation of the Worker may still spend. Cloudflare counts every fetch and every call
// to R2 (or to the Worker itself through a service binding) as a subrequest, and stops the
// invocation at its plan's limit (EDGE_SPOOL_SUBREQUESTS: 50 on the free plan). Each call is
// counted where it is made (spend), and work is started only when its worst case fits (affords).
// The limit is per invocation: the cron's scheduled(), one email() with its waitUntil, one
// request to fetch(). Local workerd enforces none of this, so the count is the only guard.

export class Budget {
  used = 0;
  constructor(readonly limit: number) {}

  spend(calls = 1): void {
    this.used += calls;
  }

  get left(): number {
    return this.limit - this.used;
  }

  /** Whether `calls` more still leave `reserve` for what must follow (the end of a run). */
  affords(calls: number, reserve = 0): boolean {
    return this.used + calls + reserve <= this.limit;
  }
}
