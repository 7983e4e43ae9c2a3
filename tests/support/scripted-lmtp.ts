// A raw line-based LMTP server that answers what a test scripts, for replies the fake LMTP server
// (fake-lmtp.ts, on smtp-server) cannot give: a garbage greeting, a 421 after the final dot, a
// reply split across packets or sent late, a server that stops reading.

import net from "node:net";

export interface Scripted {
  port: number;
  /** Every command line received (DATA payload lines excluded). */
  lines: string[];
  /** The message bytes received after a 354 (un-stuffed lines, CRLF). */
  messages: string[];
  connections: number;
  /** Resolves once a client socket closed (from either side). */
  closed: Promise<void>;
  /** Stops listening and drops every connection. */
  close(): Promise<void>;
}

/**
 * What a scripted server answers a line with: the bytes, or pieces written one by one a few ms
 * apart (a reply split across packets), or bytes written `afterMs` late and then, with `then`,
 * the connection ended or no longer read from; or null for no answer.
 */
export type ScriptedReply = string | string[] | { text: string; afterMs?: number; then?: "end" | "stop reading" } | null;

/**
 * reply(line, socket) gives the answer to a command line. A reply starting with "354" switches
 * the connection to message mode until "."; then reply(".") answers.
 * `delayMs`: every reply (and the greeting) is written that long after its command arrived.
 */
export async function startScripted(greeting: string | null, reply: (line: string, socket: net.Socket) => ScriptedReply, delayMs = 0): Promise<Scripted> {
  const sockets = new Set<net.Socket>();
  let closedResolve!: () => void;
  const s: Scripted = {
    port: 0,
    lines: [],
    messages: [],
    connections: 0,
    closed: new Promise<void>((r) => (closedResolve = r)),
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        for (const sock of sockets) sock.destroy();
      }),
  };
  const server = net.createServer((sock) => {
    s.connections++;
    sockets.add(sock);
    sock.on("error", () => {});
    sock.on("close", () => {
      sockets.delete(sock);
      closedResolve();
    });
    const write = (out: string) => (delayMs ? setTimeout(() => !sock.destroyed && sock.write(out), delayMs) : later(0, out));
    // Pieces and late replies are written in order, each after the one before.
    let queue = Promise.resolve();
    const later = (ms: number, out: string, then?: () => void) => {
      queue = queue.then(async () => {
        if (ms) await Bun.sleep(ms);
        if (!sock.destroyed) sock.write(out);
        then?.();
      });
    };
    if (greeting !== null) write(greeting);
    let buf = "";
    let inData = false;
    let message = "";
    const onData = (chunk: Buffer) => {
      buf += chunk.toString("latin1");
      let eol: number;
      while ((eol = buf.indexOf("\r\n")) !== -1) {
        const line = buf.slice(0, eol);
        buf = buf.slice(eol + 2);
        if (inData) {
          if (line !== ".") {
            message += (line.startsWith(".") ? line.slice(1) : line) + "\r\n";
            continue;
          }
          inData = false;
          s.messages.push(message);
          message = "";
        } else {
          s.lines.push(line);
        }
        const out = reply(line, sock);
        if (typeof out === "string") write(out);
        else if (Array.isArray(out)) out.forEach((piece, i) => later(i === 0 ? delayMs : 5, piece));
        else if (out) later(out.afterMs ?? delayMs, out.text, out.then === "end" ? () => sock.end() : undefined);
        const text = typeof out === "string" ? out : Array.isArray(out) ? out.join("") : (out?.text ?? "");
        if (text.startsWith("354")) inData = true;
        if (out && typeof out === "object" && !Array.isArray(out) && out.then) {
          // Nothing more is read on this connection: the client's writes back up (stop reading),
          // or go nowhere (end).
          sock.off("data", onData);
          if (out.then === "stop reading") sock.pause();
          return;
        }
      }
    };
    sock.on("data", onData);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  s.port = (server.address() as net.AddressInfo).port;
  return s;
}
