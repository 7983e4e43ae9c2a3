// LMTP (RFC 2033) and SMTP (RFC 5321) client over Bun sockets, TCP or unix.
//
// One connection owns one socket and walks the protocol in order:
//   connect -> greeting (220) -> LHLO / EHLO (capabilities) -> [RSET or LHLO <id>] [XFORWARD] MAIL FROM
//   -> RCPT TO x N -> DATA (354) -> message bytes, dot-stuffed, CRLF line ends -> "."
//   -> LMTP: one reply per accepted recipient; SMTP: one reply for all of them.
// Every phase has its own timeout. Any fault (timeout, closed socket, unparseable reply) ends the
// connection: a half-finished LMTP transaction is never reused. LmtpPool keeps a few idle
// connections and reuses them through RSET.
//
// The message body is streamed: one chunk at a time is stuffed and written, and the next chunk is
// read only once the socket has taken the previous one, so a 25 MiB message is never held whole
// and a slow reader on the other side slows us down instead of filling memory.
//
// This file only re-exports the pieces, one job a file, from lmtp/:
//   target.ts       where the server listens (TCP or unix) and what it speaks; DELIVER_TO's URL
//   faults.ts       the protocol's phases, LmtpFault, BodyAborted
//   timeouts.ts     the limit of each step, the delivery's deadline, waiting in line until it
//   replies.ts      the server's bytes as replies (ReplyParser), formatReply, which replies accept
//   dot-stuffer.ts  the message bytes as DATA sends them
//   envelope.ts     the envelope and body, the MAIL FROM / RCPT TO / XFORWARD lines, the SMTPUTF8 and SIZE rules
//   socket.ts       one socket: commands out, replies in, each wait with its limit
//   smtp-connection.ts  SmtpConnection: the protocol's state machine, one transaction at a time
//   connection.ts   LmtpConnection: SMTP's, with LMTP's own states (LHLO, one reply per recipient)
//   turns.ts        MailboxTurns: places per mailbox (one final dot at a time; a share of the pool)
//   pool.ts         LmtpPool: a few connections reused, at most a share of them per mailbox,
//                   deliveries waiting for a free one
//   probe.ts        the doctor's question: greeting, LHLO, would RCPT take an address (nothing sent)

export { describeTarget, lmtpTarget, parseDeliverTo, protocolOf, targetUrl, type DeliveryProtocol, type LmtpTarget } from "./lmtp/target.ts";
export { BodyAborted, LmtpFault, type LmtpPhase } from "./lmtp/faults.ts";
export { DEFAULT_TIMEOUTS, type LmtpTimeouts } from "./lmtp/timeouts.ts";
export { DotStuffer } from "./lmtp/dot-stuffer.ts";
export { nonAscii, type LmtpEnvelope, type MessageBody } from "./lmtp/envelope.ts";
export { MailboxTurns } from "./lmtp/turns.ts";
export { SmtpConnection } from "./lmtp/smtp-connection.ts";
export { LmtpConnection, openConnection, type LmtpConnectionOptions } from "./lmtp/connection.ts";
export { LmtpPool, type LmtpPoolOptions } from "./lmtp/pool.ts";
export { ReplyParser, formatReply, type LmtpReply, type RecipientReply } from "./lmtp/replies.ts";
export { probeLmtp, type TargetProbe } from "./lmtp/probe.ts";
