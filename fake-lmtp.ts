/**
 * Fake LMTP server (RFC 2033) on top of `smtp-server` in LMTP mode.
 *
 * Used by the unit tests of our LMTP client (scripted replies, stalls, dropped
 * connections, slow reading) and by `bun run dev`, where it stands in for
 * Dovecot and writes accepted messages into a local Maildir.
 */
import { randomBytes } from "node:crypto";
import { mkdir, open, rename, rm, stat } from "node:fs/promises";
import type { Socket } from "node:net";
import os from "node:os";
import path from "node:path";
import { SMTPServer, type SMTPServerDataResult, type SMTPServerSession } from "smtp-server";

export type RcptBehaviour = 250 | 450 | 550;
export type AfterDataBehaviour = 250 | 452 | 552 | 550;
export type StallPhase = "greeting" | "lhlo" | "mail" | "rcpt" | "data" | "afterData";

export interface FakeLmtpOptions {
  host?: string;
  port?: number;
  socketPath?: string;
  maildir?: string;
}

export interface FakeLmtpBehaviour {
  rcpt: (address: string) => RcptBehaviour;
  afterData: (address: string) => AfterDataBehaviour;
  stall?: StallPhase | null;
  dropMidData?: boolean;
  slowReader?: { bytesPerSecond: number } | null;
}

export interface ReceivedMessage {
  from: string;
  /** Recipients that got 250 after the final dot (the ones the message was delivered to). */
  to: string[];
  /** MAIL FROM parameters; a bare keyword such as SMTPUTF8 maps to "". */
  mailParams: Record<string, string>;
  data: Uint8Array;
}

export interface FakeLmtpServer {
  host: string;
  port: number;
  socketPath?: string;
  behaviour: FakeLmtpBehaviour;
  received: ReceivedMessage[];
  connections: number;
  commands: string[];
  reset(): void;
  close(): Promise<void>;
}

const MAX_SIZE = 64 * 1024 * 1024;

// smtp-server's commands that map to a stall phase (LHLO is the only greeting LMTP allows).
const STALL_VERBS: Partial<Record<string, StallPhase>> = { LHLO: "lhlo", MAIL: "mail", RCPT: "rcpt", DATA: "data" };

// smtp-server prepends its own enhanced status code to every reply (450 becomes 4.2.1, say).
// Our scripted replies carry the Dovecot-like code themselves, detected by this prefix.
const OWN_ENHANCED_CODE = /^[245]\.\d{1,3}\.\d{1,3} /;

function defaultBehaviour(): FakeLmtpBehaviour {
  return { rcpt: () => 250, afterData: () => 250, stall: null, dropMidData: false, slowReader: null };
}

function replyError(code: number, text: string): Error {
  return Object.assign(new Error(text), { responseCode: code });
}

const RCPT_REPLIES: Record<450 | 550, (address: string) => Error> = {
  450: () => replyError(450, "4.2.0 Mailbox temporarily unavailable"),
  550: (address) => replyError(550, `5.1.1 <${address}> User unknown`),
};

const AFTER_DATA_REPLIES: Record<452 | 552 | 550, (address: string) => Error> = {
  452: () => replyError(452, "4.2.2 Mailbox full"),
  552: () => replyError(552, "5.2.2 Mailbox full"),
  550: (address) => replyError(550, `5.1.1 <${address}> User unknown`),
};

export async function startFakeLmtp(opts: FakeLmtpOptions = {}): Promise<FakeLmtpServer> {
  const host = opts.host ?? "127.0.0.1";
  // Every socket ever accepted and still open, so close() can kill them without waiting for QUIT.
  const sockets = new Set<Socket>();
  // session.id -> socket, so onData can drop the connection (the session does not expose it).
  const socketBySession = new Map<string, Socket>();

  const api: FakeLmtpServer = {
    host,
    port: 0,
    socketPath: opts.socketPath,
    behaviour: defaultBehaviour(),
    received: [],
    connections: 0,
    commands: [],
    reset() {
      api.behaviour = defaultBehaviour();
      api.received = [];
      api.commands = [];
      api.connections = 0;
    },
    close: () =>
      new Promise<void>((resolve) => {
        // smtp-server's close() waits up to 30 s for clients to leave; destroying the
        // sockets lets the listener close right away.
        smtp.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      }),
  };

  const smtp = new SMTPServer({
    lmtp: true,
    name: "fake-lmtp",
    banner: "ready",
    logger: false,
    authOptional: true,
    disabledCommands: ["AUTH", "STARTTLS"],
    hideSTARTTLS: true,
    hideENHANCEDSTATUSCODES: false,
    size: MAX_SIZE,
    // Otherwise every connection waits for a PTR lookup (up to 1.5 s) before the greeting.
    disableReverseLookup: true,

    onConnect(_session, callback) {
      // While onConnect is pending smtp-server sends nothing, so the greeting never comes.
      if (api.behaviour.stall === "greeting") return;
      callback();
    },

    onRcptTo(address, _session, callback) {
      const code = api.behaviour.rcpt(address.address);
      callback(code === 250 ? undefined : RCPT_REPLIES[code](address.address));
    },

    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      // Resolves once the slow reader has "consumed" the last chunk it got.
      let throttle = Promise.resolve();
      const drop = () => socketBySession.get(session.id)?.destroy();

      stream.on("data", (chunk: Buffer) => {
        chunks.push(chunk);
        if (api.behaviour.dropMidData) return drop();
        const slow = api.behaviour.slowReader;
        if (slow) {
          // Pausing fills the PassThrough, smtp-server then stops reading the socket,
          // and the client's writes back up: that is the backpressure we want to show.
          stream.pause();
          throttle = new Promise((resolve) =>
            setTimeout(() => {
              stream.resume();
              resolve();
            }, (chunk.length / slow.bytesPerSecond) * 1000),
          );
        }
      });
      stream.on("end", () => {
        // An empty body never emits "data"; still drop before answering the final dot.
        if (api.behaviour.dropMidData) return drop();
        // Never calling back means smtp-server never answers the final dot.
        if (api.behaviour.stall === "afterData") return;
        // A paused stream still emits "end" once its buffer is empty, so wait for the
        // throttle of the last chunk too.
        throttle
          .then(() => finishData(session, Buffer.concat(chunks)))
          .then(
            (replies) => callback(null, replies),
            (err: Error) => callback(replyError(451, `4.3.0 ${err.message}`)),
          );
      });
    },
  });

  // Per-recipient replies after the final dot: smtp-server's LMTP mode takes an array with one
  // entry per accepted recipient (a string means 250, an Error carries responseCode).
  async function finishData(session: SMTPServerSession, data: Buffer): Promise<SMTPServerDataResult[]> {
    const envelope = session.envelope;
    const delivered: string[] = [];
    const replies: SMTPServerDataResult[] = [];
    for (const { address } of envelope.rcptTo) {
      const code = api.behaviour.afterData(address);
      if (code !== 250) {
        replies.push(AFTER_DATA_REPLIES[code](address));
        continue;
      }
      try {
        if (opts.maildir) await writeMaildir(opts.maildir, address, data);
        delivered.push(address);
        replies.push(`2.0.0 <${address}> Saved`);
      } catch (err) {
        replies.push(replyError(451, `4.3.0 Local error: ${(err as Error).message}`));
      }
    }
    if (delivered.length > 0) {
      const mailFrom = envelope.mailFrom || { address: "", args: false as const };
      const mailParams: Record<string, string> = {};
      for (const [key, value] of Object.entries(mailFrom.args || {})) {
        mailParams[key] = value === true ? "" : String(value);
      }
      api.received.push({ from: mailFrom.address, to: delivered, mailParams, data: new Uint8Array(data) });
    }
    return replies;
  }

  // Count and remember sockets at accept time, before smtp-server does anything with them.
  smtp.server.on("connection", (socket: Socket) => {
    api.connections++;
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });

  // smtp-server has no public per-connection hook, so wrap the connection it creates:
  // _onCommand gives us the exact command lines and lets us withhold replies (stalls),
  // send lets our scripted replies carry their own enhanced status codes.
  const connect = smtp.connect.bind(smtp);
  smtp.connect = (socket, socketOptions) => {
    connect(socket, socketOptions);
    const conn = [...smtp.connections].find((c) => c._socket === socket);
    if (!conn) return;
    socketBySession.set(conn.id, socket as Socket);
    socket.once("close", () => socketBySession.delete(conn.id));

    const onCommand = conn._onCommand.bind(conn);
    conn._onCommand = (command, callback) => {
      const line = command.toString("utf8");
      api.commands.push(line);
      const verb = line.split(" ", 1)[0]!.toUpperCase();
      const phase = STALL_VERBS[verb];
      // Not calling the parser's callback also stops it from reading pipelined commands.
      if (phase && api.behaviour.stall === phase) return;
      onCommand(command, callback);
    };

    const send = conn.send.bind(conn);
    conn.send = (code, data, context) =>
      send(code, data, typeof data === "string" && OWN_ENHANCED_CODE.test(data) ? false : context);
  };

  // Without a listener, an "error" event (e.g. a client reset mid-transaction) would throw.
  smtp.on("error", () => {});

  await new Promise<void>((resolve, reject) => {
    smtp.server.once("error", reject);
    const listening = () => {
      smtp.server.off("error", reject);
      resolve();
    };
    if (opts.socketPath) {
      removeStaleSocket(opts.socketPath).then(() => smtp.listen(opts.socketPath!, listening), reject);
    } else {
      smtp.listen(opts.port ?? 0, host, listening);
    }
  });

  const address = smtp.server.address();
  if (address && typeof address === "object") api.port = address.port;
  return api;
}

// A socket file left behind by a previous run would make listen() fail with EADDRINUSE.
async function removeStaleSocket(socketPath: string): Promise<void> {
  const info = await stat(socketPath).catch(() => null);
  if (info?.isSocket()) await rm(socketPath);
}

let deliveryCounter = 0;
// Maildir hostnames must not contain "/" or ":" (the latter separates the info suffix).
const maildirHost = os.hostname().replace(/\//g, "\\057").replace(/:/g, "\\072");

/** Maildir delivery: write into tmp/, fsync, then rename into new/ so readers never see partial files. */
async function writeMaildir(root: string, address: string, data: Uint8Array): Promise<void> {
  // The address becomes a directory name: keep it from escaping the Maildir root.
  const box = path.join(root, address.replace(/[/\\\0]/g, "_").replace(/^\./, "_"));
  await Promise.all(["tmp", "new", "cur"].map((sub) => mkdir(path.join(box, sub), { recursive: true })));

  const now = Date.now();
  const unique =
    `${Math.floor(now / 1000)}.M${(now % 1000) * 1000}P${process.pid}` +
    `Q${++deliveryCounter}R${randomBytes(4).toString("hex")}.${maildirHost}`;
  const tmpPath = path.join(box, "tmp", unique);
  const file = await open(tmpPath, "wx");
  try {
    await file.writeFile(data);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(tmpPath, path.join(box, "new", unique));
}
