// A throwaway Postfix (Debian's postfix, 3.7) for integration tests: the operator's MTA in front of
// the test's Dovecot. SMTP on 127.0.0.1:<free port> (no postscreen), virtual mailbox domains whose
// users are Dovecot's (an unknown user is refused at RCPT), virtual aliases from a texthash: map
// (no postmap), delivery to Dovecot over LMTP, XFORWARD allowed from 127.0.0.0/8.
//
// Everything lives in one temp dir: conf/ (main.cf, master.cf, the maps), queue/, data/ (owned by
// postfix, as Postfix requires) and the log (maillog_file: without syslog, Postfix's own errors
// are seen nowhere else). Started and stopped with `postfix -c DIR start|stop`, as root; on this
// machine that needed no alternate_config_directories entry in /etc/postfix/main.cf (it would for
// a non-root caller, or for Postfix's set-gid commands such as sendmail and postqueue).

import { existsSync, readFileSync, rmSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import { freePort } from "../../scripts/free-port.ts";

export interface PostfixOptions {
  /** Dovecot's LMTP listener. */
  lmtp: { host: string; port: number };
  /** Real mailboxes (Dovecot's users); their domains are Postfix's virtual mailbox domains. */
  users: string[];
  /** virtual(5) lines. */
  virtual?: string;
  /** message_size_limit (Postfix's default is 10240000). */
  messageSizeLimit?: number;
}

export interface PostfixInstance {
  host: string;
  port: number;
  dir: string;
  /** Rewrites the virtual alias map (texthash: is read again by new smtpd/cleanup processes; reload makes it so now). */
  setVirtual(text: string): Promise<void>;
  /** The mail log so far. */
  log(): string;
  start(): Promise<void>;
  stop(): Promise<void>;
  dispose(): Promise<void>;
}

const INSTALL_HINT = "apt-get install -y postfix";
const HOST = "127.0.0.1";

function postfixBinary(): string | null {
  return Bun.which("postfix") ?? (existsSync("/usr/sbin/postfix") ? "/usr/sbin/postfix" : null);
}

/** master.cf: the services a relay to LMTP needs, none chrooted (the queue dir has no etc/ copies). */
function masterCf(port: number): string {
  const rows = [
    `${HOST}:${port} inet n - n - - smtpd`,
    "pickup unix n - n 60 1 pickup",
    "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr",
    "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce",
    "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush",
    "proxymap unix - - n - - proxymap",
    "smtp unix - - n - - smtp",
    "relay unix - - n - - smtp",
    "showq unix n - n - - showq",
    "error unix - - n - - error",
    "retry unix - - n - - error",
    "discard unix - - n - - discard",
    "lmtp unix - - n - - lmtp",
    "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd",
  ];
  return rows.join("\n") + "\n";
}

function mainCf(dir: string, o: PostfixOptions): string {
  const domains = [...new Set(o.users.map((u) => u.slice(u.lastIndexOf("@") + 1)))];
  return `compatibility_level = 3.6
queue_directory = ${dir}/queue
data_directory = ${dir}/data
maillog_file = ${dir}/log/maillog
maillog_file_prefixes = ${dir}/log
myhostname = mx.relay.test
mydomain = relay.test
myorigin = relay.test
mydestination =
inet_interfaces = ${HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_authorized_xforward_hosts = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
local_header_rewrite_clients =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtputf8_enable = yes
recipient_delimiter = +
virtual_mailbox_domains = ${domains.join(" ")}
virtual_mailbox_maps = texthash:${dir}/conf/mailboxes
virtual_alias_maps = texthash:${dir}/conf/virtual
virtual_transport = lmtp:inet:${o.lmtp.host}:${o.lmtp.port}
message_size_limit = ${o.messageSizeLimit ?? 26 * 1024 * 1024 + 65536}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
`;
}

export async function startPostfix(o: PostfixOptions): Promise<PostfixInstance> {
  const bin = postfixBinary();
  if (!bin) throw new Error(`Postfix is not installed (no "postfix" binary found). Install it with: ${INSTALL_HINT}`);
  const postfixUser = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .map((l) => l.split(":"))
    .find(([name]) => name === "postfix");
  if (!postfixUser) throw new Error(`no "postfix" user (the package creates it). Install it with: ${INSTALL_HINT}`);

  const dir = await mkdtemp("/tmp/pf-");
  await chmod(dir, 0o755); // mkdtemp's 0700 would keep the postfix user out of data/
  const port = await freePort();
  const conf = join(dir, "conf");
  for (const sub of ["conf", "queue", "data", "log"]) await mkdir(join(dir, sub), { mode: 0o755 });
  await chown(join(dir, "data"), Number(postfixUser[2]), Number(postfixUser[3]));
  await writeFile(join(conf, "main.cf"), mainCf(dir, o));
  await writeFile(join(conf, "master.cf"), masterCf(port));
  await writeFile(join(conf, "mailboxes"), o.users.map((u) => `${u} ok\n`).join(""));
  await writeFile(join(conf, "virtual"), o.virtual ?? "");
  const logPath = join(dir, "log", "maillog");
  const log = () => (existsSync(logPath) ? readFileSync(logPath, "latin1") : "");

  const run = (...args: string[]) => {
    const r = Bun.spawnSync([bin, "-c", conf, ...args], { stdout: "pipe", stderr: "pipe" });
    return { code: r.exitCode, out: r.stdout.toString() + r.stderr.toString() };
  };
  let running = false;

  const instance: PostfixInstance = {
    host: HOST,
    port,
    dir,
    async setVirtual(text) {
      await writeFile(join(conf, "virtual"), text);
      if (running) run("reload");
    },
    log,
    async start() {
      if (running) return;
      const check = run("check");
      if (check.code !== 0) throw new Error(`postfix check failed (${dir}): ${check.out}\n${log()}`);
      const started = run("start");
      if (started.code !== 0) throw new Error(`postfix start failed (${dir}): ${started.out}\n--- maillog ---\n${log()}`);
      running = true;
      // smtpd is spawned on the first connection: ready once the greeting comes.
      const deadline = Date.now() + 15_000;
      for (;;) {
        const line = await greeting(port).catch((e: Error) => e.message);
        if (line.startsWith("220")) return;
        if (Date.now() > deadline) throw new Error(`Postfix on ${HOST}:${port} did not greet within 15 s (last: ${line})\n--- maillog ---\n${log()}`);
        await Bun.sleep(100);
      }
    },
    async stop() {
      if (!running) return;
      running = false;
      run("stop");
      // `postfix stop` returns before the master has closed the listener.
      const deadline = Date.now() + 10_000;
      while (!(await refuses(port))) {
        if (Date.now() > deadline) {
          run("abort");
          break;
        }
        await Bun.sleep(50);
      }
    },
    async dispose() {
      live.delete(instance);
      try {
        await instance.stop();
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    },
  };
  live.add(instance);
  try {
    await instance.start();
  } catch (e) {
    await instance.dispose();
    throw e;
  }
  return instance;
}

// A test that dies leaves no master behind: stop every instance still running at exit.
const live = new Set<PostfixInstance>();
process.on("exit", () => {
  for (const p of live) {
    try {
      Bun.spawnSync([postfixBinary() ?? "postfix", "-c", join(p.dir, "conf"), "abort"]);
      rmSync(p.dir, { recursive: true, force: true });
    } catch {}
  }
});

function greeting(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, HOST);
    const timer = setTimeout(() => (s.destroy(), reject(new Error("no greeting"))), 2_000);
    s.once("data", (d) => {
      clearTimeout(timer);
      s.end("QUIT\r\n");
      resolve(d.toString("latin1").trim());
    });
    s.once("error", (e) => (clearTimeout(timer), reject(e)));
  });
}

function refuses(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, HOST);
    s.once("connect", () => (s.destroy(), resolve(false)));
    s.once("error", () => resolve(true));
  });
}
