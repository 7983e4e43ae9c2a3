// The contract's pure parts: what the envelope and JSON schemas accept.

import { describe, expect, test } from "bun:test";
import { maxJsonBytes } from "../shared/app.ts";
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  EnvelopeHeaders,
  InboundEnvelope,
  InboundJsonBody,
  MAX_ENVELOPE_TO_BYTES,
  MAX_RECIPIENTS,
  addressProblem,
  base64Problem,
  describeIssues,
  headerText,
  headerValue,
  loneSurrogateAt,
  mailboxKey,
} from "../shared/contract.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

describe("addressProblem", () => {
  test("accepts ordinary and UTF-8 addresses", () => {
    expect(addressProblem("user@kuma8088.com")).toBeNull();
    expect(addressProblem("a.b+tag@sub.example.org")).toBeNull();
    expect(addressProblem("用户@例子.广告")).toBeNull();
  });

  test.each([
    ["CR", "a@x\rRCPT TO:<evil@x>"],
    ["LF", "a@x\nRCPT TO:<evil@x>"],
    ["CRLF", "a@x\r\nRCPT TO:<evil@x>"],
    ["NUL", "a\0@x"],
    ["TAB", "a\t@x"],
    ["DEL", "a\x7f@x"],
    ["<", "a<b@x"],
    [">", "a@x>"],
    ["space", "a b@x"],
    ["comma", "a,b@x"],
  ])("refuses %s", (_name, address) => {
    expect(addressProblem(address)).toContain("forbidden character");
  });

  test("length limits: local part 64, whole address 254", () => {
    expect(addressProblem(`${"a".repeat(64)}@x.example`)).toBeNull();
    expect(addressProblem(`${"a".repeat(65)}@x.example`)).toContain("local part of 65");
    const max = `a@${"b".repeat(252)}`;
    expect(max.length).toBe(254);
    expect(addressProblem(max)).toBeNull();
    expect(addressProblem(max + "b")).toContain("255 characters");
  });

  test("needs local@domain", () => {
    for (const a of ["", "nobody", "@x", "a@"]) expect(addressProblem(a)).not.toBeNull();
  });
});

describe("InboundEnvelope", () => {
  test("null sender: empty and <> both become the empty sender", () => {
    expect(InboundEnvelope.parse({ from: "", to: "a@x" }).from).toBe("");
    expect(InboundEnvelope.parse({ from: "<>", to: "a@x" }).from).toBe("");
  });

  test("a comma list and an array give the same recipients; brackets and blanks go, duplicates too", () => {
    expect(InboundEnvelope.parse({ from: "s@x", to: " <a@x>, b@y ,a@x" }).to).toEqual(["a@x", "b@y"]);
    expect(InboundEnvelope.parse({ from: "s@x", to: ["a@x", "<b@y>"] }).to).toEqual(["a@x", "b@y"]);
  });

  test("a trailing CR or LF is refused, not trimmed away", () => {
    for (const to of ["a@x\n", "a@x\r\n", "\r\na@x", "a@x\r"]) {
      const r = InboundEnvelope.safeParse({ from: "s@x", to });
      expect(r.success).toBe(false);
    }
    expect(InboundEnvelope.safeParse({ from: "s@x\n", to: "a@x" }).success).toBe(false);
    expect(InboundEnvelope.safeParse({ from: "<s@x>\r\n", to: "a@x" }).success).toBe(false);
  });

  test(`at most ${MAX_RECIPIENTS} recipients`, () => {
    const list = (n: number) => Array.from({ length: n }, (_, i) => `u${i}@x`);
    expect(InboundEnvelope.parse({ from: "s@x", to: list(MAX_RECIPIENTS) }).to).toHaveLength(MAX_RECIPIENTS);
    const r = InboundEnvelope.safeParse({ from: "s@x", to: list(MAX_RECIPIENTS + 1).join(",") });
    expect(r.success).toBe(false);
    if (!r.success) expect(describeIssues(r.error)).toBe(`to: has more than ${MAX_RECIPIENTS} recipients`);
  });

  test("empty recipient lists are refused", () => {
    for (const to of ["", ",", " , ", []]) expect(InboundEnvelope.safeParse({ from: "s@x", to }).success).toBe(false);
  });
});

describe("EnvelopeHeaders", () => {
  test("issues name the header", () => {
    const r = EnvelopeHeaders.safeParse({ "x-envelope-from": "s@x" });
    expect(r.success).toBe(false);
    if (!r.success) expect(describeIssues(r.error)).toBe("x-envelope-to: is required");
  });
});

describe("InboundJsonBody", () => {
  const issues = (body: unknown) => {
    const r = InboundJsonBody.safeParse(body);
    if (r.success) throw new Error(`expected a refusal for ${JSON.stringify(body)}`);
    return describeIssues(r.error);
  };

  test("the runbook's body parses", () => {
    const b = InboundJsonBody.parse({
      from: "test@example.com",
      to: "user@kuma8088.com",
      subject: "Test Email",
      raw: "From: test@example.com\r\n\r\nhi",
      timestamp: "2025-11-12T10:00:00Z",
    });
    expect(b.to).toEqual(["user@kuma8088.com"]);
  });

  test("an empty object names every missing field, raw included", () => {
    const m = issues({});
    expect(m).toContain("from: is required");
    expect(m).toContain("to: is required");
    expect(m).toContain("raw: exactly one of raw and raw_base64 is required");
  });

  test("exactly one of raw and raw_base64", () => {
    expect(issues({ from: "a@x", to: "b@x" })).toBe("raw: exactly one of raw and raw_base64 is required");
    expect(issues({ from: "a@x", to: "b@x", raw: "x", raw_base64: "eA==" })).toBe("raw: exactly one of raw and raw_base64 is required");
  });

  test("a body that is not an object says so", () => {
    for (const body of [null, 42, "text", []]) expect(issues(body)).toBe("the request body must be a JSON object with from, to and raw");
  });

  test("wrong types are named", () => {
    expect(issues({ from: "a@x", to: 5, raw: "x" })).toBe("to: must be an address or a list of addresses");
    expect(issues({ from: 1, to: "b@x", raw: "x" })).toBe("from: must be a string");
    expect(issues({ from: "a@x", to: "b@x", raw_base64: "not base64!" })).toBe('raw_base64: is not base64: "!" at character 10 is not a base64 character');
  });

  test("raw with a lone surrogate is refused (TextEncoder would write U+FFFD), a pair is not", () => {
    expect(issues({ from: "a@x", to: "b@x", raw: "Subject: x\r\n\r\n\ud800" })).toBe(
      'raw: contains a lone surrogate ("\\ud800") at character 14, which has no UTF-8 form: send the bytes as raw_base64',
    );
    expect(InboundJsonBody.safeParse({ from: "a@x", to: "b@x", raw: "Subject: \ud83d\ude00" }).success).toBe(true);
  });
});

describe("base64Problem: strict RFC 4648 base64", () => {
  test.each([
    ["padded", ["QUJD", "QUI=", "QQ=="]],
    ["wrapped at 76 with CRLF, blanks anywhere", ["QUJD\r\nREVG\n", " Q U J D ", "\tQQ==\r\n"]],
    ["empty (refused later as an empty message)", ["", " \r\n"]],
  ])("accepts %s", (_name, values) => {
    for (const v of values) expect(base64Problem(v)).toBeNull();
  });

  test.each([
    ["unpadded", "QQ", "2 base64 characters, not a multiple of 4"],
    ["a length of 4n+1", "QUJDR", "5 base64 characters, not a multiple of 4"],
    ["three = of padding", "QQ===", 'more than two "=" at character 4'],
    ["data after the padding", "QQ==QUJD", 'data after the "=" padding, at character 4'],
    ["padding in the middle", "Q=QQ", 'data after the "=" padding, at character 2'],
    ["stray bits before ==", "QR==", "stray bits after the last byte"],
    ["stray bits before =", "QUJ=", "stray bits after the last byte"],
    ["base64url's -", "ab-_", '"-" at character 2 is not a base64 character'],
    ["a form feed", "QUJD\f", '"\\f" at character 4 is not a base64 character'],
    ["a non-ASCII letter", "QUJé", '"é" at character 3 is not a base64 character'],
  ])("refuses %s", (_name, value, problem) => {
    expect(base64Problem(value)).toStartWith(problem);
  });

  test("agrees with atob on every value it accepts", () => {
    const bytes = Uint8Array.from({ length: 300 }, (_, i) => (i * 37) % 256);
    for (let n = 0; n <= bytes.length; n += 7) {
      const b64 = Buffer.from(bytes.subarray(0, n)).toString("base64");
      expect(base64Problem(b64)).toBeNull();
      expect(atob(b64)).toBe(Buffer.from(bytes.subarray(0, n)).toString("latin1"));
    }
  });
});

describe("validation in linear time, at the full JSON limit", () => {
  // maxJsonBytes of the default 25 MiB: about 51 MiB. The patterns these checks replaced were
  // quadratic in such inputs (hours); here each is answered in one pass.
  const n = maxJsonBytes(DEFAULT_MAX_MESSAGE_BYTES);

  test("raw_base64: blanks up to the limit, then one bad character -> refused, naming where", () => {
    expect(base64Problem(" ".repeat(n) + "!")).toBe(`"!" at character ${n} is not a base64 character`);
    expect(base64Problem("\r\n".repeat(n / 2) + "QQ==")).toBeNull();
    expect(base64Problem("A".repeat(n) + "!")).toBe(`"!" at character ${n} is not a base64 character`);
  });

  test("an address with blanks up to the limit inside it -> refused by its length", () => {
    const to = `x${" ".repeat(n)}y@x`;
    const r = InboundEnvelope.safeParse({ from: "s@x", to });
    expect(r.success).toBe(false);
    if (!r.success) expect(describeIssues(r.error)).toEndWith(`is ${to.length} characters long (at most 254)`);
  });

  test("raw: a lone surrogate after the limit's worth of text is found", () => {
    expect(loneSurrogateAt("a".repeat(n) + "\udc00")).toBe(n);
    expect(loneSurrogateAt("\ud83d\ude00".repeat(n / 4))).toBe(-1);
  });
});

describe("recipients: one per mailbox, as Dovecot's default auth_username_format %Lu resolves them", () => {
  const to = (list: string | string[]) => InboundEnvelope.parse({ from: "s@x", to: list }).to;

  test("spellings that differ in ASCII case are one recipient; the first is kept", () => {
    expect(to("User@Example.Test, user@example.test, USER@EXAMPLE.TEST")).toEqual(["User@Example.Test"]);
    expect(to(["b@x", "a@x", "B@X"])).toEqual(["b@x", "a@x"]);
    expect(mailboxKey("Jürgen@Example.TEST")).toBe("jürgen@example.test");
  });

  test("letters outside ASCII are not folded (Dovecot's tolower is ASCII only): two recipients", () => {
    expect(to("jürgen@x, JÜRGEN@x, Jürgen@x")).toEqual(["jürgen@x", "JÜRGEN@x"]);
  });
});

describe(`MAX_ENVELOPE_TO_BYTES: the recipients as X-Envelope-To fit in ${MAX_ENVELOPE_TO_BYTES} bytes`, () => {
  /** Distinct addresses that take exactly `total` bytes joined with ", ". */
  const listOf = (total: number) => {
    const list = Array.from({ length: 41 }, (_, i) => `r${i}`.padEnd(40, "x") + "@" + "d".repeat(152) + ".com");
    const rest = total - list.join(", ").length;
    list[0] = list[0]!.replace("@", "@" + "d".repeat(rest));
    return list;
  };

  test("exactly the limit passes; one byte more is refused, saying how many", () => {
    expect(listOf(MAX_ENVELOPE_TO_BYTES).join(", ").length).toBe(MAX_ENVELOPE_TO_BYTES);
    expect(listOf(MAX_ENVELOPE_TO_BYTES + 1).every((a) => addressProblem(a) === null)).toBe(true);
    expect(InboundEnvelope.safeParse({ from: "s@x", to: listOf(MAX_ENVELOPE_TO_BYTES) }).success).toBe(true);
    const r = InboundEnvelope.safeParse({ from: "s@x", to: listOf(MAX_ENVELOPE_TO_BYTES + 1) });
    expect(r.success).toBe(false);
    if (!r.success) expect(describeIssues(r.error)).toBe(`to: 41 recipients take ${MAX_ENVELOPE_TO_BYTES + 1} bytes as "a, b" (X-Envelope-To), more than ${MAX_ENVELOPE_TO_BYTES}: send the message in several requests`);
  });

  test("duplicates dropped first: a list that fits once deduplicated passes", () => {
    const list = listOf(MAX_ENVELOPE_TO_BYTES);
    expect(InboundEnvelope.parse({ from: "s@x", to: [...list, list[1]!.toUpperCase()] }).to).toEqual(list);
  });
});

describe("envelope headers carry UTF-8", () => {
  test("in Bun a header value is bytes: headerValue writes UTF-8, headerText reads it back", () => {
    expect(headerValue("jürgen@x")).toBe("j\xc3\xbcrgen@x");
    expect(headerText("j\xc3\xbcrgen@x")).toBe("jürgen@x");
    expect(headerText(headerValue("用户@例子.广告, a@x"))).toBe("用户@例子.广告, a@x");
    expect(headerValue("plain@x")).toBe("plain@x");
  });

  test("bytes that are not UTF-8 are refused (null), never U+FFFD", () => {
    expect(headerText("j\xfcrgen@x")).toBeNull(); // Latin-1
    expect(headerText("a@x\xc3")).toBeNull(); // cut short
    expect(headerText("\xc0\xaf@x")).toBeNull(); // overlong
    expect(headerText("\xed\xa0\x80@x")).toBeNull(); // an encoded surrogate
  });

  test("addresses with a lone surrogate are refused", () => {
    expect(addressProblem("a\ud800@x")).toBe('contains a lone surrogate ("\\ud800"), which has no UTF-8 form');
  });
});
