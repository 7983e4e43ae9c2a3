// Deterministic test messages: realistic header block (Received, DKIM-Signature, From, To, Subject,
// Date, Message-ID, MIME) and a text body of CRLF lines, mostly ASCII with some UTF-8 lines.
// Every message of a run has its own Message-ID (the host suppresses duplicates by Message-ID, so
// a repeated one would be answered "duplicate" and never reach Dovecot).
// The body is built once per size from a seeded PRNG; a message is its header block + that body.

export const SENDER = "sender@example.org";
export const RECIPIENT = "user@kuma8088.com";

const encoder = new TextEncoder();

/** mulberry32: small, fast, deterministic. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = (
  "the of and to in is that for it as with was on be by at this from or have an they which one you were " +
  "her all she there would their we him been has when who will more no if out so said what up its about " +
  "into than them can only other new some could time these two may then do first any my now such like our " +
  "over man me even most made after also did many before must through back years where much your way well " +
  "down should because each just those people how too little state good very make world still own see men " +
  "work long get here between both life being under never day same another know while last might us great " +
  "server mailbox delivery invoice meeting schedule report quarterly attached please regards thanks"
).split(" ");

const JAPANESE = [
  "お世話になっております。ご確認のほどよろしくお願いいたします。",
  "会議の日程について、来週の火曜日はいかがでしょうか。",
  "添付の資料をご覧ください。不明な点があればご連絡ください。",
];

/** A block of body lines (CRLF) of about `bytes` bytes, ending at a line end. */
function bodyBlock(seed: number, bytes: number): string {
  const rnd = prng(seed);
  const lines: string[] = [];
  let total = 0;
  let lineNo = 0;
  while (total < bytes) {
    let line: string;
    if (lineNo % 23 === 22) line = "";
    else if (lineNo % 17 === 9) line = JAPANESE[Math.floor(rnd() * JAPANESE.length)]!;
    else {
      const target = 50 + Math.floor(rnd() * 26);
      line = "";
      while (line.length < target) line += (line ? " " : "") + WORDS[Math.floor(rnd() * WORDS.length)]!;
      line = line[0]!.toUpperCase() + line.slice(1) + ".";
    }
    lines.push(line);
    total += encoder.encode(line).length + 2;
    lineNo++;
  }
  return lines.join("\r\n") + "\r\n";
}

function base64ish(seed: number, n: number): string {
  const rnd = prng(seed);
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  let s = "";
  for (let i = 0; i < n; i++) s += abc[Math.floor(rnd() * 64)];
  return s;
}

/** The header block, same length for every index (the Message-ID's number is zero-padded). */
export function headerBlock(tag: string, index: number, size: number): string {
  const id = `${tag}.${String(index).padStart(8, "0")}`;
  const sig = base64ish(7, 344);
  const folded = sig.match(/.{1,72}/g)!.join("\r\n\t ");
  return [
    `Received: from mail-sor-f41.example.net (mail-sor-f41.example.net [192.0.2.41])`,
    `\tby mx.cloudflare.net (Postfix) with ESMTPS id 4XbQ1m2Zz9z1XLf`,
    `\tfor <${RECIPIENT}>; Thu, 28 Nov 2024 12:00:00 +0000 (UTC)`,
    `DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=20230601;`,
    `\th=from:to:subject:date:message-id:mime-version; bh=${base64ish(3, 43)}=;`,
    `\tb=${folded}`,
    `From: "Bench Sender" <${SENDER}>`,
    `To: <${RECIPIENT}>`,
    `Subject: Benchmark message ${id} (${size} bytes)`,
    `Date: Thu, 28 Nov 2024 12:00:00 +0000`,
    `Message-ID: <${id}@bench.example.org>`,
    `MIME-Version: 1.0`,
    `Content-Type: text/plain; charset=utf-8`,
    `Content-Transfer-Encoding: 8bit`,
    ``,
    ``,
  ].join("\r\n");
}

/** Body bytes so that header + body is exactly `size` bytes; the body ends with CRLF. */
function fillBody(block: Uint8Array, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let o = 0;
  while (o < bytes) {
    const n = Math.min(block.length, bytes - o);
    out.set(block.subarray(0, n), o);
    o += n;
  }
  fixEnd(out);
  return out;
}

/** Make the last bytes a clean line end (a cut may have split a UTF-8 character or a CRLF). */
function fixEnd(out: Uint8Array): void {
  if (out.length < 2) return;
  // Back up over the last (possibly partial) line and replace it with ASCII filler.
  const start = out.lastIndexOf(0x0a, out.length - 2) + 1;
  for (let i = start; i < out.length - 2; i++) out[i] = 0x78; // 'x'
  out[out.length - 2] = 0x0d;
  out[out.length - 1] = 0x0a;
}

const blocks = new Map<number, Uint8Array>();
function block(): Uint8Array {
  let b = blocks.get(64);
  if (!b) blocks.set(64, (b = encoder.encode(bodyBlock(42, 64 * 1024))));
  return b;
}

/**
 * A factory of messages of exactly `size` bytes: message(i) shares one body buffer and differs in
 * its header block (Message-ID, Subject).
 */
export function messageFactory(tag: string, size: number): (index: number) => Uint8Array<ArrayBuffer> {
  const headLen = encoder.encode(headerBlock(tag, 0, size)).length;
  if (size <= headLen + 2) throw new Error(`message size ${size} is smaller than its header block`);
  const body = fillBody(block(), size - headLen);
  return (index) => {
    const head = encoder.encode(headerBlock(tag, index, size));
    const out = new Uint8Array(size);
    out.set(head, 0);
    out.set(body, head.length);
    return out;
  };
}

/** Yields a message of exactly `size` bytes in chunks of at most `chunk` bytes, from one 64 KiB block. */
export function* streamedMessage(tag: string, size: number, chunk = 64 * 1024): Generator<Uint8Array> {
  const head = encoder.encode(headerBlock(tag, 0, size));
  yield head;
  let left = size - head.length;
  // The repeated unit ends at a line end, so chunks join into whole lines (and whole UTF-8 characters).
  const full = block();
  const b = full.subarray(0, full.lastIndexOf(0x0a, Math.min(chunk, full.length) - 1) + 1);
  // The final piece gets a clean line end; it is small, so building it is cheap.
  while (left > 0) {
    const n = Math.min(b.length, left);
    if (n === left) {
      const last = b.slice(0, n);
      fixEnd(last);
      yield last;
    } else yield b.subarray(0, n);
    left -= n;
  }
}
