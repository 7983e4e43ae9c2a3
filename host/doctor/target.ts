// The delivery target (Dovecot's LMTP, or the operator's MTA over SMTP: DELIVER_TO): that it greets
// and answers LHLO (EHLO), and that it would take postmaster@ of each MAIL_DOMAIN at RCPT (RFC 5321
// 4.5.1 requires that address), asked with MAIL FROM:<>, RCPT TO, RSET: nothing is delivered. The
// question goes through the target's own client (probeLmtp opens the protocol the target speaks).
// With ALIASES_FILE, postmaster@ is asked as the host would deliver it: expanded first.

import { readFileSync } from "node:fs";
import { LmtpFault, describeTarget, formatReply, probeLmtp, protocolOf, type TargetProbe } from "../../lmtp.ts";
import { replyClass } from "../../shared/replies.ts";
import { AliasMap } from "../aliases.ts";
import { deliveryTarget, type ServerConfig } from "../config.ts";
import type { DoctorContext, DoctorPart, Finding } from "./finding.ts";

/** The configured target's probe, and how to name it. */
function targetClient(config: ServerConfig, ctx: DoctorContext): { name: string; probe: (addresses: string[]) => Promise<TargetProbe> } {
  const target = deliveryTarget(config);
  const ms = ctx.timeoutMs;
  return { name: `${protocolOf(target).toUpperCase()} ${describeTarget(target)}`, probe: (addresses) => probeLmtp(target, addresses, { lhloName: "mail-relay-doctor", timeouts: { connect: ms, greeting: ms, command: ms } }) };
}

export const target: DoctorPart = {
  name: "target",
  async run(ctx) {
    if (!ctx.config) return [{ part: "target", status: "skip", found: "the host's settings do not parse (see configuration)" }];
    const client = targetClient(ctx.config, ctx);
    // With ALIASES_FILE the host expands postmaster@ itself before delivery: the target is asked
    // about what it expands to, as a delivery would be.
    const aliases = ctx.config.aliasesFile ? readAliases(ctx.config.aliasesFile) : null;
    if (aliases instanceof Error) return [{ part: "target", status: "fail", found: `ALIASES_FILE=${ctx.config.aliasesFile}: ${aliases.message}`, fix: "mend the file: the host keeps its previous map (or does not start) while it does not parse" }];
    const postmasters = ctx.domains.map((d) => `postmaster@${d}`);
    const reaches = new Map(postmasters.map((p) => [p, aliases ? aliases.expand(p) : [p]]));
    const addresses = [...new Set([...reaches.values()].flat())];
    let probe: TargetProbe;
    try {
      probe = await client.probe(addresses);
    } catch (e) {
      return [unanswered(client.name, e as Error, ctx.config)];
    }
    const findings: Finding[] = [{ part: "target", status: "ok", found: `${client.name}: ${probe.greeting}; ${client.name.startsWith("SMTP") ? "EHLO" : "LHLO"} ${probe.hello.split(" ")[0]}, offers ${probe.capabilities.join(" ") || "nothing"}` }];
    if (!addresses.length) findings.push({ part: "target", status: "skip", found: "postmaster@: MAIL_DOMAIN is not set, no address to ask about" });
    const replies = new Map(probe.recipients.map((r) => [r.address, r.reply]));
    const asked = [...reaches].flatMap(([postmaster, targets]) => targets.map((t) => ({ address: t === postmaster ? t : `${postmaster} -> ${t} (ALIASES_FILE)`, reply: replies.get(t)! })));
    for (const { address, reply } of asked) {
      const text = formatReply(reply);
      const verdict = replyClass(reply.code);
      if (verdict === "accepted") findings.push({ part: "target", status: "ok", found: `${address}: RCPT answered ${text} (then RSET: nothing delivered)` });
      else if (verdict === "permanent") {
        findings.push({ part: "target", status: "fail", found: `${address}: refused at RCPT: ${text}`, fix: `create it, or an alias to a real mailbox (RFC 5321 4.5.1: every mail domain must take postmaster@)` });
      } else findings.push({ part: "target", status: "warn", found: `${address}: RCPT answered ${text}, for now`, fix: "look at Dovecot's log (doveadm log errors) and run the doctor again" });
    }
    return findings;
  },
};

/** ALIASES_FILE's map as the host reads it, or why it cannot be read. */
function readAliases(path: string): AliasMap | Error {
  try {
    return AliasMap.parse(readFileSync(path, "utf8"));
  } catch (e) {
    return e as Error;
  }
}

function unanswered(name: string, e: Error, config: ServerConfig): Finding {
  const where = config.deliverTo ? "DELIVER_TO" : config.lmtpHost.startsWith("/") ? "LMTP_HOST (the socket's path)" : "LMTP_HOST and LMTP_PORT";
  if (config.deliverTo && protocolOf(config.deliverTo) === "smtp") {
    return { part: "target", status: "fail", found: `${name}: ${e.message}`, fix: `start the MTA, or point DELIVER_TO at an smtpd port that takes mail from this host (mynetworks; see delivery-targets.md)` };
  }
  if (e instanceof LmtpFault && (e.phase === "connect" || e.kind === "connect")) {
    return { part: "target", status: "fail", found: `${name}: ${e.message}`, fix: `start Dovecot, or point ${where} at its LMTP listener (service lmtp { inet_listener lmtp { port = 2525 } })` };
  }
  if (e instanceof LmtpFault && (e.phase === "greeting" || e.phase === "lhlo")) {
    return { part: "target", status: "fail", found: `${name}: ${e.message}`, fix: `${where} must name Dovecot's LMTP service (it answers LHLO), not its IMAP, POP3 or SMTP port` };
  }
  return { part: "target", status: "fail", found: `${name}: ${e.message}`, fix: "look at Dovecot's log (doveadm log errors)" };
}
