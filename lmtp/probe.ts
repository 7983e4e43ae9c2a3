// What the delivery target says when asked, with nothing delivered (the doctor's check): its
// greeting, its answer to LHLO (EHLO for SMTP), and for each address, whether RCPT would take it
// (each tried with MAIL FROM:<> and RCPT, then RSET). Then QUIT.

import { openConnection, type LmtpConnectionOptions } from "./connection.ts";
import { formatReply, type LmtpReply } from "./replies.ts";
import type { LmtpTarget } from "./target.ts";

export interface TargetProbe {
  /** The greeting, as one line ("220 host Dovecot ready."). */
  greeting: string;
  /** The answer to LHLO (EHLO for SMTP), as one line. */
  hello: string;
  capabilities: string[];
  recipients: { address: string; reply: LmtpReply }[];
}

/** Throws LmtpFault when the target cannot be reached, does not greet, or refuses LHLO (EHLO and HELO). */
export async function probeLmtp(target: LmtpTarget, addresses: string[], opts: LmtpConnectionOptions = {}): Promise<TargetProbe> {
  const conn = await openConnection(target, opts);
  try {
    const recipients: TargetProbe["recipients"] = [];
    for (const address of addresses) recipients.push({ address, reply: await conn.probeRecipient(address) });
    return { greeting: formatReply(conn.greeting!), hello: formatReply(conn.helloReply!), capabilities: [...conn.capabilities.keys()], recipients };
  } finally {
    await conn.quit();
  }
}
