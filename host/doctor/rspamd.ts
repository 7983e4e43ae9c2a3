// The spam filter (RSPAMD_URL, docs/spam-filter.md): that rspamd's normal worker answers (GET /ping
// answers "pong"); that a scan of a small test message gets a verdict through the host's own
// client (host/spam-scan.ts: the POST /checkv2 the host makes, within RSPAMD_TIMEOUT_MS), with its
// action and how long it took; that rspamd's DNS answers (lookups that timed out, R_SPF_DNSFAIL and
// the like, or a scan that waits seconds, mean its resolver does not answer); and that GTUBE gets
// "reject", the action the relay refuses while the sender is connected. Nothing is delivered: the
// test messages go to rspamd only.
//
// GTUBE in rspamd (src/libmime/message.c): a text part of at most 8 KiB holding the pattern gets
// the reject action whatever the thresholds, and a score equal to reject's threshold: 0 when
// actions.conf sets `reject = null` (seen with 3.4 here). Since 3.8, `gtube_patterns = "disabled"`
// in options.inc turns the pattern off (no GTUBE symbol, a score like any message's).

import type { DoctorContext, DoctorPart, Finding } from "./finding.ts";
import { get } from "../http-get.ts";
import { RspamdClient, scanFailed, type ScanRequest, type Verdict } from "../spam-scan.ts";

/** RFC 3833's test pattern that rspamd, like SpamAssassin, answers with reject. */
export const GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
/** A scan slower than this waits on something: with its resolver unanswered, rspamd waits seconds. */
const SLOW_SCAN_MS = 2_500;

const RESOLVER_FIX = "rspamd needs a resolver that answers: `dns { nameserver = [\"127.0.0.1:53\"]; }` in local.d/options.inc, a local recursive resolver (unbound) rather than a public one, which the DNS blocklists refuse";

export const rspamd: DoctorPart = {
  name: "spam-filter",
  async run(ctx) {
    if (!ctx.config) return [{ part: "spam-filter", status: "skip", found: "the host's settings do not parse (see configuration)" }];
    const settings = ctx.config.rspamd;
    if (!settings) return [{ part: "spam-filter", status: "skip", found: "RSPAMD_URL is not set: mail is delivered unscanned" }];
    const ping = await pong(settings.url, ctx.timeoutMs);
    if (ping) {
      return [{ part: "spam-filter", status: "fail", found: `rspamd at ${settings.url}: ${ping}: the host delivers every message unscanned (X-Spam-Status: Unknown)`, fix: "start rspamd, or point RSPAMD_URL at its normal worker (http://rspamd:11333; the controller is 11334)" }];
    }
    const client = new RspamdClient(settings.url, settings.timeoutMs);
    const findings: Finding[] = [{ part: "spam-filter", status: "ok", found: `rspamd at ${settings.url}: GET /ping answered pong` }];
    const started = performance.now();
    const plain = await client.scan(testMessage(ctx, "This message was scanned by the mail relay's doctor, to check the spam filter. It is not delivered."));
    const ms = Math.round(performance.now() - started);
    if (scanFailed(plain)) {
      return [...findings, { part: "spam-filter", status: "fail", found: `a test message got no verdict from POST /checkv2: ${plain.failed}: the host delivers such mail unscanned (X-Spam-Status: Unknown)`, fix: "rspamd's log (rspamd.log) says why; RSPAMD_TIMEOUT_MS is the time a scan may take" }];
    }
    findings.push(plainVerdict(plain, ms), dns(plain, ms));
    const gtube = await client.scan(testMessage(ctx, GTUBE));
    findings.push(scanFailed(gtube) ? { part: "spam-filter", status: "fail", found: `GTUBE got no verdict from POST /checkv2: ${gtube.failed}`, fix: "rspamd's log (rspamd.log) says why" } : gtubeVerdict(gtube));
    return findings;
  },
};

/** Why GET /ping is not rspamd's "pong", or null. */
async function pong(url: string, ms: number): Promise<string | null> {
  const a = await get(new URL(`${url.replace(/\/+$/, "")}/ping`), ms);
  if (typeof a === "string") return `GET /ping: ${a}`;
  if (a.status === 200 && a.text.trim() === "pong") return null;
  return `GET /ping answered ${a.status} ${JSON.stringify(a.text.slice(0, 60))}, not rspamd's pong`;
}

/**
 * A small message to postmaster@ of the first MAIL_DOMAIN (rspamd's per-domain settings apply), as
 * a bounce (null sender) from a documentation address (RFC 5737) with names under .invalid: every
 * lookup about it gets an answer from any working resolver (NXDOMAIN), and it scores low (about 2
 * with rspamd's defaults), far from the actions that defer or refuse.
 */
function testMessage(ctx: DoctorContext, text: string): ScanRequest {
  const rcpt = `postmaster@${ctx.domains[0] ?? "example.invalid"}`;
  const id = crypto.randomUUID();
  const date = new Date().toUTCString().replace("GMT", "+0000");
  const message = [
    "From: Mail relay doctor <doctor@example.invalid>",
    `To: <${rcpt}>`,
    "Subject: A test of the spam filter",
    `Date: ${date}`,
    `Message-ID: <doctor-${id}@example.invalid>`,
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=us-ascii",
    "",
    text,
    "",
  ].join("\r\n");
  return { from: "", to: [rcpt], queueId: `doctor-${id}`, sender: { ip: "192.0.2.1", helo: "doctor.invalid" }, hostname: "doctor.invalid", body: new TextEncoder().encode(message) };
}

const scored = (v: Verdict) => `score ${v.score.toFixed(2)} of ${v.required.toFixed(2)}`;

function plainVerdict(v: Verdict, ms: number): Finding {
  const said = `a test message: "${v.action}", ${scored(v)}, in ${ms} ms`;
  if (v.action === "reject" || v.action === "discard") {
    return { part: "spam-filter", status: "fail", found: `${said}: ordinary mail would be refused (550 5.7.1)`, fix: "the thresholds in local.d/actions.conf (rspamd's defaults: greylist 4, add header 6, reject 15), or the rule that scored it (rspamd.log)" };
  }
  if (v.action === "soft reject") {
    return { part: "spam-filter", status: "warn", found: `${said}: ordinary mail would be deferred (451 4.7.1) until its sender gives up`, fix: "the thresholds in local.d/actions.conf, or the rule that scored it (rspamd.log)" };
  }
  return { part: "spam-filter", status: "ok", found: said };
}

/** Lookups that failed, as rspamd's modules report them: R_SPF_DNSFAIL, DMARC_DNSFAIL, RDNS_DNSFAIL, an RBL's "query timed out". */
const dnsFailure = (s: Verdict["symbols"][number]) => /DNSFAIL$/.test(s.name) || s.options.some((o) => /query timed out|DNS error/i.test(o));

function dns(v: Verdict, ms: number): Finding {
  const failed = v.symbols.filter(dnsFailure).map((s) => s.name);
  if (failed.length) {
    return { part: "spam-filter", status: "warn", found: `rspamd's resolver is not answering: its lookups failed (${failed.join(", ")}) and the scan took ${(ms / 1000).toFixed(1)} s: every message waits as long, and SPF, DMARC and the blocklists say nothing`, fix: RESOLVER_FIX };
  }
  if (ms >= SLOW_SCAN_MS) {
    return { part: "spam-filter", status: "warn", found: `the scan took ${(ms / 1000).toFixed(1)} s: rspamd waits on something, most often a resolver that answers late`, fix: RESOLVER_FIX };
  }
  return { part: "spam-filter", status: "ok", found: `rspamd's lookups were answered (no DNS failure among its symbols)` };
}

function gtubeVerdict(v: Verdict): Finding {
  if (!v.symbols.some((s) => s.name === "GTUBE")) {
    return { part: "spam-filter", status: "warn", found: `GTUBE was not recognised (no GTUBE symbol; "${v.action}", ${scored(v)}): this check cannot show that spam is refused`, fix: 'gtube_patterns = "reject" (rspamd 3.8 and later; "disabled" turns it off) in local.d/options.inc' };
  }
  if (v.action === "reject") {
    if (v.score > 0) return { part: "spam-filter", status: "ok", found: `GTUBE: "reject" (reject at score ${v.score.toFixed(2)}): the relay refuses what rspamd rejects while the sender is connected (550 5.7.1)` };
    return {
      part: "spam-filter",
      status: "warn",
      found: 'GTUBE: "reject", but the reject action has no threshold (reject = null in actions.conf): rspamd rejects test patterns only, no spam ever scores "reject", and the relay refuses none while the sender is connected (spam is delivered with X-Spam: Yes, into Junk)',
      fix: "reject = 15; (rspamd's default) in local.d/actions.conf, if spam should be refused",
    };
  }
  if (v.action === "discard") return { part: "spam-filter", status: "ok", found: 'GTUBE: "discard": the relay refuses it like reject, while the sender is connected (550 5.7.1)' };
  return {
    part: "spam-filter",
    status: "warn",
    found: `GTUBE got "${v.action}", not "reject": ${meaning(v.action)}: the operator's rspamd settings (actions.conf, force_actions, a settings rule for this recipient) turn rspamd's reject into that`,
    fix: "reject = 15; (rspamd's default) in local.d/actions.conf, and no rule that lowers GTUBE's action",
  };
}

/** What the relay does with a message of this action while its sender is connected (spam-verdict.ts). */
function meaning(action: string): string {
  if (action === "soft reject" || action === "greylist") return "the relay defers it (451) or delivers it, never refuses it";
  if (action === "add header" || action === "rewrite subject") return "the relay delivers it with X-Spam: Yes (into Junk), refusing nothing while the sender is connected";
  return "the relay delivers it as ham";
}
