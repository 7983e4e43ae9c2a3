// A client that starts an upload and then stops sending: the request line, the headers and a few
// bytes of the message, over a raw socket, and nothing more. Used to show that such a client costs
// only its own request (tests, bench/stall.ts).

import type { Socket } from "bun";

export interface StalledUpload {
  /** The relay's whole answer (status line, headers, body) once it has sent one, or what came before the socket closed. */
  answer: Promise<string>;
  /** Everything received so far. */
  received(): string;
  close(): void;
}

export interface StalledUploadOptions {
  url: string;
  path: string;
  headers: Record<string, string>;
  /** Bytes of the message sent before stalling. */
  sent: Uint8Array;
  /** Content-Length declared (larger than `sent`), or "chunked": one chunk, then silence. */
  length: number | "chunked";
}

export async function stalledUpload(o: StalledUploadOptions): Promise<StalledUpload> {
  const u = new URL(o.url);
  let text = "";
  let settle!: (s: string) => void;
  const answer = new Promise<string>((resolve) => (settle = resolve));
  const complete = () => {
    const end = text.indexOf("\r\n\r\n");
    if (end === -1) return false;
    const length = /\r\ncontent-length:\s*(\d+)/i.exec(text.slice(0, end))?.[1];
    return length !== undefined && Buffer.byteLength(text.slice(end + 4), "latin1") >= Number(length);
  };
  const socket: Socket<undefined> = await Bun.connect({
    hostname: u.hostname,
    port: Number(u.port),
    socket: {
      data(_s, chunk) {
        text += Buffer.from(chunk).toString("latin1");
        if (complete()) settle(text);
      },
      close: () => settle(text),
      end: () => settle(text),
      error: () => settle(text),
    },
  });
  const head = [`POST ${o.path} HTTP/1.1`, `Host: ${u.host}`, ...Object.entries(o.headers).map(([k, v]) => `${k}: ${v}`)];
  head.push(o.length === "chunked" ? "Transfer-Encoding: chunked" : `Content-Length: ${o.length}`);
  const start = Buffer.from(head.join("\r\n") + "\r\n\r\n", "latin1");
  const body = o.length === "chunked" ? Buffer.concat([Buffer.from(`${o.sent.length.toString(16)}\r\n`), o.sent, Buffer.from("\r\n")]) : o.sent;
  socket.write(Buffer.concat([start, body]));
  return { answer, received: () => text, close: () => socket.end() };
}

/** The status code of a raw HTTP answer ("HTTP/1.1 503 ..." -> 503), or null. */
export function statusOf(answer: string): number | null {
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(answer);
  return m ? Number(m[1]) : null;
}

/** The JSON body of a raw HTTP answer. */
export function jsonOf(answer: string): Record<string, unknown> {
  return JSON.parse(answer.slice(answer.indexOf("\r\n\r\n") + 4));
}
