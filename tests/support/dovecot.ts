// Throwaway Dovecot (LMTP only) for integration tests.
//
// Everything lives in one short temp dir under /tmp: config, passwd-file, base_dir (sockets,
// master.pid), state_dir, logs and the Maildirs. Nothing is read from /etc/dovecot and nothing
// is written outside the temp dir, so several instances can run side by side.
import { existsSync, readFileSync, rmSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { freePort } from "../../scripts/free-port.ts";

export interface DovecotInstance {
  host: string;
  port: number;
  socketPath: string;
  dir: string;
  users: string[];
  maildir(user: string): string;
  /** The user's messages in INBOX, or in another folder ("Junk"). */
  messages(user: string, folder?: string): Promise<Uint8Array[]>;
  clear(): Promise<void>;
  stop(): Promise<void>;
  start(): Promise<void>;
  dispose(): Promise<void>;
}

const INSTALL_HINT = "apt-get install -y dovecot-core dovecot-lmtpd";
const SIEVE_INSTALL_HINT = "apt-get install -y dovecot-sieve";
const SIEVE_PLUGIN = "/usr/lib/dovecot/modules/lib90_sieve_plugin.so";
/** The operator's files (docs/operations.md, "Exactly once"), used here as they are. */
const RELAY_ONCE_CONF = new URL("../../examples/dovecot/90-relay-once.conf", import.meta.url);
const RELAY_ONCE_SIEVE = new URL("../../examples/dovecot/relay-once.sieve", import.meta.url);
const RELAY_ONCE_SIEVE_PATH = "/etc/dovecot/sieve/relay-once.sieve";
/** The operator's Junk filing (docs/spam-filter.md), used here as it is. */
const RELAY_JUNK_CONF = new URL("../../examples/dovecot/90-relay-junk.conf", import.meta.url);
const RELAY_JUNK_SIEVE = new URL("../../examples/dovecot/relay-junk.sieve", import.meta.url);
const RELAY_JUNK_SIEVE_PATH = "/etc/dovecot/sieve/relay-junk.sieve";
const DEFAULT_USERS = ["user@kuma8088.com", "alice@example.test", "bob@example.test"];
const HOST = "127.0.0.1";
const READY_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 5_000;
const MASTER_GRACE_MS = 2_000;

/** /usr/sbin is often missing from a non-login PATH, hence the fallback. */
function dovecotBinary(): string | null {
  const found = Bun.which("dovecot");
  if (found) return found;
  return existsSync("/usr/sbin/dovecot") ? "/usr/sbin/dovecot" : null;
}

export function dovecotAvailable(): boolean {
  return dovecotBinary() !== null;
}

// --- Process-exit safety net -------------------------------------------------------------
// If a test file forgets dispose() (or the runner exits on a failure), the dovecot master
// would outlive us. 'exit' handlers must be synchronous, so SIGKILL the master (its children
// notice the master is gone and exit on their own) and remove the temp dir.
const live = new Map<Subprocess, string>();
let exitHookInstalled = false;
function trackForExit(proc: Subprocess, dir: string): void {
  live.set(proc, dir);
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const [p, d] of live) {
      try {
        p.kill("SIGKILL");
      } catch {}
      try {
        rmSync(d, { recursive: true, force: true });
      } catch {}
    }
  });
}

// --- Small helpers -----------------------------------------------------------------------

/** uid/gid of a user from /etc/passwd (good enough for the local system accounts we need). */
function lookupUser(name: string): { uid: number; gid: number } | null {
  for (const line of readFileSync("/etc/passwd", "utf8").split("\n")) {
    const [user, , uid, gid] = line.split(":");
    if (user === name && uid && gid) return { uid: Number(uid), gid: Number(gid) };
  }
  return null;
}


/** Connect, and resolve with the first line the server sends (or reject on refuse/timeout). */
function greeting(port: number, timeoutMs = 1_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: HOST, port });
    let buf = "";
    const done = (err: Error | null, line?: string) => {
      sock.destroy();
      err ? reject(err) : resolve(line!);
    };
    sock.setTimeout(timeoutMs, () => done(new Error("timeout waiting for greeting")));
    sock.on("error", (e) => done(e));
    sock.on("data", (d) => {
      buf += d.toString("latin1");
      const nl = buf.indexOf("\n");
      if (nl >= 0) done(null, buf.slice(0, nl).trimEnd());
    });
    sock.on("close", () => done(new Error("closed before greeting")));
  });
}

function portRefuses(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    sock.once("connect", () => {
      sock.destroy();
      resolve(false);
    });
    sock.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "ECONNREFUSED"));
  });
}

function tail(path: string, lines = 30): string {
  try {
    return readFileSync(path, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "";
  }
}

/** Maildir files are named "<secs>.M<usecs>P<pid>...": numeric-aware compare keeps delivery order. */
function byFileName(a: string, b: string): number {
  return a.localeCompare(b, "en", { numeric: true });
}

// --- Config ------------------------------------------------------------------------------

function renderConfig(o: {
  dir: string;
  port: number;
  mailUid: number;
  mailGid: number;
  systemUser: string;
  systemGroup: string;
  exactlyOnce: boolean;
  junk: boolean;
}): string {
  const { dir } = o;
  return `# Generated by tests/support/dovecot.ts: self-contained, includes nothing from /etc/dovecot.
base_dir = ${dir}/run
# state_dir would otherwise be /var/lib/dovecot (master registers itself in "instances" there).
state_dir = ${dir}/state
instance_name = dv-test-${o.port}
log_path = ${dir}/dovecot.log
protocols = lmtp
ssl = no
listen = ${HOST}

# The stock accounts (dovecot/dovenull) may not exist everywhere; nobody always does.
default_internal_user = ${o.systemUser}
default_internal_group = ${o.systemGroup}
default_login_user = ${o.systemUser}

# Mail is written as nobody, never as root.
mail_uid = ${o.mailUid}
mail_gid = ${o.mailGid}
mail_location = maildir:${dir}/mail/%d/%n

# Dovecot's defaults otherwise: LMTP prepends Return-Path, Delivered-To and its own Received
# header to every stored message (see expectStoredAs).

# passwd-file userdb: unknown recipients fail the lookup -> "550 5.1.1" at RCPT TO.
passdb {
  driver = passwd-file
  args = ${dir}/users
}
userdb {
  driver = passwd-file
  args = ${dir}/users
}

service lmtp {
  inet_listener lmtp {
    address = ${HOST}
    port = ${o.port}
  }
  # Relative name: the socket is <base_dir>/lmtp, kept short for the sun_path limit.
  unix_listener lmtp {
    mode = 0666
  }
}
${o.exactlyOnce || o.junk ? `\n# Sieve keeps its state in the user's home: the Maildir (clear() removes both).\nmail_home = ${dir}/mail/%d/%n\n` : ""}${o.exactlyOnce ? exactlyOnceConfig(dir) : ""}${o.junk ? junkConfig(dir) : ""}`;
}

/**
 * The documented setting, with the script's path moved into the temp dir. The duplicate database
 * lives in the user's home, so users get one (their Maildir; clear() removes it with the mail).
 */
function exactlyOnceConfig(dir: string): string {
  const conf = readFileSync(RELAY_ONCE_CONF, "utf8");
  if (!conf.includes(RELAY_ONCE_SIEVE_PATH)) throw new Error(`${RELAY_ONCE_CONF.pathname} no longer names ${RELAY_ONCE_SIEVE_PATH}`);
  return `\n${conf.replaceAll(RELAY_ONCE_SIEVE_PATH, join(dir, "sieve", "relay-once.sieve"))}`;
}

/** The documented Junk setting (examples/dovecot/90-relay-junk.conf), its script moved into the temp dir. */
function junkConfig(dir: string): string {
  const conf = readFileSync(RELAY_JUNK_CONF, "utf8");
  if (!conf.includes(RELAY_JUNK_SIEVE_PATH)) throw new Error(`${RELAY_JUNK_CONF.pathname} no longer names ${RELAY_JUNK_SIEVE_PATH}`);
  return `\n${conf.replaceAll(RELAY_JUNK_SIEVE_PATH, join(dir, "sieve", "relay-junk.sieve"))}`;
}

// --- Instance ----------------------------------------------------------------------------

export interface DovecotOptions {
  users?: string[];
  /**
   * With the operator's "exactly once" setting (examples/dovecot/): Pigeonhole's duplicate test
   * in a sieve_before script drops a retry of a delivery Dovecot already saved. Needs dovecot-sieve.
   */
  exactlyOnce?: boolean;
  /** Settings appended to the generated dovecot.conf (e.g. lmtp_hdr_delivery_address = original). */
  extraConfig?: string;
  /** With the operator's Junk filing (examples/dovecot/90-relay-junk.conf): X-Spam: Yes goes to Junk. Needs dovecot-sieve. */
  junk?: boolean;
}

export function sieveAvailable(): boolean {
  return existsSync(SIEVE_PLUGIN) && Bun.which("sievec") !== null;
}

export async function startDovecot(opts: DovecotOptions = {}): Promise<DovecotInstance> {
  const bin = dovecotBinary();
  if (!bin) {
    throw new Error(`Dovecot is not installed (no "dovecot" binary found). Install it with: ${INSTALL_HINT}`);
  }
  // The port is picked before dovecot binds it, so another process may grab it in between.
  // That shows up as a bind failure; retry with a fresh port a couple of times.
  for (let attempt = 1; ; attempt++) {
    try {
      return await launch(bin, opts.users ?? DEFAULT_USERS, opts.exactlyOnce ?? false, opts.junk ?? false, opts.extraConfig ?? "");
    } catch (e) {
      if (attempt >= 3 || !String(e).includes("Address already in use")) throw e;
    }
  }
}

async function launch(bin: string, userList: string[], exactlyOnce: boolean, junk: boolean, extraConfig: string): Promise<DovecotInstance> {
  if ((exactlyOnce || junk) && !sieveAvailable()) {
    throw new Error(`Dovecot's Sieve plugin (Pigeonhole) is not installed. Install it with: ${SIEVE_INSTALL_HINT}`);
  }
  const users = userList.map((u) => u.toLowerCase());
  const nobody = lookupUser("nobody");
  if (!nobody) throw new Error("startDovecot: no 'nobody' user in /etc/passwd");
  const systemGroup = existsSync("/etc/group") && /^nogroup:/m.test(readFileSync("/etc/group", "utf8")) ? "nogroup" : "nobody";

  // Short dir: socket paths under it must fit in sun_path (~108 bytes).
  const dir = await mkdtemp("/tmp/dv-");
  const port = await freePort();
  const baseDir = join(dir, "run");
  const mailRoot = join(dir, "mail");
  const conf = join(dir, "dovecot.conf");
  const logPath = join(dir, "dovecot.log");
  // Config errors are printed to stderr before log_path takes over, so keep them too.
  const stderrPath = join(dir, "stderr.log");

  // mkdtemp makes the dir 0700; the auth process and mail deliveries run as nobody and must traverse it.
  await chmod(dir, 0o755);
  await mkdir(mailRoot);
  await chown(mailRoot, nobody.uid, nobody.gid);
  // passwd-file line: user:password:uid:gid:gecos:home:shell. Empty uid/gid -> mail_uid/mail_gid.
  await writeFile(join(dir, "users"), users.map((u) => `${u}:{PLAIN}test::::::\n`).join(""), { mode: 0o644 });
  await writeFile(
    conf,
    renderConfig({ dir, port, mailUid: nobody.uid, mailGid: nobody.gid, systemUser: "nobody", systemGroup, exactlyOnce, junk }) + (extraConfig ? `\n${extraConfig}\n` : ""),
  );
  // Compiled here, as the operator does with sievec: lmtp runs as nobody and could not write the
  // compiled script next to it.
  const scripts = [...(exactlyOnce ? [RELAY_ONCE_SIEVE] : []), ...(junk ? [RELAY_JUNK_SIEVE] : [])];
  if (scripts.length) await mkdir(join(dir, "sieve"));
  for (const source of scripts) {
    const script = join(dir, "sieve", source.pathname.split("/").pop()!);
    await writeFile(script, readFileSync(source));
    const compiled = Bun.spawnSync(["sievec", "-c", conf, script], { stdout: "pipe", stderr: "pipe" });
    if (compiled.exitCode !== 0) {
      await rm(dir, { recursive: true, force: true });
      throw new Error(`sievec failed on ${source.pathname}: ${compiled.stderr.toString()}${compiled.stdout.toString()}`);
    }
  }

  let proc: Subprocess | null = null;
  const maildir = (user: string) => {
    const [local, domain = ""] = user.toLowerCase().split("@");
    return join(mailRoot, domain, local!);
  };
  const logTail = () => [tail(stderrPath), tail(logPath)].filter(Boolean).join("\n");

  async function start(): Promise<void> {
    if (proc && proc.exitCode === null) return;
    // -F keeps the master in the foreground as our child, so we own its lifetime.
    const p = Bun.spawn([bin, "-F", "-c", conf], {
      stdin: "ignore",
      stdout: Bun.file(join(dir, "stdout.log")),
      stderr: Bun.file(stderrPath),
    });
    proc = p;
    // Don't let a forgotten instance keep the runner alive; the exit hook then kills it.
    p.unref();
    trackForExit(p, dir);

    const deadline = Date.now() + READY_TIMEOUT_MS;
    let last = "";
    while (Date.now() < deadline) {
      if (p.exitCode !== null) break; // dovecot died (bad config, port taken, ...): no point waiting.
      try {
        const line = await greeting(port);
        if (line.startsWith("220")) return;
        last = line;
      } catch (e) {
        last = String(e);
      }
      await Bun.sleep(50);
    }
    const why = p.exitCode !== null ? `dovecot exited with code ${p.exitCode}` : `no 220 greeting within ${READY_TIMEOUT_MS} ms (last: ${last})`;
    await killMaster();
    throw new Error(`Dovecot failed to start on ${HOST}:${port}: ${why}\n--- dovecot log (${dir}) ---\n${logTail()}\n(if the lmtp binary is missing: ${INSTALL_HINT})`);
  }

  async function killMaster(): Promise<void> {
    const p = proc;
    proc = null;
    if (!p) return;
    live.delete(p);
    if (p.exitCode !== null || p.signalCode !== null) return;
    // SIGTERM makes the master shut down its services (shutdown_clients=yes kills the lmtp children).
    p.kill("SIGTERM");
    // Its children exit on their own once the master is gone, so a master slow to stop (seen in
    // CI) is simply killed after a short grace.
    const exited = await Promise.race([p.exited.then(() => true), Bun.sleep(MASTER_GRACE_MS).then(() => false)]);
    if (!exited) {
      p.kill("SIGKILL");
      await p.exited;
    }
  }

  async function stop(): Promise<void> {
    await killMaster();
    // Children may still hold the inherited listening socket for a moment after the master exits.
    const deadline = Date.now() + STOP_TIMEOUT_MS;
    while (!(await portRefuses(port))) {
      if (Date.now() > deadline) throw new Error(`Dovecot stopped but ${HOST}:${port} still accepts connections`);
      await Bun.sleep(50);
    }
  }

  const instance: DovecotInstance = {
    host: HOST,
    port,
    socketPath: join(baseDir, "lmtp"),
    dir,
    users,
    maildir,
    async messages(user, folder) {
      // Maildir++: INBOX is the Maildir itself, another folder a ".Name" folder inside it.
      const root = folder && folder !== "INBOX" ? join(maildir(user), `.${folder}`) : maildir(user);
      const files: { name: string; path: string }[] = [];
      for (const sub of ["new", "cur"]) {
        const names = await readdir(join(root, sub)).catch(() => [] as string[]);
        for (const name of names) files.push({ name, path: join(root, sub, name) });
      }
      files.sort((a, b) => byFileName(a.name, b.name));
      return Promise.all(files.map(async (f) => new Uint8Array(await readFile(f.path))));
    },
    async clear() {
      // Removing the whole Maildir (with its index/uidlist) is cleaner than deleting only the
      // message files; Dovecot recreates INBOX on the next delivery.
      await Promise.all(users.map((u) => rm(maildir(u), { recursive: true, force: true })));
    },
    start,
    stop,
    async dispose() {
      try {
        await stop();
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    },
  };

  try {
    await start();
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
  return instance;
}

// --- What Dovecot stores -----------------------------------------------------------------
//
// Dovecot's LMTP (default settings) stores a message as: a few header fields it prepends
// (Return-Path always; Delivered-To and "for <rcpt>" in Received only when the transaction has
// exactly one recipient; its own Received), then the message with every CRLF turned into LF and
// a final LF added when the message did not end with a line end. Everything below compares bytes,
// never decoded text: a lossy decode would hide exactly the 8-bit damage these tests look for.

const LF = 0x0a;
const CR = 0x0d;

/** Header fields Dovecot's LMTP prepends; nothing else may appear before the message. */
const PREPENDED_FIELDS = ["Return-Path", "Delivered-To", "Received"] as const;
export type PrependedFieldName = (typeof PREPENDED_FIELDS)[number];

export interface PrependedField {
  name: PrependedFieldName;
  /** The value, unfolded (line ends before continuation lines removed) and trimmed. */
  value: string;
}

/** Length of `sent` once stored: each CRLF counts as one byte, plus a final LF if it has none. */
function storedLength(sent: Uint8Array): number {
  const buf = asBuffer(sent);
  let n = sent.length;
  for (let i = buf.indexOf(CR); i !== -1; i = buf.indexOf(CR, i + 1)) if (sent[i + 1] === LF) n--;
  return sent.length === 0 || sent[sent.length - 1] !== LF ? n + 1 : n;
}

/**
 * The bytes Dovecot stores for `sent` (without its prepended header fields): CRLF -> LF, and a
 * final LF when the message does not end with one. A lone CR is kept as it is.
 */
export function dovecotStoredForm(sent: Uint8Array): Uint8Array {
  const out = new Uint8Array(storedLength(sent));
  const o = compareStoredForm(out, 0, sent, true);
  if (o !== -1) throw new Error("dovecotStoredForm: internal length mismatch");
  return out;
}

/** A Buffer view of the same memory (no copy), for Buffer's native indexOf/compare. */
function asBuffer(a: Uint8Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * Walks `sent` in its stored form and compares it with `stored` from offset `at` to the end, or
 * (write = true) writes it there. Returns -1 on a match, else the offset in `stored` of the first
 * difference (stored.length if `stored` is shorter or longer than expected). Copy-free, so a
 * 25 MiB message costs no extra 25 MiB.
 */
function compareStoredForm(stored: Uint8Array, at: number, sent: Uint8Array, write = false): number {
  const src = asBuffer(sent);
  const dst = asBuffer(stored);
  let s = at;
  let i = 0;
  const run = (from: number, to: number): number => {
    const len = to - from;
    if (write) {
      src.copy(dst, s, from, to);
    } else {
      if (s + len > dst.length) return firstDifference(dst, s, src, from, dst.length - s);
      if (dst.compare(src, from, to, s, s + len) !== 0) return firstDifference(dst, s, src, from, len);
    }
    s += len;
    return -1;
  };
  while (i < sent.length) {
    const cr = src.indexOf(CR, i);
    const end = cr === -1 ? sent.length : cr;
    const bad = run(i, end);
    if (bad !== -1) return bad;
    if (cr === -1) break;
    // CRLF is stored as LF; any other CR stays.
    const crlf = sent[cr + 1] === LF;
    const want = crlf ? LF : CR;
    if (write) stored[s] = want;
    else if (s >= stored.length || stored[s] !== want) return Math.min(s, stored.length);
    s++;
    i = crlf ? cr + 2 : cr + 1;
  }
  if (sent.length === 0 || sent[sent.length - 1] !== LF) {
    if (write) stored[s] = LF;
    else if (s >= stored.length || stored[s] !== LF) return Math.min(s, stored.length);
    s++;
  }
  return s === stored.length ? -1 : s;
}

function firstDifference(a: Buffer, aFrom: number, b: Buffer, bFrom: number, len: number): number {
  for (let k = 0; k < len; k++) if (a[aFrom + k] !== b[bFrom + k]) return aFrom + k;
  return aFrom + len;
}

/**
 * Parses the block Dovecot prepended: header fields named in PREPENDED_FIELDS, each one line
 * plus continuation lines that start with a space or tab, every line ending in LF. Returns the
 * fields, or a description of what is wrong.
 */
export function parsePrepended(prefix: Uint8Array): PrependedField[] | string {
  // Only header syntax is read here, and header fields are ASCII: latin1 maps bytes 1:1.
  const text = asBuffer(prefix).toString("latin1");
  if (text.length > 0 && !text.endsWith("\n")) return `the prepended block does not end with a line end: ${JSON.stringify(text.slice(-80))}`;
  const fields: { name: PrependedFieldName; lines: string[] }[] = [];
  for (const line of text.split("\n").slice(0, -1)) {
    if (/^[ \t]/.test(line)) {
      const last = fields[fields.length - 1];
      if (!last) return `the prepended block starts with a continuation line: ${JSON.stringify(line)}`;
      last.lines.push(line);
      continue;
    }
    const m = /^([!-9;-~]+):/.exec(line);
    const name = m && PREPENDED_FIELDS.find((f) => f.toLowerCase() === m[1]!.toLowerCase());
    if (!name) {
      return `unexpected line before the message: ${JSON.stringify(line.slice(0, 120))} (only ${PREPENDED_FIELDS.join(", ")} may be prepended)`;
    }
    fields.push({ name, lines: [line.slice(m[0].length)] });
  }
  return fields.map((f) => ({ name: f.name, value: f.lines.join("").trim() }));
}

export type StoredCheck = { ok: true; prepended: PrependedField[]; body: Uint8Array } | { ok: false; problem: string };

/**
 * Pure form of expectStoredAs: whether `stored` is Dovecot's prepended header fields followed by
 * `sent` in its stored form (CRLF -> LF, final LF added). Return-Path must be among the prepended
 * fields, exactly once (Dovecot always writes it). `body` is a view of `stored` after the fields.
 */
export function checkStoredAs(stored: Uint8Array, sent: Uint8Array): StoredCheck {
  const expectedLength = storedLength(sent);
  const prefixLength = stored.length - expectedLength;
  if (prefixLength < 0 || compareStoredForm(stored, prefixLength, sent) !== -1) return { ok: false, problem: describeMismatch(stored, sent) };
  const prepended = parsePrepended(stored.subarray(0, prefixLength));
  if (typeof prepended === "string") return { ok: false, problem: prepended };
  const returnPaths = prepended.filter((f) => f.name === "Return-Path").length;
  if (returnPaths !== 1) return { ok: false, problem: `expected exactly one prepended Return-Path, found ${returnPaths}` };
  return { ok: true, prepended, body: stored.subarray(prefixLength) };
}

/** Bytes taken by leading lines that look like Dovecot's prepended fields (for diagnostics only). */
function apparentPrefixLength(stored: Uint8Array): number {
  const head = asBuffer(stored.subarray(0, 64 * 1024)).toString("latin1");
  const names = PREPENDED_FIELDS.map((f) => f.toLowerCase());
  let at = 0;
  let inField = false;
  for (;;) {
    const nl = head.indexOf("\n", at);
    if (nl === -1) return at;
    const line = head.slice(at, nl);
    const name = /^([!-9;-~]+):/.exec(line)?.[1]?.toLowerCase();
    if (name && names.includes(name)) inField = true;
    else if (!(inField && /^[ \t]/.test(line))) return at;
    at = nl + 1;
  }
}

/**
 * Where and how the stored message differs. The message is taken to start after the lines that
 * look like Dovecot's fields, so a lost or added byte shows where it happened, with both sides
 * around it. Only runs on failure.
 */
function describeMismatch(stored: Uint8Array, sent: Uint8Array): string {
  const expected = dovecotStoredForm(sent);
  const start = apparentPrefixLength(stored);
  const body = stored.subarray(start);
  const diff = compareStoredForm(body, 0, sent);
  const at = diff === -1 ? 0 : diff;
  const from = Math.max(0, at - 40);
  const show = (b: Uint8Array) => JSON.stringify(asBuffer(b).toString("latin1"));
  const sizes =
    body.length === expected.length
      ? `${body.length} bytes as expected`
      : `${body.length} bytes, expected ${expected.length} (${body.length < expected.length ? "bytes lost" : "bytes added"})`;
  return (
    `stored message differs from the sent one (in Dovecot's stored form: CRLF -> LF, final LF) at message byte ${at}; ` +
    `after the ${start} bytes of prepended fields it is ${sizes}\n` +
    `  stored:   ${show(body.subarray(from, at + 40))}\n` +
    `  expected: ${show(expected.subarray(from, at + 40))}`
  );
}

/**
 * Throws unless `stored` (a Maildir file) is exactly Dovecot's prepended Return-Path /
 * Delivered-To / Received fields followed by `sent` in stored form. Returns the prepended fields
 * (e.g. to check Return-Path: <> for the null sender).
 */
export function expectStoredAs(stored: Uint8Array, sent: Uint8Array): PrependedField[] {
  const r = checkStoredAs(stored, sent);
  if (!r.ok) throw new Error(`expectStoredAs: ${r.problem}`);
  return r.prepended;
}
