// The operator's counters, in Prometheus' text format (GET /metrics).

import { metric } from "../shared/prometheus.ts";
import type { AnswerOutcome } from "../shared/replies.ts";

const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export type Counter =
  | "received"
  | "delivered"
  | "rejected"
  | "deferred"
  | "queued"
  | "duplicates"
  | "queued_repeats"
  | "unknown_outcome"
  | "spool_delivered"
  | "spool_retried"
  | "spool_failed"
  | "spool_incomplete_discarded"
  | "spool_write_errors"
  | "delivered_log_errors";

const HELP: Record<Counter, string> = {
  received: "Messages received over HTTP (authenticated POSTs).",
  delivered: "Messages answered 200: delivered to LMTP at once.",
  rejected: "Messages refused permanently (400, 413, 415, 422).",
  deferred: "Messages answered 503 (not delivered, not spooled: the sender retries).",
  queued: "Messages written to the spool and answered 202.",
  duplicates: "Repeats of a message already delivered, answered 200 without delivering.",
  queued_repeats: "Repeats of a message already in the spool, answered 202 with its spool id instead of being taken again.",
  unknown_outcome: "LMTP transactions without an answer after the final dot (timeout, connection lost, 421): Dovecot may have saved the message (a later retry may duplicate it).",
  spool_delivered: "Spooled messages delivered by the background deliverer.",
  spool_retried: "Failed delivery attempts of spooled messages (retried later).",
  spool_failed: "Spooled messages given up on (too old, or refused permanently) and moved to failed/.",
  spool_incomplete_discarded: "Half-written spool files found at start-up (never acknowledged) and removed.",
  spool_write_errors: "Attempts to spool a message that failed (the sender got 503).",
  delivered_log_errors: "Reads and writes of the record of deliveries (delivered.sqlite) that failed; delivery goes on, a repeat may not be recognised.",
};

/** The spool's depth and age, as the queue runner knows them. */
export interface SpoolGauge {
  queued: number;
  failed: number;
  unreadable: number;
  oldestAgeSeconds: number;
}
const NO_SPOOL: SpoolGauge = { queued: 0, failed: 0, unreadable: 0, oldestAgeSeconds: 0 };

/** The counter each answer adds to besides "received"; a queued message is counted when it is spooled. */
const ANSWER_COUNTERS: Partial<Record<AnswerOutcome, Counter>> = { delivered: "delivered", duplicate: "duplicates", rejected: "rejected", deferred: "deferred" };

export class Metrics {
  private readonly counters = new Map<Counter, number>();
  private readonly buckets = new Array<number>(BUCKETS.length).fill(0);
  private sum = 0;
  private count = 0;

  /** `spool`: the spool's depth and age when rendered (none without a spool). */
  constructor(private readonly spool: () => SpoolGauge | undefined = () => undefined) {}

  inc(name: Counter, by = 1): void {
    this.counters.set(name, (this.counters.get(name) ?? 0) + by);
  }

  /** One answered inbound request (with a valid key), by what it meant for the message. */
  countAnswer(outcome: AnswerOutcome): void {
    this.inc("received");
    const counter = ANSWER_COUNTERS[outcome];
    if (counter) this.inc(counter);
  }

  get(name: Counter): number {
    return this.counters.get(name) ?? 0;
  }

  /** One LMTP transaction's duration. */
  observeDelivery(seconds: number): void {
    this.sum += seconds;
    this.count++;
    for (let i = 0; i < BUCKETS.length; i++) if (seconds <= BUCKETS[i]!) this.buckets[i]!++;
  }

  render(): string {
    const out: string[] = [];
    for (const name of Object.keys(HELP) as Counter[]) out.push(...metric(`relay_${name}_total`, "counter", HELP[name], this.get(name)));
    const g = this.spool() ?? NO_SPOOL;
    out.push(
      ...metric("relay_spool_messages", "gauge", "Messages in the spool waiting for delivery.", g.queued),
      ...metric("relay_spool_failed_messages", "gauge", "Messages in the spool's failed/ area.", g.failed),
      ...metric("relay_spool_unreadable_files", "gauge", "Files in the spool's queue/ or failed/ that cannot be read as spool files (left there for the operator; see `queue list`).", g.unreadable),
      ...metric("relay_spool_oldest_age_seconds", "gauge", "Age of the oldest message waiting in the spool (0 when empty).", g.oldestAgeSeconds.toFixed(3)),
      "# HELP relay_delivery_seconds Duration of LMTP transactions.",
      "# TYPE relay_delivery_seconds histogram",
    );
    BUCKETS.forEach((b, i) => out.push(`relay_delivery_seconds_bucket{le="${b}"} ${this.buckets[i]}`));
    out.push(`relay_delivery_seconds_bucket{le="+Inf"} ${this.count}`, `relay_delivery_seconds_sum ${this.sum.toFixed(6)}`, `relay_delivery_seconds_count ${this.count}`);
    return out.join("\n") + "\n";
  }
}
