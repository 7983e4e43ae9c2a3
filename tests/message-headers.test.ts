// The header peek behind duplicate suppression: which Message-ID it finds, and that the bytes it
// hands on are the input's, from the first one, however the input was chunked.

import { describe, expect, test } from "bun:test";
import { peekHeaders } from "../host/message-headers.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const enc = (s: string) => new Uint8Array(Buffer.from(s, "latin1"));

function chunked(bytes: Uint8Array, size: number): ReadableStream<Uint8Array> {
  let off = 0;
  return new ReadableStream({
    pull(c) {
      if (off >= bytes.length) return c.close();
      c.enqueue(bytes.slice(off, off + size));
      off += size;
    },
  });
}

async function idOf(text: string): Promise<string | null> {
  return (await peekHeaders(enc(text))).info.messageId;
}

describe("Message-ID", () => {
  test("found whatever the case of the field name and the spacing before the colon", async () => {
    expect(await idOf("From: a@b.test\r\nMessage-ID: <one@x.test>\r\n\r\nbody\r\n")).toBe("<one@x.test>");
    expect(await idOf("message-id:<two@x.test>\n\nbody\n")).toBe("<two@x.test>");
    expect(await idOf("MESSAGE-ID \t:  <three@x.test>  \r\n\r\n")).toBe("<three@x.test>");
  });

  test("a folded field is unfolded", async () => {
    expect(await idOf("Message-ID:\r\n <folded@x.test>\r\nSubject: s\r\n\r\nb")).toBe("<folded@x.test>");
    expect(await idOf("Message-ID: <a\n\t@x.test>\n\nb")).toBe("<a\t@x.test>");
  });

  test("other fields that end in Message-ID, and a Message-ID in the body, are not taken", async () => {
    expect(await idOf("X-Original-Message-ID: <not@x.test>\r\nIn-Reply-To: <no@x.test>\r\n\r\nMessage-ID: <body@x.test>\r\n")).toBeNull();
    expect(await idOf("Subject: Message-ID: <inside@x.test>\r\n\r\n")).toBeNull();
  });

  test("none, or an empty one, is null", async () => {
    expect(await idOf("Subject: none\r\n\r\nbody")).toBeNull();
    expect(await idOf("Message-ID:   \r\n\r\nbody")).toBeNull();
    expect(await idOf("")).toBeNull();
  });

  test("8-bit bytes in the field give the same id every time (no decoding to U+FFFD)", async () => {
    // Both are invalid UTF-8 that a lossy decode would turn into the same "<\uFFFD\uFFFD@x.test>".
    const a = await idOf("Message-ID: <\x93\xfa@x.test>\r\n\r\n");
    const b = await idOf("Message-ID: <\x94\xfb@x.test>\r\n\r\n");
    expect(a).toBe(await idOf("Message-ID: <\x93\xfa@x.test>\r\n\r\n"));
    expect(a).not.toBe(b);
  });
});

describe("the bytes handed on", () => {
  const message = enc("Received: x\r\nMessage-ID: <stream@x.test>\r\nSubject: \x82\xa0\r\n\r\n.dot line\r\n" + "y".repeat(100_000) + "\r\nend");

  for (const size of [1, 7, 4096, 200_000]) {
    test(`a stream in ${size}-byte chunks: same id, same bytes from the first one`, async () => {
      const peeked = await peekHeaders(chunked(message, size));
      expect(peeked.info.messageId).toBe("<stream@x.test>");
      expect(peeked.body).toBeInstanceOf(ReadableStream);
      const out = new Uint8Array(await new Response(peeked.body as ReadableStream<Uint8Array>).arrayBuffer());
      expect(Buffer.from(out).equals(Buffer.from(message))).toBe(true);
    });
  }

  for (const size of [1, 2, 3]) {
    test(`the blank line is found across ${size}-byte chunks: a Message-ID in the body is never taken`, async () => {
      const bodyOnly = enc("Subject: s\r\nX: y\r\n\r\nMessage-ID: <in-body@x.test>\r\n");
      expect((await peekHeaders(chunked(bodyOnly, size))).info.messageId).toBeNull();
      const lf = enc("Subject: s\n\nMessage-ID: <in-body@x.test>\n");
      expect((await peekHeaders(chunked(lf, size))).info.messageId).toBeNull();
    });
  }

  test("a buffer is handed on as the same buffer", async () => {
    const peeked = await peekHeaders(message);
    expect(peeked.body).toBe(message);
    expect(peeked.info.messageId).toBe("<stream@x.test>");
  });

  test("a header block longer than 64 KiB: the id past the limit is not searched for, the bytes still pass", async () => {
    const long = enc("X-Pad: " + "p".repeat(70_000) + "\r\nMessage-ID: <late@x.test>\r\n\r\nbody");
    const peeked = await peekHeaders(chunked(long, 16_384));
    expect(peeked.info.messageId).toBeNull();
    const out = new Uint8Array(await new Response(peeked.body as ReadableStream<Uint8Array>).arrayBuffer());
    expect(out.length).toBe(long.length);
  });
});

describe("the sending server, from Cloudflare's topmost trace field (XFORWARD)", () => {
  const senderOf = async (text: string) => (await peekHeaders(enc(text))).info.sender;
  const CF = "Received: from mail-wm1-f43.google.com (209.85.128.43)\r\n        by cloudflare-email.net (unknown) id 4fIabc\r\n        for <a@x.test>; Tue, 02 Jul 2024 10:00:00 +0000\r\n";

  test("HELO and address from Cloudflare's field, folded over lines; IPv6 too", async () => {
    expect(await senderOf(`${CF}Subject: x\r\n\r\nbody\r\n`)).toEqual({ ip: "209.85.128.43", helo: "mail-wm1-f43.google.com" });
    expect(await senderOf("Received: from h.example (2a00:1450:4864:20::32b) by cloudflare-email.net (unknown) id x\n\n")).toEqual({ ip: "2a00:1450:4864:20::32b", helo: "h.example" });
  });

  test("only the topmost field: one the sender wrote lower down is never taken, nor one below another server's", async () => {
    // The sender's own forgery sits below Cloudflare's: Cloudflare's is used.
    expect(await senderOf(`${CF}Received: from forged.example (6.6.6.6) by cloudflare-email.net\r\n\r\n`)).toEqual({ ip: "209.85.128.43", helo: "mail-wm1-f43.google.com" });
    // The topmost is someone else's: nothing, even with a Cloudflare-looking field below it.
    expect(await senderOf("Received: from a (1.2.3.4) by other.example\r\nReceived: from b (5.6.7.8) by cloudflare-email.net\r\n\r\n")).toBeNull();
    // In the body: not a header at all.
    expect(await senderOf("Subject: x\r\n\r\nReceived: from h (1.2.3.4) by cloudflare-email.net\r\n")).toBeNull();
  });

  test("an address that is no IP address, or a by-host that merely starts like Cloudflare's: nothing", async () => {
    expect(await senderOf("Received: from h (999.1.1.1) by cloudflare-email.net\r\n\r\n")).toBeNull();
    expect(await senderOf("Received: from h (1.2.3.4) by cloudflare-email.net.evil.example\r\n\r\n")).toBeNull();
    expect(await senderOf("Subject: none\r\n\r\n")).toBeNull();
  });

  test("the same when the header block arrives in small chunks", async () => {
    const r = await peekHeaders(chunked(enc(`${CF}Subject: x\r\n\r\nbody\r\n`), 7));
    expect(r.info.sender).toEqual({ ip: "209.85.128.43", helo: "mail-wm1-f43.google.com" });
  });
});
