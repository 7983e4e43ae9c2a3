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
  /**
   * The server that sent the message to Cloudflare, from Cloudflare's topmost trace header
   * (peekHeaders): passed on with XFORWARD where the server offers it (an MTA such as Postfix),
   * so that its milters and policy services judge the real sender. null or absent: not sent.
   */
  client?: { ip: string; helo: string } | null;
  /**
   * Recipients reached through an alias, each with the address the sender used: sent as RCPT's
   * ORCPT parameter (RFC 3461 4.2; Dovecot 2.3 takes it without offering DSN, and with
   * lmtp_hdr_delivery_address = original writes it as Delivered-To).
   */
  orcpt?: ReadonlyMap<string, string>;
}

const DELIVERY_ID = /^[0-9a-z]{1,63}$/;

export function checkDeliveryId(id: string | undefined): void {
  if (id !== undefined && !DELIVERY_ID.test(id)) throw new Error(`delivery id must be 1-63 letters and digits: ${JSON.stringify(id)}`);
}

/** A body is either bytes already in memory or a stream read chunk by chunk. */
export type MessageBody = Uint8Array | ReadableStream<Uint8Array>;

/** An address that needs SMTPUTF8 (RFC 6531): any character outside ASCII. */
export const nonAscii = (address: string) => /[^\x00-\x7f]/.test(address);

/** RFC 6531 3.7.4.1 / RFC 3463 X.6.7: "non-ASCII addresses not permitted for that sender/recipient". `server`: "LMTP" or "SMTP". */
export function notSendable(address: string, what: string, server: string): LmtpReply {
  return { code: 553, enhanced: "5.6.7", text: `<${address}>: non-ASCII ${what}, and the ${server} server does not offer SMTPUTF8` };
}

/** RFC 1870: the message is larger than the server's advertised SIZE; not offered at all. */
export function tooLarge(size: number, limit: number): LmtpReply {
  return { code: 552, enhanced: "5.3.4", text: `message of ${size} bytes exceeds the ${limit} bytes the server takes (its SIZE)` };
}

/** The SIZE limit the server advertised (RFC 1870 "SIZE 10240000"); null when none or 0 (no limit). */
export function sizeLimit(capabilities: ReadonlyMap<string, string>): number | null {
  const n = Number(capabilities.get("SIZE") || 0);
  return Number.isSafeInteger(n) && n > 0 ? n : null;
}

/**
 * XFORWARD (Postfix's XFORWARD_README) with the attributes the server lists: the sending server's
 * address and HELO name, its host name unknown (the relay did no reverse lookup), ESMTP. Values in
 * xtext (RFC 3461 4); an IPv6 address carries Postfix's "IPV6:" prefix.
 */
export function xforwardCommand(client: { ip: string; helo: string }, offered: string): string {
  const names = new Set(offered.toUpperCase().split(/\s+/));
  const attrs: [string, string][] = [
    ["NAME", "[UNAVAILABLE]"],
    ["ADDR", client.ip.includes(":") ? `IPV6:${client.ip}` : client.ip],
    ["HELO", client.helo || "[UNAVAILABLE]"],
    ["PROTO", "ESMTP"],
  ];
  const sent = attrs.filter(([name]) => names.has(name));
  return sent.length ? `XFORWARD ${sent.map(([name, v]) => `${name}=${xtext(v)}`).join(" ")}\r\n` : "";
}

/** RFC 3461 4: "+" and "=", controls, space and non-ASCII as "+XX". */
function xtext(value: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(value)) {
    out += byte < 33 || byte > 126 || byte === 0x2b || byte === 0x3d ? `+${byte.toString(16).toUpperCase().padStart(2, "0")}` : String.fromCharCode(byte);
  }
  return out;
}

/** MAIL FROM with the parameters the server offers; SMTPUTF8 for a non-ASCII envelope. */
export function mailCommand(envelope: LmtpEnvelope, size: number | null, capabilities: ReadonlyMap<string, string>): string {
  let params = "";
  if (size !== null && capabilities.has("SIZE")) params += ` SIZE=${size}`;
  if (capabilities.has("8BITMIME")) params += " BODY=8BITMIME";
  if ([envelope.from, ...envelope.to].some(nonAscii)) params += " SMTPUTF8"; // offered, or deliver() refused them
  return `MAIL FROM:<${envelope.from}>${params}\r\n`;
}

/** RCPT TO, with ORCPT when the recipient was reached through an alias (an ASCII one: RFC 6533's form is not sent). */
export function rcptCommand(recipient: string, orcpt?: string): string {
  const param = orcpt !== undefined && !nonAscii(orcpt) ? ` ORCPT=rfc822;${xtext(orcpt)}` : "";
  return `RCPT TO:<${recipient}>${param}\r\n`;
}
