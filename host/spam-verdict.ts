// What rspamd's verdict means for one message (pure: no I/O): deliver it, refuse it while the
// sender is connected, or ask the sender to come back later; and the header fields that carry the
// verdict into the mailbox, prepended as an MTA prepends its trace fields (the sender's bytes
// follow unchanged).
//
//   action                          live (the sender is waiting)      already accepted
//   reject, discard                 refused: 550 5.7.1                delivered, X-Spam: Yes
//   soft reject                     deferred: 451 4.7.1               delivered
//   greylist, greylisted by rspamd  deferred: 451 4.7.1               delivered
//   greylist, a score band only     delivered                         delivered
//   add header, rewrite subject     delivered, X-Spam: Yes            delivered, X-Spam: Yes
//   no action, anything else        delivered                         delivered
//
// "greylist" is a score band that asks for greylisting; the one who remembers who came when is
// rspamd's greylist module (it needs Redis). When it greylists a message it says so with its
// GREYLIST symbol ("greylisted", and until when) and, by default, the action "soft reject"; when
// the sender comes back in time it lets the message through and the band is dropped. Without the
// module nobody remembers: the band alone comes back the same on every retry, so deferring on it
// would defer the message until its sender gives up and bounces it. rspamd's own milter
// (src/libserver/milter.c, 3.4) accepts on "greylist" for the same reason.
// "rewrite subject" is not carried out: the sender's bytes are never changed.

import type { Scan, ScanFailure, Verdict } from "./spam-scan.ts";

export type Treatment =
  | { is: "deliver"; spam: boolean }
  | { is: "refuse"; reply: string }
  | { is: "defer"; reply: string };

/** rspamd's actions that say "spam" (rspamd's is_spam: every action but no action, greylist and soft reject). */
const SPAM_ACTIONS = new Set(["reject", "discard", "rewrite subject", "add header", "quarantine"]);

export const isSpam = (v: Verdict) => SPAM_ACTIONS.has(v.action);

/** Whether rspamd's greylist module greylisted this message (not merely a score in the greylist band). */
export const greylisted = (v: Verdict) => v.symbols.some((s) => s.name === "GREYLIST" && s.options[0] === "greylisted" && !s.options.includes("passed"));

/**
 * What to do with a message given its scan. `alreadyAccepted`: the sender was told 250 before
 * (held at the edge, or retried from the host's spool), so refusing it now would bounce to an
 * address that may be forged: it is delivered with its verdict instead.
 */
export function treatment(scan: Verdict, alreadyAccepted: boolean): Treatment {
  const spam = isSpam(scan);
  if (alreadyAccepted) return { is: "deliver", spam };
  const score = `score ${fixed(scan.score)} of ${fixed(scan.required)}`;
  const reason = scan.smtpMessage ? `: ${safeText(scan.smtpMessage, 200)}` : "";
  if (scan.action === "reject" || scan.action === "discard") {
    return { is: "refuse", reply: `550 5.7.1 Message refused as spam by the spam filter (rspamd, ${score})${reason}` };
  }
  if (scan.action === "soft reject" || (scan.action === "greylist" && greylisted(scan))) {
    return { is: "defer", reply: `451 4.7.1 Try again later: deferred by the spam filter (rspamd: ${scan.action}, ${score})${reason}` };
  }
  return { is: "deliver", spam };
}

/** The fields this relay writes itself; rspamd's own fields of these names are left out. */
const OWN_FIELDS = new Set(["x-spam-status", "x-spamd-result", "x-spam"]);

/** Longest line a header field of ours may have (RFC 5322 2.1.1 allows 998). */
const MAX_LINE = 998;
const MAX_OPTIONS = 8;
const MAX_OPTION_CHARS = 64;

/**
 * The header fields to prepend, with the message's own line end: X-Spam-Status always (Yes/No,
 * the score, the required score, the action; "Unknown" when rspamd gave no verdict), and with a
 * verdict X-Spamd-Result (rspamd's format: every symbol with its score and options), X-Spam: Yes
 * for spam, and the fields rspamd's milter_headers module asks for (Authentication-Results, ...).
 * Only printable ASCII: anything else from rspamd (a symbol's option quoting the message, a
 * field's value) is written as "?", and a field name that is not one is left out.
 */
export function verdictFields(scan: Scan, lineEnd: "\r\n" | "\n"): Uint8Array {
  const fields: string[] = [];
  if ("failed" in scan) {
    fields.push(`X-Spam-Status: Unknown, not scanned (rspamd: ${safeText((scan as ScanFailure).failed, 300)})`);
  } else {
    const spam = isSpam(scan);
    fields.push(`X-Spam-Status: ${spam ? "Yes" : "No"}, score=${fixed(scan.score)} required=${fixed(scan.required)} action="${safeText(scan.action, 40)}"`);
    const symbols = scan.symbols.map((s) => {
      const options = s.options.slice(0, MAX_OPTIONS).map((o) => safeText(o, MAX_OPTION_CHARS).replace(/[,\]]/g, "?"));
      if (s.options.length > MAX_OPTIONS) options.push("...");
      return `${safeText(s.name, 100)}(${fixed(s.score)})[${options.join(",")}]`;
    });
    fields.push([`X-Spamd-Result: default: ${spam ? "True" : "False"} [${fixed(scan.score)} / ${fixed(scan.required)}]`, ...symbols].join(`;${lineEnd}\t`));
    if (spam) fields.push("X-Spam: Yes");
    for (const { name, value } of scan.addHeaders) {
      if (!/^[\x21-\x39\x3b-\x7e]{1,76}$/.test(name) || OWN_FIELDS.has(name.toLowerCase())) continue;
      fields.push(`${name}: ${foldedValue(value, lineEnd)}`);
    }
  }
  return new TextEncoder().encode(fields.map((f) => f + lineEnd).join(""));
}

/** rspamd's value as one field: its own folding kept (every continuation line starts with a blank), nothing else that ends a line. */
function foldedValue(value: string, lineEnd: string): string {
  const lines = value
    .split(/\r\n|\r|\n/)
    .map((l) => safeText(l, MAX_LINE - 80, true))
    .filter((l, i) => i === 0 || l.trim() !== "");
  return lines.map((l, i) => (i === 0 ? l.trimStart() : /^[ \t]/.test(l) ? l : `\t${l}`)).join(lineEnd);
}

/** Printable ASCII only (a tab too where asked), at most `max` characters. */
function safeText(s: string, max: number, tabs = false): string {
  const out = s.replace(tabs ? /[^\x20-\x7e\t]/g : /[^\x20-\x7e]/g, "?");
  return out.length > max ? out.slice(0, max) : out;
}

const fixed = (n: number) => (Number.isFinite(n) ? n.toFixed(2) : String(n));
