// What a verdict means (host/spam-verdict.ts, pure): refused, deferred or delivered, live and
// already accepted, for each of rspamd's actions; and the header fields prepended: their names,
// their line ends (the message's own), and nothing in them that could end a line or a field early.

import { describe, expect, test } from "bun:test";
import type { Verdict } from "../host/spam-scan.ts";
import { treatment, verdictFields } from "../host/spam-verdict.ts";

const verdict = (over: Partial<Verdict> = {}): Verdict => ({ action: "no action", score: 1.5, required: 15, symbols: [], addHeaders: [], smtpMessage: null, ...over });
const GREYLISTED = { name: "GREYLIST", score: 0, options: ["greylisted", "Thu, 01 Jan 2099 00:00:00 UTC", "new record"] };
const text = (b: Uint8Array) => new TextDecoder().decode(b);

describe("treatment", () => {
  const cases: [string, Partial<Verdict>, string, string][] = [
    // action, verdict, live, already accepted
    ["reject", { action: "reject" }, "refuse", "deliver spam"],
    ["discard (rspamd would drop it silently; the sender is told instead)", { action: "discard" }, "refuse", "deliver spam"],
    ["soft reject", { action: "soft reject" }, "defer", "deliver ham"],
    ["greylist, greylisted by rspamd's greylist module", { action: "greylist", symbols: [GREYLISTED] }, "defer", "deliver ham"],
    ["greylist, a score band only (no greylisting memory: a retry would come back the same)", { action: "greylist" }, "deliver ham", "deliver ham"],
    ["greylist after the module let it pass", { action: "greylist", symbols: [{ name: "GREYLIST", score: 0, options: ["greylisted", "passed"] }] }, "deliver ham", "deliver ham"],
    ["add header", { action: "add header" }, "deliver spam", "deliver spam"],
    ["rewrite subject", { action: "rewrite subject" }, "deliver spam", "deliver spam"],
    ["no action", { action: "no action" }, "deliver ham", "deliver ham"],
    ["an action rspamd 3.4 does not name", { action: "tag as weird" }, "deliver ham", "deliver ham"],
  ];
  const shown = (t: ReturnType<typeof treatment>) => (t.is === "deliver" ? `deliver ${t.spam ? "spam" : "ham"}` : t.is);
  test.each(cases)("%s", (_, over, live, accepted) => {
    expect(shown(treatment(verdict(over), false))).toBe(live);
    expect(shown(treatment(verdict(over), true))).toBe(accepted);
  });

  test("a refusal is 550 5.7.1 naming the filter and the score, with rspamd's reason; a deferral 451 4.7.1", () => {
    const refused = treatment(verdict({ action: "reject", score: 15, required: 15, smtpMessage: "Gtube pattern" }), false);
    expect(refused).toEqual({ is: "refuse", reply: "550 5.7.1 Message refused as spam by the spam filter (rspamd, score 15.00 of 15.00): Gtube pattern" });
    const deferred = treatment(verdict({ action: "soft reject", score: 0, smtpMessage: null }), false);
    expect(deferred).toEqual({ is: "defer", reply: "451 4.7.1 Try again later: deferred by the spam filter (rspamd: soft reject, score 0.00 of 15.00)" });
  });

  test("rspamd's reason cannot break the reply line", () => {
    const t = treatment(verdict({ action: "reject", smtpMessage: "bad\r\n250 OK\x00 caf\u00e9" }), false);
    expect(t.is === "refuse" && t.reply).toEndWith(": bad??250 OK? caf?");
  });
});

describe("the prepended fields", () => {
  test("a verdict: X-Spam-Status and X-Spamd-Result (every symbol, folded), CRLF like the message", () => {
    const v = verdict({
      action: "no action",
      score: 2.2,
      symbols: [
        { name: "MIME_GOOD", score: -0.1, options: ["text/plain"] },
        { name: "R_SPF_ALLOW", score: -0.2, options: ["+ip4:203.0.113.5"] },
      ],
    });
    expect(text(verdictFields(v, "\r\n"))).toBe(
      'X-Spam-Status: No, score=2.20 required=15.00 action="no action"\r\n' +
        "X-Spamd-Result: default: False [2.20 / 15.00];\r\n\tMIME_GOOD(-0.10)[text/plain];\r\n\tR_SPF_ALLOW(-0.20)[+ip4:203.0.113.5]\r\n",
    );
  });

  test("LF like a message with bare LF line ends", () => {
    const fields = text(verdictFields(verdict({ symbols: [{ name: "A", score: 0, options: [] }] }), "\n"));
    expect(fields).not.toContain("\r");
    expect(fields).toBe('X-Spam-Status: No, score=1.50 required=15.00 action="no action"\nX-Spamd-Result: default: False [1.50 / 15.00];\n\tA(0.00)[]\n');
  });

  test("spam gets X-Spam: Yes; ham does not", () => {
    expect(text(verdictFields(verdict({ action: "add header", score: 7 }), "\r\n"))).toContain("\r\nX-Spam: Yes\r\n");
    expect(text(verdictFields(verdict({ action: "reject", score: 15 }), "\r\n"))).toStartWith("X-Spam-Status: Yes, score=15.00");
    expect(text(verdictFields(verdict({ action: "greylist" }), "\r\n"))).not.toContain("X-Spam: Yes");
  });

  test("no verdict: X-Spam-Status: Unknown with the reason, nothing else", () => {
    expect(text(verdictFields({ failed: "no answer within 10000 ms" }, "\n"))).toBe("X-Spam-Status: Unknown, not scanned (rspamd: no answer within 10000 ms)\n");
  });

  test("rspamd's milter fields follow, in order, refolded with the message's line end; ours are not written twice", () => {
    const v = verdict({
      action: "add header",
      addHeaders: [
        { name: "Authentication-Results", value: "rspamd.test;\n\tspf=pass smtp.mailfrom=example.org;\r\n\tdkim=none" },
        { name: "X-Spam-Status", value: "Yes, score=7" },
        { name: "x-spam", value: "Yes" },
        { name: "X-Rspamd-Server", value: "rspamd.test" },
      ],
    });
    const fields = text(verdictFields(v, "\r\n")).split("X-Spam: Yes\r\n")[1];
    expect(fields).toBe("Authentication-Results: rspamd.test;\r\n\tspf=pass smtp.mailfrom=example.org;\r\n\tdkim=none\r\nX-Rspamd-Server: rspamd.test\r\n");
  });

  test("nothing from rspamd can end a field early, start another one or carry 8-bit bytes", () => {
    const v = verdict({
      symbols: [{ name: "EVIL\r\nX-Spam: No", score: 1, options: ["a\r\nX-Injected: 1", "caf\u00e9\u0000", "x],y", ...Array.from({ length: 10 }, (_, i) => `o${i}`)] }],
      addHeaders: [
        { name: "Bad Name", value: "v" },
        { name: "X-Colon:", value: "v" },
        { name: "X-Value", value: "first\r\nX-Injected: 2\n\n\tcontinued\u00ff" },
      ],
    });
    const fields = text(verdictFields(v, "\r\n"));
    expect(fields).toMatch(/^[\x20-\x7e\t\r\n]*$/);
    // Every line is a field of ours or a continuation line (starting with a blank).
    const starts = fields.split("\r\n").filter(Boolean).filter((l) => !/^[ \t]/.test(l)).map((l) => l.split(":")[0]);
    expect(starts).toEqual(["X-Spam-Status", "X-Spamd-Result", "X-Value"]);
    expect(fields).toContain("EVIL??X-Spam: No(1.00)[a??X-Injected: 1,caf??,x??y,o0,o1,o2,o3,o4,...]");
    expect(fields).toContain("X-Value: first\r\n\tX-Injected: 2\r\n\tcontinued?\r\n");
  });
});
