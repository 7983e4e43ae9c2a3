// How an LMTP or SMTP exchange fails: the protocol's phases, a fault of the connection (LmtpFault) and a
// message body that gives out (BodyAborted).

export type LmtpPhase =
  | "connect"
  | "greeting"
  | "lhlo"
  | "ehlo"
  | "helo"
  | "rset"
  | "xforward"
  | "mail"
  | "rcpt"
  | "data"
  | "body"
  | "data-end"
  | "noop"
  | "quit";

/**
 * A fault of the connection itself: the outcome for the message is temporary (retry later).
 * LmtpConnection.deliver() throws one only before the final dot, so it always means "not
 * delivered"; after the dot a fault becomes the unanswered recipients' reply (outcomeUnknown).
 */
export class LmtpFault extends Error {
  constructor(
    readonly kind: "timeout" | "connect" | "closed" | "protocol",
    /**
     * The exchange it hit. null on a fault of the socket itself (closed, bytes that are no reply)
     * until an exchange meets it: every wait on the socket re-labels it with its own phase, so a
     * fault that deliver() or open() throws always names one.
     */
    readonly phase: LmtpPhase | null,
    message: string,
  ) {
    super(message);
    this.name = "LmtpFault";
  }
}

/** Thrown by the body stream's reader, it means "abort the transaction": no final dot is sent. */
export class BodyAborted extends Error {
  override name = "BodyAborted";
}
