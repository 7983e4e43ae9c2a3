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

describe("the sending server, from Email Routing's own Received", () => {
  const senderOf = async (text: string) => (await peekHeaders(enc(text))).info.sender;
  // As public captures show it: folded with eight spaces after the address and after the id.
  const CF = "Received: from mail-sor-f41.google.com (209.85.220.41)\r\n        by cloudflare-email.net (cloudflare) id AuYfoj6x77E4\r\n        for <u@example.com>; Fri, 25 Sep 2026 05:07:50 +0000\r\n";

  test("the topmost Received that Cloudflare wrote gives the address and the HELO name", async () => {
    expect(await senderOf(`${CF}From: a@b.test\r\nSubject: s\r\n\r\nbody`)).toEqual({ ip: "209.85.220.41", helo: "mail-sor-f41.google.com" });
  });

  test("IPv6, bracketed addresses and an IPv6: tag; the HELO as written (an address literal too)", async () => {
    expect(await senderOf("Received: from EUR05-VI1-obe.outbound.protection.outlook.com (2a01:111:f403:2e13::801) by cloudflare-email.net (unknown) id UFO8pL3RM170 for <p@r.test>; Sat, 17 Aug 2024 10:40:14 +0000\r\n\r\n")).toEqual({
      ip: "2a01:111:f403:2e13::801",
      helo: "EUR05-VI1-obe.outbound.protection.outlook.com",
    });
    expect(await senderOf("Received: from deadsett.com ([34.85.88.131])\n by cloudflare-email.net (cloudflare) id x\n\n")).toEqual({ ip: "34.85.88.131", helo: "deadsett.com" });
    expect(await senderOf("Received: from [192.0.2.7] ([IPv6:2001:DB8::1]) by cloudflare-email.net; Sat, 1 Mar 2025 12:00:00 +0000\r\n\r\n")).toEqual({ ip: "2001:db8::1", helo: "[192.0.2.7]" });
  });

  test("a field folded anywhere, with tabs, LF or CRLF line ends", async () => {
    expect(await senderOf("received:\tfrom\r\n\thelo.example.org\r\n (198.51.100.9)\r\n\tby cloudflare-email.net\r\n\r\n")).toEqual({ ip: "198.51.100.9", helo: "helo.example.org" });
    expect(await senderOf("RECEIVED : from h.example (198.51.100.9)\n by\n cloudflare-email.net\nX: y\n\n")).toEqual({ ip: "198.51.100.9", helo: "h.example" });
  });

  test("only the topmost Received counts: one Cloudflare's below another server's is not taken", async () => {
    const forged = "Received: from forged.example (203.0.113.66) by cloudflare-email.net (cloudflare) id F\r\n";
    expect(await senderOf(`Received: from relay.example (relay.example [192.0.2.1]) by mx.example (Postfix)\r\n${forged}\r\nbody`)).toBeNull();
    // The sender's own copy below Cloudflare's changes nothing.
    expect(await senderOf(`${CF}${forged}From: a@b.test\r\n\r\n`)).toEqual({ ip: "209.85.220.41", helo: "mail-sor-f41.google.com" });
    // Other fields above Cloudflare's Received do not hide it (it is still the topmost Received).
    expect(await senderOf(`ARC-Seal: i=1; a=rsa-sha256; d=cloudflare-email.net\r\n${CF}\r\n`)).toEqual({ ip: "209.85.220.41", helo: "mail-sor-f41.google.com" });
  });

  test("none, another server's, another name that only looks like Cloudflare's, or no valid address: null", async () => {
    for (const text of [
      "Subject: none\r\n\r\nbody",
      "Received: from a.example (a.example [192.0.2.1]) by mx.example (Postfix) with ESMTP\r\n\r\n",
      "Received: from a.example (192.0.2.1) by cloudflare-email.net.evil.example\r\n\r\n",
      "Received: from a.example (192.0.2.1) by not-cloudflare-email.net\r\n\r\n",
      "Received: from a.example (999.0.2.1) by cloudflare-email.net\r\n\r\n",
      "Received: from a.example (2001:db8::g) by cloudflare-email.net\r\n\r\n",
      "Received: from (192.0.2.1) by cloudflare-email.net\r\n\r\n",
      "Received: by cloudflare-email.net; Sat, 1 Mar 2025\r\n\r\n",
      "Received: from h\xe9lo.example (192.0.2.1) by cloudflare-email.net\r\n\r\n",
      // In the body, not the header block.
      "Subject: s\r\n\r\nReceived: from a.example (192.0.2.1) by cloudflare-email.net\r\n",
      // A continuation line is not the start of a field.
      "X-Note: see\r\n Received: from a.example (192.0.2.1) by cloudflare-email.net\r\n\r\n",
    ]) {
      expect({ text, sender: await senderOf(text) }).toEqual({ text, sender: null });
    }
  });

  test("the same from a stream in 1-byte chunks", async () => {
    expect((await peekHeaders(chunked(enc(`${CF}Subject: s\r\n\r\nbody`), 1))).info.sender).toEqual({ ip: "209.85.220.41", helo: "mail-sor-f41.google.com" });
  });
});

describe("the line end of the message", () => {
  const lineEndOf = async (text: string) => (await peekHeaders(enc(text))).info.lineEnd;
  test("that of the first line: CRLF or a bare LF", async () => {
    expect(await lineEndOf("Subject: s\r\n\r\nbody\nbare")).toBe("\r\n");
    expect(await lineEndOf("Subject: s\nX: y\r\n\nbody")).toBe("\n");
    expect(await lineEndOf("\nbody")).toBe("\n");
  });
  test("no line end at all: CRLF, the line end of mail on the wire", async () => {
    expect(await lineEndOf("Subject: only")).toBe("\r\n");
    expect(await lineEndOf("")).toBe("\r\n");
  });
});
