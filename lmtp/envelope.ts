// What one transaction carries (the envelope, the message body) and the commands the envelope
// becomes; which addresses may be sent to a server that does not offer SMTPUTF8.

import type { LmtpReply } from "./replies.ts";

export interface LmtpEnvelope {
  /** Envelope sender; "" is the null sender of bounces (sent as MAIL FROM:<>). */
  from: string;
  to: string[];
  /**
   * Names this message's delivery: the same id on every attempt at the same accepted message,
   * another id for any other message. It goes out as the client name of an LHLO that opens the
   * transaction ("LHLO <id>.<lhloName>"); Dovecot writes that name into the Received header it
   * adds, where a Sieve `duplicate` test finds it (docs/operations.md, "Exactly once"). Letters
   * and digits only (one DNS label), so it is a valid LHLO domain.
   */
  deliveryId?: string;
}

const DELIVERY_ID = /^[0-9a-z]{1,63}$/;

export function checkDeliveryId(id: string | undefined): void {
  if (id !== undefined && !DELIVERY_ID.test(id)) throw new Error(`delivery id must be 1-63 letters and digits: ${JSON.stringify(id)}`);
}

/** A body is either bytes already in memory or a stream read chunk by chunk. */
export type MessageBody = Uint8Array | ReadableStream<Uint8Array>;

/** An address that needs SMTPUTF8 (RFC 6531): any character outside ASCII. */
export const nonAscii = (address: string) => /[^\x00-\x7f]/.test(address);

/** RFC 6531 3.7.4.1 / RFC 3463 X.6.7: "non-ASCII addresses not permitted for that sender/recipient". */
export function notSendable(address: string, what: string): LmtpReply {
  return { code: 553, enhanced: "5.6.7", text: `<${address}>: non-ASCII ${what}, and the LMTP server does not offer SMTPUTF8` };
}

/** MAIL FROM with the parameters the server offers; SMTPUTF8 for a non-ASCII envelope. */
export function mailCommand(envelope: LmtpEnvelope, size: number | null, capabilities: ReadonlyMap<string, string>): string {
  let params = "";
  if (size !== null && capabilities.has("SIZE")) params += ` SIZE=${size}`;
  if (capabilities.has("8BITMIME")) params += " BODY=8BITMIME";
  if ([envelope.from, ...envelope.to].some(nonAscii)) params += " SMTPUTF8"; // offered, or deliver() refused them
  return `MAIL FROM:<${envelope.from}>${params}\r\n`;
}

export const rcptCommand = (recipient: string) => `RCPT TO:<${recipient}>\r\n`;
