// How long each step of an LMTP delivery may take, and the delivery's own deadline that every wait
// before the final dot is cut to, waiting in a line (for a connection, for a mailbox) included.

export interface LmtpTimeouts {
  connect: number;
  greeting: number;
  /** LHLO, RSET, MAIL, RCPT, DATA, NOOP, QUIT replies. */
  command: number;
  /** Longest wait for the socket to take the next chunk of the message. */
  body: number;
  /** Wait for the replies after the final dot (Dovecot writes and fsyncs here). */
  dataEnd: number;
  /**
   * A whole delivery through the pool up to the final dot: waiting for a free connection, opening
   * one, the envelope and the body. Each wait before the dot is cut short to fit it, so a server
   * (or a body) that is slow at every step still gets an answer to the sender before the Worker
   * gives up (25 s). Once it has passed, the final dot is never sent: the transaction is dropped
   * without it and the server discards the message. Once the dot is sent, the replies get their
   * full dataEnd, whatever is left of this limit: the server may be storing the message by then.
   */
  transaction: number;
}

// Short enough that the host still answers well inside the Worker's 25 s, long enough for a busy disk.
export const DEFAULT_TIMEOUTS: LmtpTimeouts = {
  connect: 5_000,
  greeting: 10_000,
  command: 10_000,
  body: 10_000,
  dataEnd: 15_000,
  transaction: 20_000,
};

/** Milliseconds left until a deadline (performance.now() time); Infinity when there is none. */
export function remaining(deadline: number): number {
  return Math.max(0, Math.ceil(deadline - performance.now()));
}

/** A phase's own limit, cut to what is left of the delivery's. */
export function within(ms: number, deadline: number): number {
  return Math.min(ms, remaining(deadline));
}

/**
 * Waits in a line, first come first served, until the one ahead calls the entry left in it (and
 * so hands its turn on as it is). At the deadline it rejects with late(ms) and leaves the line,
 * so a turn is never handed to nobody.
 */
export function waitInLine(line: (() => void)[], deadline: number, late: (ms: number) => Error): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const ms = remaining(deadline);
    const timer = Number.isFinite(ms)
      ? setTimeout(() => {
          const i = line.indexOf(take);
          if (i !== -1) line.splice(i, 1);
          reject(late(ms));
        }, ms)
      : undefined;
    const take = () => {
      clearTimeout(timer);
      resolve();
    };
    line.push(take);
  });
}
