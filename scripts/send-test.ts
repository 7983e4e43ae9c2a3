// `bun run send-test`: sends one real test message and shows what became of it.
//
//   bun run send-test [--host-url URL] [--to ADDR] [--from ADDR] [--subject TEXT] [--file MSG.eml] [--maildir DIR]
//   bun run send-test --worker-url http://127.0.0.1:8787 [...]
//
// --host-url (default http://127.0.0.1:8080; through the tunnel: https://mail-api.<domain>) posts the
//   message to the host's POST /api/v1/inbound-mail as message/rfc822, exactly as the Worker does,
//   with the key from API_KEY (or the first of API_KEYS) in the environment, else .dev/api-key.
// --worker-url posts it to a Worker running in `wrangler dev` (`bun run dev`) through
//   /cdn-cgi/handler/email, which calls email() as Cloudflare Email Routing would.
// --maildir DIR then shows the newest message file under DIR (a Maildir, or a folder of them) and
//   whether it is the one just sent.
// Exit code: 0 accepted (delivered, queued or duplicate), 1 refused, deferred or unreachable, 2 usage.

import { existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { headerValue } from "../shared/contract.ts";

const INBOUND_PATH = "/api/v1/inbound-mail";

export interface TestMessage {
  from: string;
  to: string;
  messageId: string;
  /** The message's exact bytes (CRLF line ends). */
  raw: Uint8Array<ArrayBuffer>;
}

/** A small, complete RFC 5322 message with a fresh Message-ID. */
export function testMessage(opts: { from: string; to: string; subject?: string }): TestMessage {
  const messageId = `<send-test-${crypto.randomUUID()}@mail-relay.invalid>`;
  const now = new Date();
  const lines = [
    `From: mail-relay send-test <${opts.from}>`,
    `To: <${opts.to}>`,
    `Subject: ${opts.subject ?? `mail-relay send-test ${now.toISOString()}`}`,
    `Date: ${now.toUTCString().replace("GMT", "+0000")}`,
    `Message-ID: ${messageId}`,
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "",
    "A test message from `bun run send-test`.",
    `Sent ${now.toISOString()} to ${opts.to}.`,
    "Non-ASCII, to see that the bytes arrive untouched: été, 日本語.",
    "",
  ];
  return { from: opts.from, to: opts.to, messageId, raw: new TextEncoder().encode(lines.join("\r\n")) };
}

/** Reads a message from a file; its Message-ID (added if missing) identifies it in a Maildir. */
export function fileMessage(path: string, opts: { from: string; to: string }): TestMessage {
  let raw = new Uint8Array(readFileSync(path));
  const head = new TextDecoder("latin1").decode(raw.subarray(0, 64 * 1024)).split(/\r?\n\r?\n/)[0] ?? "";
  let messageId = /^message-id:\s*(.+)$/im.exec(head)?.[1]?.trim();
  if (!messageId) {
    messageId = `<send-test-${crypto.randomUUID()}@mail-relay.invalid>`;
    const prefix = new TextEncoder().encode(`Message-ID: ${messageId}\r\n`);
    const joined = new Uint8Array(prefix.length + raw.length);
    joined.set(prefix);
    joined.set(raw, prefix.length);
    raw = joined;
  }
  return { from: opts.from, to: opts.to, messageId, raw };
}

export interface SendResult {
  status: number;
  /** The parsed JSON answer, or null when the answer is not JSON (wrangler's email handler). */
  json: Record<string, unknown> | null;
  text: string;
  ms: number;
}

/** POSTs the message to the host as the Worker does (message/rfc822, envelope in headers). */
export async function sendToHost(hostUrl: string, apiKey: string, msg: TestMessage, timeoutMs = 30_000): Promise<SendResult> {
  const url = new URL(INBOUND_PATH, hostUrl);
  const started = performance.now();
  const res = await fetch(url, {
    method: "POST",
    headers: {
      "content-type": "message/rfc822",
      "x-api-key": apiKey,
      // UTF-8 on the wire, as the Worker sends them (Bun's fetch would write Latin-1).
      "x-envelope-from": headerValue(msg.from || "<>"),
      "x-envelope-to": headerValue(msg.to),
    },
    body: msg.raw,
    signal: AbortSignal.timeout(timeoutMs),
  });
  return answer(res, started);
}

/** POSTs the message to wrangler dev's email handler, which runs the Worker's email(). */
export async function sendToWorker(workerUrl: string, msg: TestMessage, timeoutMs = 60_000): Promise<SendResult> {
  const url = new URL("/cdn-cgi/handler/email", workerUrl);
  url.searchParams.set("from", msg.from);
  url.searchParams.set("to", msg.to);
  const started = performance.now();
  const res = await fetch(url, { method: "POST", body: msg.raw, signal: AbortSignal.timeout(timeoutMs) });
  return answer(res, started);
}

async function answer(res: Response, started: number): Promise<SendResult> {
  const text = await res.text();
  let json: Record<string, unknown> | null = null;
  try {
    const parsed: unknown = JSON.parse(text);
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) json = parsed as Record<string, unknown>;
  } catch {
    // not JSON
  }
  return { status: res.status, json, text, ms: Math.round(performance.now() - started) };
}

/** The key the host expects: API_KEY, else the first of API_KEYS, else the dev key in .dev/api-key. */
export function apiKeyFrom(env: Record<string, string | undefined>, devKeyFile: string): string | null {
  const fromEnv = env.API_KEY?.trim() || env.API_KEYS?.split(",").map((k) => k.trim()).find(Boolean);
  if (fromEnv) return fromEnv;
  if (existsSync(devKeyFile)) return readFileSync(devKeyFile, "utf8").trim() || null;
  return null;
}

/** The most recently written message file under dir: files in any new/ or cur/ folder, at any depth. */
export function newestMaildirFile(dir: string): { path: string; mtimeMs: number } | null {
  let best: { path: string; mtimeMs: number } | null = null;
  const walk = (d: string, depth: number) => {
    let entries;
    try {
      entries = readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory()) {
        if (depth < 8) walk(p, depth + 1);
      } else if (e.isFile() && /(^|\/)(new|cur)$/.test(d)) {
        const m = statSync(p).mtimeMs;
        if (!best || m > best.mtimeMs) best = { path: p, mtimeMs: m };
      }
    }
  };
  walk(dir, 0);
  return best;
}

// ---------------------------------------------------------------------------------------------

const USAGE = `usage: bun run send-test [--host-url URL | --worker-url URL] [--to ADDR] [--from ADDR]
                         [--subject TEXT] [--file MESSAGE.eml] [--maildir DIR]
  --host-url URL    the host (default http://127.0.0.1:8080, or https://mail-api.<domain> through the tunnel);
                    key from API_KEY / API_KEYS, else .dev/api-key
  --worker-url URL  a Worker in wrangler dev (bun run dev: http://127.0.0.1:8787), through /cdn-cgi/handler/email
  --to ADDR         envelope recipient (default user@example.com)
  --from ADDR       envelope sender (default send-test@example.com; "<>" for the null sender)
  --file PATH       send this message instead of a generated one (a Message-ID is added if it has none)
  --maildir DIR     afterwards, show the newest message file under DIR`;

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      options: {
        "host-url": { type: "string" },
        "worker-url": { type: "string" },
        to: { type: "string", default: "user@example.com" },
        from: { type: "string", default: "send-test@example.com" },
        subject: { type: "string" },
        file: { type: "string" },
        maildir: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
    }).values;
  } catch (e) {
    console.error(`${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  if (args["host-url"] && args["worker-url"]) {
    console.error(`give --host-url or --worker-url, not both\n${USAGE}`);
    return 2;
  }
  const from = args.from === "<>" ? "" : args.from;
  const msg = args.file ? fileMessage(args.file, { from, to: args.to }) : testMessage({ from, to: args.to, subject: args.subject });

  let result: SendResult;
  let target: string;
  try {
    if (args["worker-url"]) {
      target = `${args["worker-url"]} (Worker email(), via /cdn-cgi/handler/email)`;
      console.log(`sending ${msg.raw.length} bytes ${msg.messageId} from <${from}> to <${msg.to}> through ${target}`);
      result = await sendToWorker(args["worker-url"], msg);
    } else {
      const hostUrl = args["host-url"] ?? "http://127.0.0.1:8080";
      const key = apiKeyFrom(process.env, join(import.meta.dir, "..", ".dev", "api-key"));
      if (!key) {
        console.error("no API key: set API_KEY (or API_KEYS), or run `bun run dev` once to make .dev/api-key");
        return 2;
      }
      target = `${new URL(INBOUND_PATH, hostUrl)} (the host)`;
      console.log(`sending ${msg.raw.length} bytes ${msg.messageId} from <${from}> to <${msg.to}> to ${target}`);
      result = await sendToHost(hostUrl, key, msg);
    }
  } catch (e) {
    console.error(`no answer: ${(e as Error).message}`);
    return 1;
  }

  console.log(`HTTP ${result.status} in ${result.ms} ms`);
  if (result.json) {
    console.log(JSON.stringify(result.json, null, 2));
    const recipients = Array.isArray(result.json.recipients) ? (result.json.recipients as { address?: string; reply?: string }[]) : [];
    for (const r of recipients) console.log(`  ${r.address}: ${r.reply}`);
  } else if (result.text) {
    console.log(result.text);
  }
  if (args["worker-url"]) console.log("(the Worker's own log line, with the host's answer, is in the wrangler dev output)");

  if (args.maildir) {
    // Dovecot (or the dev fake) may finish writing a moment after the answer.
    let newest = null;
    for (let i = 0; i < 20; i++) {
      newest = newestMaildirFile(args.maildir);
      if (newest && readFileSync(newest.path, "latin1").includes(msg.messageId)) break;
      await Bun.sleep(100);
    }
    if (!newest) console.log(`maildir: no message file under ${args.maildir}`);
    else {
      const ours = readFileSync(newest.path, "latin1").includes(msg.messageId);
      console.log(`maildir: newest file ${newest.path} (${statSync(newest.path).size} bytes, ${new Date(newest.mtimeMs).toISOString()})`);
      console.log(ours ? `maildir: it is this message (${msg.messageId})` : `maildir: it is NOT this message (${msg.messageId} not found in it)`);
    }
  }

  const accepted = args["worker-url"] ? result.status >= 200 && result.status < 300 : result.status === 200 || result.status === 202;
  if (!accepted) {
    const why = args["worker-url"]
      ? result.status === 400
        ? "email() called setReject: the sender gets a bounce"
        : "email() threw: the sender gets a temporary failure and retries"
      : result.status === 401
        ? "the key was refused (the Worker would throw: the sender retries)"
        : result.status === 422 || result.status === 400 || result.status === 413 || result.status === 415
          ? "refused permanently (the Worker would bounce it)"
          : "not delivered now (the Worker would throw: the sender retries)";
    console.error(`not accepted: ${why}`);
  }
  return accepted ? 0 : 1;
}

if (import.meta.main) void main(process.argv.slice(2)).then((code) => process.exit(code));
