// Start-up against a disk that cannot take the spool, as a real process (`bun run server.ts`): a
// full disk (a small tmpfs, filled), a read-only one, a delivered-log that cannot be opened, a port
// in use. Each stops the host with one line on stderr naming the setting, exit code 2, never a
// stack trace. And the files a running host makes in its spool are the owner's only.

import { afterEach, describe, expect, test } from "bun:test";
import { appendFileSync, chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { freePort } from "../../scripts/free-port.ts";
import { runRelayCommand, startRelay } from "../support/relay-process.ts";
import { allowSlowTests } from "../support/timeout.ts";

allowSlowTests();

const API_KEY = `startup_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const cleanup: (() => Promise<void>)[] = [];

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function tempDir(): Promise<string> {
  const d = await mkdtemp("/tmp/startup-disk-");
  cleanup.push(() => rm(d, { recursive: true, force: true }));
  return d;
}

function sh(...cmd: string[]): void {
  const r = Bun.spawnSync(cmd);
  // CI runs as root on the same kind of machine: a mount that fails is a broken set-up, never a skip.
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed (these tests mount a tmpfs and need root): ${r.stderr.toString().trim()}`);
}

/** A tmpfs of `size` mounted on a new directory, unmounted after the test. */
async function tmpfs(size: string): Promise<string> {
  const mnt = await tempDir();
  sh("mount", "-t", "tmpfs", "-o", `size=${size}`, "tmpfs", mnt);
  cleanup.push(async () => sh("umount", mnt));
  return mnt;
}

/** Appends to a file until the disk says ENOSPC. */
function fill(mnt: string): void {
  const chunk = Buffer.alloc(4096, 0x78);
  for (;;) {
    try {
      appendFileSync(join(mnt, "filler"), chunk);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOSPC") return;
      throw e;
    }
  }
}

async function start(env: Record<string, string>) {
  return runRelayCommand({ API_KEY, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(await freePort()), HOST: "127.0.0.1", PORT: String(await freePort()), ...env }, []);
}

/** Exit 2, and exactly one line on stderr (no stack trace) containing each of `words`. */
function expectOneLineExit2(r: { code: number; stderr: string }, ...words: string[]): string {
  expect(r.stderr).not.toMatch(/^\s+at /m);
  const lines = r.stderr.trimEnd().split("\n");
  expect(lines).toHaveLength(1);
  for (const w of words) expect(lines[0]).toContain(w);
  expect(r.code).toBe(2);
  return lines[0]!;
}

describe("start-up on a disk that cannot take the spool", () => {
  test("a full disk, spool not created yet: one line naming SPOOL_DIR, exit 2", async () => {
    const mnt = await tmpfs("64k");
    fill(mnt);
    const spool = join(mnt, "spool");
    expectOneLineExit2(await start({ SPOOL_DIR: spool }), `SPOOL_DIR=${spool}`, "ENOSPC");
  });

  test("a full disk under a spool (and delivered-log) a previous run left: one line naming SPOOL_DIR, exit 2", async () => {
    const mnt = await tmpfs("1m");
    const spool = join(mnt, "spool");
    const first = await startRelay({ API_KEY, LMTP_PORT: String(await freePort()), SPOOL_DIR: spool });
    expect(await first.kill("SIGTERM")).toBe(0);
    expect(existsSync(join(spool, "delivered.sqlite"))).toBe(true);
    fill(mnt);
    expectOneLineExit2(await start({ SPOOL_DIR: spool }), `SPOOL_DIR=${spool}`, "ENOSPC");
  });

  test("a read-only disk under an existing spool: one line naming SPOOL_DIR, exit 2", async () => {
    const mnt = await tmpfs("1m");
    const spool = join(mnt, "spool");
    for (const d of ["tmp", "queue", "failed"]) mkdirSync(join(spool, d), { recursive: true });
    sh("mount", "-o", "remount,ro", mnt);
    expectOneLineExit2(await start({ SPOOL_DIR: spool }), `SPOOL_DIR=${spool}`, "EROFS");
  });

  test("a delivered-log that cannot be opened (a directory in its place): one line naming SPOOL_DIR and the file, exit 2", async () => {
    const spool = await tempDir();
    mkdirSync(join(spool, "delivered.sqlite"));
    expectOneLineExit2(await start({ SPOOL_DIR: spool }), `SPOOL_DIR=${spool}`, "delivered.sqlite");
  });

  test("a port already in use: one line naming PORT, exit 2", async () => {
    const port = await freePort();
    const taken = Bun.serve({ hostname: "127.0.0.1", port, fetch: () => new Response("taken") });
    try {
      expectOneLineExit2(await start({ PORT: String(port) }), `PORT=${port}`);
    } finally {
      taken.stop(true);
    }
  });
});

describe("file modes of a running host's spool", () => {
  test("folders 0700; messages, state files, delivered.sqlite and its -wal and -shm 0600, also where an older version left them 0644/0755", async () => {
    const spool = await tempDir();
    for (const d of ["tmp", "queue", "failed"]) {
      mkdirSync(join(spool, d));
      chmodSync(join(spool, d), 0o755);
    }
    writeFileSync(join(spool, "delivered.sqlite"), "");
    chmodSync(join(spool, "delivered.sqlite"), 0o644);
    // Nothing listens on LMTP_PORT: the message is spooled (202) and retried.
    const relay = await startRelay({ API_KEY, LMTP_PORT: String(await freePort()), SPOOL_DIR: spool });
    cleanup.push(async () => void (await relay.kill("SIGKILL")));
    const r = await fetch(relay.url + INBOUND_PATH, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": API_KEY, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.test" },
      body: "Subject: modes\r\n\r\nbody\r\n",
    });
    expect(r.status).toBe(202);
    const mode = (p: string) => `${p.slice(spool.length)} ${(lstatSync(p).mode & 0o777).toString(8)}`;
    for (const d of ["tmp", "queue", "failed"]) expect(mode(join(spool, d))).toBe(`/${d} 700`);
    // The message, and its state file (written just after the answer).
    for (let i = 0; readdirSync(join(spool, "queue")).length < 2 && i < 100; i++) await Bun.sleep(20);
    const queued = readdirSync(join(spool, "queue"));
    expect(queued.length).toBe(2);
    for (const f of queued) expect(mode(join(spool, "queue", f))).toBe(`/queue/${f} 600`);
    const sqlite = readdirSync(spool).filter((f) => f.startsWith("delivered.sqlite"));
    expect(sqlite.sort()).toEqual(["delivered.sqlite", "delivered.sqlite-shm", "delivered.sqlite-wal"]);
    for (const f of sqlite) expect(mode(join(spool, f))).toBe(`/${f} 600`);
  });

  test("a spool folder the host creates is 0700", async () => {
    const parent = await tempDir();
    const spool = join(parent, "new", "spool");
    const relay = await startRelay({ API_KEY, LMTP_PORT: String(await freePort()), SPOOL_DIR: spool });
    cleanup.push(async () => void (await relay.kill("SIGKILL")));
    expect((lstatSync(spool).mode & 0o777).toString(8)).toBe("700");
  });
});
