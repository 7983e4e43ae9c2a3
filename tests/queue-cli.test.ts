// `bun run server.ts queue ...` as an operator runs it, as a real process: `list` only reads and
// shows what it cannot read; `purge-failed` copes with what it finds; every error is one line
// with exit code 2 (wrong command line) or 1 (the spool could not do it), never a stack trace.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { SpoolHeader } from "../host/spool-file.ts";
import { Spool } from "../host/spool.ts";
import { runRelayCommand } from "./support/relay-process.ts";
import { allowSlowTests } from "./support/timeout.ts";
import { snapshot } from "./support/tree.ts";

allowSlowTests();

let dir: string;
let spool: Spool;

beforeEach(async () => {
  dir = await mkdtemp("/tmp/queue-cli-test-");
  spool = new Spool(dir);
  spool.prepare();
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function spoolMessage(text: string, from = "sender@example.org"): Promise<SpoolHeader> {
  const staged = spool.stage();
  await staged.write(new TextEncoder().encode(text));
  return staged.commit({ from, to: ["user@example.test"], received_at: Date.now(), message_id: null });
}

const queue = (...args: string[]) => runRelayCommand({ SPOOL_DIR: dir }, ["queue", ...args]);

/** Exactly one line on stderr, and nothing that looks like a stack trace. */
function expectOneLine(stderr: string): string {
  const lines = stderr.trimEnd().split("\n");
  expect(lines.length).toBe(1);
  expect(stderr).not.toMatch(/^\s+at /m);
  return lines[0]!;
}

describe("queue list", () => {
  test("only reads: junk, a directory, a link to /etc/passwd and a damaged message stay where they are, byte for byte, and are shown with what is wrong", async () => {
    const good = await spoolMessage("a message", "jürgen@example.org");
    const damaged = await spoolMessage("to be cut");
    writeFileSync(join(dir, "queue", damaged.id), readFileSync(join(dir, "queue", damaged.id)).subarray(0, 50));
    writeFileSync(join(dir, "queue", "0000000000junk"), "junk");
    mkdirSync(join(dir, "queue", "0000000000adirectory"));
    symlinkSync("/etc/passwd", join(dir, "queue", "0000000000passwd"));
    writeFileSync(join(dir, "failed", "0000000000oldjunk"), "moved here by an older version");
    writeFileSync(join(dir, "failed", "0000000000oldjunk.state"), JSON.stringify({ attempts: 0, next_at: 0, last_reply: null, remaining: [], reason: "unreadable spool file: not a spool file" }));

    const before = snapshot(dir);
    const r = await queue("list");
    expect(snapshot(dir)).toEqual(before);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe("");
    const out = r.stdout;
    expect(out).toContain("queued: 1\n");
    expect(out).toContain(`${good.id} `);
    expect(out).toContain("jürgen@example.org -> user@example.test");
    expect(out).toContain("failed: 0\n");
    expect(out).toContain("unreadable: 5 ");
    expect(out).toContain(`queue/${damaged.id}  truncated inside its header`);
    expect(out).toContain("queue/0000000000junk  not a spool file (no spool header)");
    expect(out).toContain("queue/0000000000adirectory  a directory, not a spool file");
    expect(out).toContain("queue/0000000000passwd  a symbolic link, not a spool file (not followed)");
    expect(out).toContain("failed/0000000000oldjunk  not a spool file (no spool header)\n    unreadable spool file: not a spool file");
    expect(out).not.toContain("root:"); // /etc/passwd was never read
  });

  test("what comes from outside (an envelope with a C1 control, a file name with a line break) is printed escaped, one entry per line", async () => {
    const h = await spoolMessage("x", "evil\u009b31m\u2028@example.org");
    writeFileSync(join(dir, "queue", "bad\nname\u001b[2J"), "x");
    const r = await queue("list");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`${h.id} `);
    expect(r.stdout).toContain("evil\\u009b31m\\u2028@example.org -> user@example.test");
    expect(r.stdout).toContain("queue/bad\\u000aname\\u001b[2J  not a spool file (its name is not a spool id)\n");
    expect(r.stdout).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028]/);
  });

  test("state files of another shape (a reason that is a number, refused: {}) do not stop it: every entry is listed, the unknown reason said so", async () => {
    const failed = await spoolMessage("failed, its state rewritten");
    await spool.moveToFailed(failed.id, "refused: 550 5.1.1 no such user");
    writeFileSync(join(dir, "failed", `${failed.id}.state`), JSON.stringify({ attempts: 3, next_at: 0, last_reply: null, remaining: ["user@example.test"], reason: 5 }));
    const waiting = await spoolMessage("waiting");
    writeFileSync(join(dir, "queue", `${waiting.id}.state`), JSON.stringify({ attempts: 2, next_at: 0, last_reply: "451 busy", remaining: ["user@example.test"], refused: {} }));
    const later = await spoolMessage("listed after them");
    await spool.moveToFailed(later.id, "refused: 552 over quota");

    const r = await queue("list");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("queued: 1\n");
    expect(r.stdout).toContain(`${waiting.id} `);
    expect(r.stdout).toContain("failed: 2\n");
    expect(r.stdout).toContain(`${failed.id} `);
    expect(r.stdout).toContain("not known: its state file is missing or damaged");
    expect(r.stdout).toContain(`${later.id} `);
    expect(r.stdout).toContain("refused: 552 over quota");
    expect(r.stdout).toContain("unreadable: 0\n");
  });

  test("an empty spool: zero of each", async () => {
    const r = await queue("list");
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("queued: 0\nfailed: 0\nunreadable: 0\n");
  });

  test("a spool directory that does not exist: one line naming it, exit 1, and nothing is created", async () => {
    const missing = join(dir, "no-such-spool");
    const r = await runRelayCommand({ SPOOL_DIR: missing }, ["queue", "list"]);
    expect(r.code).toBe(1);
    const line = expectOneLine(r.stderr);
    expect(line).toStartWith("queue list: ");
    expect(line).toContain("ENOENT");
    expect(line).toContain(missing);
    expect(existsSync(missing)).toBe(false);
  });
});

describe("queue retry", () => {
  test("a path instead of an id: one line, exit 2, nothing moved", async () => {
    const before = snapshot(dir);
    for (const arg of ["../../etc/passwd", "../queue/x", "", "A".repeat(10)]) {
      const r = await queue("retry", arg);
      expect(`${arg}: ${r.code}`).toBe(`${arg}: 2`);
      expectOneLine(r.stderr);
    }
    expect(snapshot(dir)).toEqual(before);
  });

  test("an id that is not in failed/: one line saying so, exit 1", async () => {
    const r = await queue("retry", "0000000000nosuchid");
    expect(r.code).toBe(1);
    expect(expectOneLine(r.stderr)).toBe(`queue retry: no message 0000000000nosuchid in failed/ (SPOOL_DIR=${dir})`);
  });

  test("a failed entry that is a link or unreadable is not put back: one line, exit 1, the link not followed", async () => {
    const elsewhere = await mkdtemp("/tmp/queue-cli-outside-");
    const other = new Spool(elsewhere);
    other.prepare();
    const staged = other.stage();
    await staged.write(new TextEncoder().encode("outside"));
    const h = await staged.commit({ from: "", to: ["user@example.test"], received_at: Date.now(), message_id: null });
    symlinkSync(join(elsewhere, "queue", h.id), join(dir, "failed", h.id));
    writeFileSync(join(dir, "failed", "0000000000junk"), "junk");
    try {
      const link = await queue("retry", h.id);
      expect(link.code).toBe(1);
      expect(expectOneLine(link.stderr)).toContain("a symbolic link, not a spool file (not followed)");
      const junk = await queue("retry", "0000000000junk");
      expect(junk.code).toBe(1);
      expect(expectOneLine(junk.stderr)).toContain("not a spool file");
      expect(readdirSync(join(dir, "queue"))).toEqual([]);
    } finally {
      await rm(elsewhere, { recursive: true, force: true });
    }
  });

  test("a failed message goes back to the queue", async () => {
    const h = await spoolMessage("back");
    await spool.moveToFailed(h.id, "refused: 550 5.1.1 no such user");
    const r = await queue("retry", h.id);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`${h.id} is back in the queue\n`);
    expect(readdirSync(join(dir, "queue")).sort()).toEqual([h.id, `${h.id}.state`]);
  });
});

describe("queue purge-failed", () => {
  test("a directory in failed/ does not stop it: the rest is removed, and it says what it removed and left", async () => {
    const a = await spoolMessage("a");
    await spool.moveToFailed(a.id, "refused");
    mkdirSync(join(dir, "failed", "0000000000adirectory"));
    writeFileSync(join(dir, "failed", "0000000000junk"), "junk");
    const r = await queue("purge-failed");
    expect(r.code).toBe(0);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe(
      `removed 2 failed message(s): ${["0000000000junk", a.id].sort().join(", ")}\n` + "left in failed/: 0000000000adirectory: a directory (the spool never makes one here)\n",
    );
    expect(readdirSync(join(dir, "failed"))).toEqual(["0000000000adirectory"]);
  });
});

describe("usage and other errors", () => {
  test("an unknown subcommand or extra arguments: usage on one line, exit 2", async () => {
    for (const args of [["frobnicate"], [], ["list", "extra"], ["retry", "0000000000aaaa", "more"]]) {
      const r = await queue(...args);
      expect(`${args.join(" ")}: ${r.code}`).toBe(`${args.join(" ")}: 2`);
      expect(expectOneLine(r.stderr)).toContain("usage:");
    }
  });

  test("flush on a spool directory that does not exist: one line, exit 1", async () => {
    const r = await runRelayCommand({ SPOOL_DIR: join(dir, "missing") }, ["queue", "flush"]);
    expect(r.code).toBe(1);
    expect(expectOneLine(r.stderr)).toStartWith("queue flush: ");
  });

  test("no SPOOL_DIR: one line, exit 2", async () => {
    const r = await runRelayCommand({}, ["queue", "list"]);
    expect(r.code).toBe(2);
    expect(expectOneLine(r.stderr)).toContain("SPOOL_DIR is not set");
  });
});
