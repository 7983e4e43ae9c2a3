// A private rspamd (Debian's package) for a test file, with its own DNS: the stock configuration
// (/etc/rspamd/rspamd.conf, read as it is) with LOCAL_CONFDIR, DBDIR, RUNDIR and LOGDIR in one temp
// dir, the normal worker and the controller on free ports, the proxy off, and a private dnsmasq
// as its only resolver: no scan waits on a network that is not there (with a resolver that never
// answers, each scan takes 3 s), and a test can publish the records it needs (SPF, A, PTR).
//
// rspamd compiles its regular expressions with Hyperscan at start-up (about 15 s on a 2-core
// machine); the compiled cache is kept in one folder under the system's temp dir and shared by
// every instance, as DBDIR would keep it for an operator (rspamd writes it under a name of its
// own and renames it into place, so instances starting at once do not see half a file). Its first
// start pays; the next ones take about a second.
//
// Nothing is optional: without rspamd or dnsmasq, startRspamd throws (a failure, never a skip).

import { existsSync, mkdirSync, rmSync } from "node:fs";
import { mkdir, mkdtemp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import type { Subprocess } from "bun";
import { freePort } from "../../scripts/free-port.ts";

const INSTALL_HINT = "apt-get install -y rspamd dnsmasq-base (bun run setup does)";
const HS_CACHE = join(tmpdir(), "relay-test-rspamd-hyperscan");
const READY_TIMEOUT_MS = 90_000;

export interface RspamdOptions {
  /** dnsmasq record options for the test's names: "--txt-record=example.org,v=spf1 ...", "--host-record=...". */
  dns?: string[];
  /** More files under LOCAL_CONFDIR (e.g. "local.d/actions.conf", "rspamd.local.lua"), replacing the defaults. */
  files?: Record<string, string>;
  /** More lines for local.d/options.inc, after the test's own resolver. */
  options?: string;
  /**
   * "127.0.0.1:port" of a resolver of the test's own, asked instead of the private dnsmasq (which
   * then does not run): one that answers late, or never.
   */
  resolver?: string;
}

export interface RspamdInstance {
  /** rspamd's normal worker: what RSPAMD_URL names. */
  url: string;
  /** The controller (rspamc's learn_spam / learn_ham go there). */
  controllerUrl: string;
  /** Its DNS server, "127.0.0.1:port" (node:dns's Resolver.setServers takes it). */
  dns: string;
  dir: string;
  /** rspamd's log so far. */
  log(): Promise<string>;
  stop(): Promise<void>;
  start(): Promise<void>;
  dispose(): Promise<void>;
}

function binary(name: string, fallback: string): string {
  const found = Bun.which(name) ?? (existsSync(fallback) ? fallback : null);
  if (!found) throw new Error(`${name} is not installed. Install it with: ${INSTALL_HINT}`);
  return found;
}

// Process groups still running; killed on exit so a crashed test run leaves nothing behind.
const groups = new Set<number>();
process.on("exit", () => {
  for (const g of groups) killGroup(g, "SIGKILL");
});
function killGroup(pid: number, signal: NodeJS.Signals | 0): boolean {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false;
  }
}

/** Test-only rules: an action forced by the envelope sender's local part, as rspamd's own modules would set it. */
export const FORCED_ACTIONS_LUA = `-- Test only (tests/support/rspamd.ts): actions forced by the envelope sender's local part.
local forced = rspamd_config:register_symbol({
  name = 'RELAY_TEST_FORCED',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local from = task:get_from('smtp')
    local user = from and from[1] and from[1].user or ''
    if user == 'force-soft-reject' then
      task:set_pre_result('soft reject', 'Try again later (test)', 'RELAY_TEST')
    elseif user == 'force-greylisted' then
      -- What the greylist module does when it greylists with action = "greylist".
      task:insert_result('GREYLIST', 0.0, 'greylisted', 'Thu, 01 Jan 2099 00:00:00 UTC', 'new record')
      task:set_pre_result('greylist', 'Try again later', 'RELAY_TEST')
    elseif user == 'force-greylist-band' then
      task:set_pre_result('greylist', 'score in the greylist band', 'RELAY_TEST')
    elseif user == 'force-add-header' then
      task:set_pre_result('add header', 'spam (test)', 'RELAY_TEST')
    end
  end,
})
-- The greylist module's symbol (the module itself needs Redis, which the tests do not run).
rspamd_config:register_symbol({ name = 'GREYLIST', type = 'virtual', parent = forced })
`;

export async function startRspamd(opts: RspamdOptions = {}): Promise<RspamdInstance> {
  const rspamd = binary("rspamd", "/usr/bin/rspamd");
  const dnsmasq = binary("dnsmasq", "/usr/sbin/dnsmasq");
  const dir = await mkdtemp(join(tmpdir(), "rspamd-"));
  for (const sub of ["conf/local.d", "db", "run", "log"]) await mkdir(join(dir, sub), { recursive: true });
  mkdirSync(HS_CACHE, { recursive: true });
  const [port, controllerPort, dnsPort] = [await freePort(), await freePort(), await freePort()];
  const files: Record<string, string> = {
    "local.d/worker-normal.inc": `bind_socket = "127.0.0.1:${port}";\ncount = 1;\n`,
    "local.d/worker-controller.inc": `bind_socket = "127.0.0.1:${controllerPort}";\n`,
    "local.d/worker-proxy.inc": "count = 0;\n",
    "local.d/options.inc": `dns {\n  nameserver = ["${opts.resolver ?? `127.0.0.1:${dnsPort}`}"];\n}\nhs_cache_dir = "${HS_CACHE}";\n${opts.options ?? ""}`,
    "local.d/logging.inc": 'level = "info";\n',
    "rspamd.local.lua": FORCED_ACTIONS_LUA,
    ...opts.files,
  };
  for (const [path, text] of Object.entries(files)) {
    await mkdir(dirname(join(dir, "conf", path)), { recursive: true });
    await writeFile(join(dir, "conf", path), text);
  }

  let rspamdPid: number | null = null;
  let dnsPid: number | null = null;
  const spawnGroup = (cmd: string[], name: string): Subprocess => {
    const p = Bun.spawn(cmd, { stdin: "ignore", stdout: Bun.file(join(dir, "log", `${name}.out`)), stderr: Bun.file(join(dir, "log", `${name}.err`)), detached: true });
    groups.add(p.pid);
    p.unref();
    return p;
  };
  const stopGroup = async (pid: number | null) => {
    if (pid === null) return;
    killGroup(pid, "SIGTERM");
    const deadline = Date.now() + 5_000;
    while (killGroup(pid, 0) && Date.now() < deadline) await Bun.sleep(50);
    killGroup(pid, "SIGKILL");
    while (killGroup(pid, 0)) await Bun.sleep(20);
    groups.delete(pid);
  };
  const url = `http://127.0.0.1:${port}`;
  const log = () => readFile(join(dir, "log", "rspamd.log"), "utf8").catch(() => "");

  async function start(): Promise<void> {
    if (dnsPid === null && !opts.resolver) {
      const records = opts.dns ?? [];
      dnsPid = spawnGroup(
        [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", `--port=${dnsPort}`, "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/#/", ...records],
        "dnsmasq",
      ).pid;
    }
    if (rspamdPid !== null) return;
    const vars = [`--var=LOCAL_CONFDIR=${join(dir, "conf")}`, `--var=DBDIR=${join(dir, "db")}`, `--var=RUNDIR=${join(dir, "run")}`, `--var=LOGDIR=${join(dir, "log")}`];
    const proc = spawnGroup([rspamd, "-f", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf", ...vars], "rspamd");
    rspamdPid = proc.pid;
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      const pong = await fetch(`${url}/ping`, { signal: AbortSignal.timeout(1_000) })
        .then((r) => r.text())
        .catch(() => "");
      if (pong.trim() === "pong") return;
      if (proc.exitCode !== null || Date.now() > deadline) {
        const why = proc.exitCode !== null ? `rspamd exited with code ${proc.exitCode}` : `no pong within ${READY_TIMEOUT_MS} ms`;
        const out = (await readFile(join(dir, "log", "rspamd.err"), "utf8").catch(() => "")) + (await log()).split("\n").slice(-30).join("\n");
        await stop();
        throw new Error(`rspamd did not start (${why}):\n${out}`);
      }
      await Bun.sleep(100);
    }
  }

  /** rspamd only: its resolver stays up (a restarted rspamd finds it again). */
  async function stop(): Promise<void> {
    const pid = rspamdPid;
    rspamdPid = null;
    await stopGroup(pid);
  }

  try {
    await start();
  } catch (e) {
    await stopGroup(dnsPid);
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  return {
    url,
    controllerUrl: `http://127.0.0.1:${controllerPort}`,
    dns: opts.resolver ?? `127.0.0.1:${dnsPort}`,
    dir,
    log,
    stop,
    start,
    async dispose() {
      await stop();
      await stopGroup(dnsPid);
      dnsPid = null;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
