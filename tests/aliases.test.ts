// ALIASES_FILE (host/aliases.ts): Postfix virtual(5) lines, refused with their line number when
// they loop or reach too many addresses; the expansion before LMTP (each address once, ORCPT), the
// answer in the sender's own addresses, reload on change, SIGHUP-style reload() and a bad file.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdir, mkdtemp, open, rm, symlink, writeFile, rename } from "node:fs/promises";
import { join } from "node:path";
import { AliasError, AliasMap, AliasesFile, MAX_ADDRESSES, expandRecipients, foldResults } from "../host/aliases.ts";
import { fromEnv } from "../shared/config-env.ts";
import { ServerEnv } from "../host/config.ts";
import type { LogLine } from "../shared/log.ts";
import { INBOUND_PATH, type RecipientResult } from "../shared/contract.ts";
import { startServer } from "../server.ts";
import { startRelay } from "./support/relay-process.ts";
import { startScripted } from "./support/scripted-lmtp.ts";
import { allowSlowTests } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});
async function tempDir(): Promise<string> {
  const d = await mkdtemp("/tmp/aliases-");
  dirs.push(d);
  return d;
}

const FILE = `# the operator's aliases
info@example.test        alice@example.test
sales@example.test       alice@example.test, bob@example.test,
                         info@example.test
postmaster@example.test  info@example.test
self@example.test        self@example.test bob@example.test
@catch.test              alice@example.test
`;

function refusedAt(text: string): string {
  try {
    AliasMap.parse(text);
  } catch (e) {
    expect(e).toBeInstanceOf(AliasError);
    return (e as Error).message;
  }
  throw new Error("the file was accepted");
}

describe("AliasMap.parse and expand", () => {
  const map = AliasMap.parse(FILE);

  test("an alias, a fan-out reaching an address twice (once), a continuation line, a recursive target, case", () => {
    expect(map.expand("info@example.test")).toEqual(["alice@example.test"]);
    expect(map.expand("sales@example.test")).toEqual(["alice@example.test", "bob@example.test"]);
    expect(map.expand("postmaster@example.test")).toEqual(["alice@example.test"]);
    expect(map.expand("Info@EXAMPLE.test")).toEqual(["alice@example.test"]);
    expect(map.expand("carol@example.test")).toEqual(["carol@example.test"]); // no line: itself
  });

  test("a target equal to its key is delivered there too (Postfix's user@x user@x, copy@y)", () => {
    expect(map.expand("self@example.test")).toEqual(["self@example.test", "bob@example.test"]);
  });

  test("the catch-all takes every address of its domain without a line of its own, after exact lines", () => {
    expect(map.expand("anyone@catch.test")).toEqual(["alice@example.test"]);
    const both = AliasMap.parse("@catch.test alice@example.test\nbob@catch.test bob@example.test\n");
    expect(both.expand("bob@catch.test")).toEqual(["bob@example.test"]);
    expect(both.expand("zed@catch.test")).toEqual(["alice@example.test"]);
  });

  test("addresses made up for a catch-all domain are not kept: what the map holds stays the size of the file", () => {
    const catchAll = AliasMap.parse("@catch.test alice@example.test\nbob@catch.test bob@example.test\n");
    const held = () => (catchAll as unknown as { memo: Map<string, string[]> }).memo.size;
    const before = held();
    for (let i = 0; i < 10_000; i++) expect(catchAll.expand(`random${i}@catch.test`)).toEqual(["alice@example.test"]);
    expect(held()).toBe(before);
    expect(before).toBeLessThanOrEqual(2);
  });

  test("a loop is refused with the line that closes it", () => {
    expect(refusedAt("# x\na@x.test b@x.test\nb@x.test c@x.test\nc@x.test a@x.test\n")).toBe("line 4: a@x.test -> b@x.test -> c@x.test -> a@x.test is a loop");
    // Through two catch-alls.
    expect(refusedAt("@a.test x@b.test\n@b.test y@a.test\n")).toMatch(/^line \d: .* is a loop$/);
  });

  test(`more than ${MAX_ADDRESSES} addresses from one recipient is refused with its line`, () => {
    const many = Array.from({ length: MAX_ADDRESSES + 1 }, (_, i) => `u${i}@x.test`);
    expect(refusedAt(`ok@x.test a@x.test\nbig@x.test ${many.join(", ")}\n`)).toBe(`line 2: big@x.test reaches more than ${MAX_ADDRESSES} addresses`);
    // Through nesting: 2 lists of 600 behind one alias.
    const half = (p: string) => Array.from({ length: 600 }, (_, i) => `${p}${i}@x.test`).join(" ");
    expect(refusedAt(`a@x.test ${half("a")}\nb@x.test ${half("b")}\nall@x.test a@x.test b@x.test\n`)).toBe(`line 3: all@x.test reaches more than ${MAX_ADDRESSES} addresses`);
    expect(() => AliasMap.parse(`big@x.test ${many.slice(0, MAX_ADDRESSES).join(" ")}`)).not.toThrow();
  });

  test("lines that are no alias are refused with their number", () => {
    expect(refusedAt("a@x.test b@x.test\nlonely@x.test\n")).toBe("line 2: lonely@x.test has no target address");
    expect(refusedAt("user b@x.test")).toMatch(/^line 1: user is not of the form local@domain/);
    expect(refusedAt("a@x.test b@x.test\n\na@x.test c@x.test")).toBe("line 3: a@x.test is listed again (first on line 1)");
    expect(refusedAt("a@x.test <b@x.test>")).toMatch(/^line 1: target <b@x.test> contains a forbidden character/);
  });
});

describe("the expansion and the answer", () => {
  const map = AliasMap.parse(FILE);
  const ok = (address: string, extra: Partial<RecipientResult> = {}): RecipientResult => ({ address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 <${address}> Saved`, ...extra });

  test("each address reached once over all recipients, in the first form reached; ORCPT for those the sender did not use", () => {
    const e = expandRecipients(map, ["Alice@example.test", "info@example.test", "sales@example.test", "carol@example.test"]);
    expect(e.to).toEqual(["Alice@example.test", "bob@example.test", "carol@example.test"]);
    expect([...e.original]).toEqual([["bob@example.test", "sales@example.test"]]);
  });

  test("one address means one mailbox as Dovecot finds it (ASCII letters folded, nothing else): each gets its own copy, and a target goes on as written", () => {
    // Before, toLowerCase() made one of each pair: the second was answered with the first's 250
    // and never sent anything (the Kelvin sign "K" folds to "k"; Dovecot's %Lu does not).
    const kelvin = "\u212Aim@example.test";
    const e = expandRecipients(map, ["kim@example.test", kelvin, "\u00c4rger@example.test", "\u00e4rger@example.test", "KIM@example.test"]);
    expect(e.to).toEqual(["kim@example.test", kelvin, "\u00c4rger@example.test", "\u00e4rger@example.test"]);
    const folded = foldResults(e, e.to.map((a) => ok(a)));
    expect(folded.map((r) => r.reply)).toEqual([...e.to, "kim@example.test"].map((a) => `250 2.0.0 <${a}> Saved`));
    const team = AliasMap.parse("team@example.test \u00c4rger@example.test, Bob@Example.test\n");
    expect(team.expand("TEAM@example.test")).toEqual(["\u00c4rger@example.test", "Bob@Example.test"]);
    expect(expandRecipients(team, ["team@example.test", "bob@example.test"]).to).toEqual(["\u00c4rger@example.test", "Bob@Example.test"]);
  });

  test("the answer keeps the sender's addresses: accepted when every address was; temporary if any is; refused when all are", () => {
    const e = expandRecipients(map, ["info@example.test", "sales@example.test", "carol@example.test"]);
    const all = foldResults(e, [ok("alice@example.test"), ok("bob@example.test"), ok("carol@example.test")]);
    expect(all.map((r) => [r.address, r.code])).toEqual([
      ["info@example.test", 250],
      ["sales@example.test", 250],
      ["carol@example.test", 250],
    ]);
    expect(all[1]!.reply).toContain("alias of alice@example.test, bob@example.test");
    expect(all[2]).toEqual(ok("carol@example.test")); // no alias: its own result, untouched

    const bobLater = foldResults(e, [ok("alice@example.test"), { address: "bob@example.test", code: 451, enhanced: "4.3.0", reply: "451 4.3.0 try later" }, ok("carol@example.test")]);
    expect(bobLater.map((r) => r.code)).toEqual([250, 451, 250]);

    const bobGone = foldResults(e, [ok("alice@example.test"), { address: "bob@example.test", code: 550, enhanced: "5.1.1", reply: "550 5.1.1 no bob" }, ok("carol@example.test")]);
    expect(bobGone[1]!.code).toBe(250);
    expect(bobGone[1]!.reply).toContain("refused: 550 5.1.1 no bob");

    const nobody = foldResults(expandRecipients(map, ["info@example.test"]), [{ address: "alice@example.test", code: 550, enhanced: "5.1.1", reply: "550 5.1.1 no alice" }]);
    expect(nobody).toEqual([{ address: "info@example.test", code: 550, enhanced: "5.1.1", reply: "550 5.1.1 no alice (alias of alice@example.test)" }]);

    const queued = foldResults(expandRecipients(map, ["sales@example.test"]), [ok("alice@example.test"), ok("bob@example.test", { queued: true })]);
    expect(queued[0]).toMatchObject({ address: "sales@example.test", queued: true });
    expect(queued[0]!.duplicate).toBeUndefined();
  });
});

describe("AliasesFile: loaded, reloaded, kept", () => {
  test("a change on disk is picked up; a bad file keeps the previous map and says why; reload() reads it again", async () => {
    const dir = await tempDir();
    const path = join(dir, "aliases");
    await writeFile(path, "info@x.test alice@x.test\n");
    const log: LogLine[] = [];
    const file = AliasesFile.open(path, (l) => void log.push(l));
    try {
      expect(file.current.expand("info@x.test")).toEqual(["alice@x.test"]);
      // Replaced by rename, as editors and config tools do.
      await writeFile(join(dir, "aliases.new"), "info@x.test bob@x.test\n");
      await rename(join(dir, "aliases.new"), path);
      await until("the renamed file loaded", () => file.current.expand("info@x.test")[0] === "bob@x.test");
      await writeFile(path, "info@x.test loop@x.test\nloop@x.test info@x.test\n");
      await file.reload();
      expect(file.current.expand("info@x.test")).toEqual(["bob@x.test"]);
      await until("the refusal logged", () => log.some((l) => l.event === "aliases_not_reloaded"));
      expect(log.find((l) => l.event === "aliases_not_reloaded")).toMatchObject({ file: path, error: "line 2: info@x.test -> loop@x.test -> info@x.test is a loop", kept: 1 });
      await writeFile(path, "info@x.test carol@x.test\n");
      await file.reload();
      expect(file.current.expand("info@x.test")).toEqual(["carol@x.test"]);
    } finally {
      file.close();
    }
  });

  test("rewritten in place (nano, vim, `cat > aliases`): emptied, then cut mid-line, it is not used until whole; the previous map answers meanwhile", async () => {
    const dir = await tempDir();
    const path = join(dir, "aliases");
    await writeFile(path, "info@x.test alice@x.test\nsales@x.test alice@x.test\n");
    const log: LogLine[] = [];
    const file = AliasesFile.open(path, (l) => void log.push(l));
    const fh = await open(path, "r+");
    try {
      // Truncated first: before, info@ went to Dovecot as it is (550 unknown user: a bounce).
      await fh.truncate(0);
      await file.reload();
      expect(file.current.expand("info@x.test")).toEqual(["alice@x.test"]);
      // Then written a piece at a time: a piece may end mid-address, which is an address too.
      await fh.write("info@x.test bob@x.test\nsales@x.test bob@x.t", 0);
      await file.reload();
      expect(file.current.expand("sales@x.test")).toEqual(["alice@x.test"]);
      expect(log.filter((l) => l.event === "aliases_not_reloaded").map((l) => l.error)).toContain("does not end with a line end, as a file still being written: kept the previous map until it does");
      expect(log.filter((l) => l.event === "aliases_not_reloaded").map((l) => l.error)).toContain("is empty, as a file still being written: kept the previous map (for no aliases at all, leave a comment line in it)");
      await fh.write("est\n", 43);
      await file.reload();
      expect([file.current.expand("info@x.test"), file.current.expand("sales@x.test")]).toEqual([["bob@x.test"], ["bob@x.test"]]);
      // A file of comments only is whole: no aliases.
      await writeFile(path, "# none for now\n");
      await file.reload();
      expect(file.current.size).toBe(0);
    } finally {
      await fh.close();
      file.close();
    }
  });

  test("a bad file at start-up stops it with one line naming ALIASES_FILE and the line", async () => {
    const dir = await tempDir();
    const path = join(dir, "aliases");
    await writeFile(path, "a@x.test b@x.test\nb@x.test a@x.test\n");
    const config = fromEnv(ServerEnv, { API_KEY: "k".repeat(40), LMTP_HOST: "127.0.0.1", LMTP_PORT: "1", ALIASES_FILE: path });
    expect(() => startServer(config, { log: () => {} })).toThrow(`ALIASES_FILE=${path} line 2: a@x.test -> b@x.test -> a@x.test is a loop`);
    expect(() => startServer({ ...config, aliasesFile: join(dir, "missing") }, { log: () => {} })).toThrow(/ALIASES_FILE=.*missing cannot be read/);
  });
});

describe("the relay as a process", () => {
  test("SIGHUP reads the file again: a change the folder watch cannot see (ALIASES_FILE a symlink into another folder) is used after it", async () => {
    const dir = await tempDir();
    await mkdir(join(dir, "real"));
    await writeFile(join(dir, "real", "aliases"), "info@x.test alice@x.test\n");
    await symlink(join(dir, "real", "aliases"), join(dir, "aliases"));
    const relay = await startRelay({ API_KEY: "h".repeat(40), LMTP_HOST: "127.0.0.1", LMTP_PORT: "1", ALIASES_FILE: join(dir, "aliases") });
    try {
      await relay.waitForLine((l) => l.event === "aliases_loaded");
      await writeFile(join(dir, "real", "aliases"), "info@x.test bob@x.test\nsales@x.test bob@x.test\n");
      await Bun.sleep(300);
      expect(relay.lines.filter((l) => l.event === "aliases_loaded")).toHaveLength(1); // unseen so far
      relay.proc.kill("SIGHUP");
      expect(await relay.waitForLine((l) => l.event === "aliases_loaded" && l.entries === 2)).toMatchObject({ file: join(dir, "aliases") });
      expect(relay.proc.exitCode).toBeNull(); // SIGHUP reloads; it does not end the relay
    } finally {
      await relay.kill("SIGTERM");
    }
  });
});

describe("through the host: expanded before LMTP, answered in the sender's addresses", () => {
  test("one transaction to each address once, ORCPT naming the alias; the answer lists info@ and sales@", async () => {
    const lmtp = await startScripted("220 lmtp\r\n", (line) => {
      if (line.startsWith("LHLO")) return "250-lmtp\r\n250-8BITMIME\r\n250 PIPELINING\r\n";
      if (line === "DATA") return "354 go\r\n";
      if (line === ".") return "250 2.0.0 <alice@example.test> Saved\r\n250 2.0.0 <bob@example.test> Saved\r\n";
      return "250 2.1.5 OK\r\n";
    });
    const dir = await tempDir();
    await writeFile(join(dir, "aliases"), FILE);
    const key = "aliases-test-key-0123456789abcdefghijklmnopq";
    const config = fromEnv(ServerEnv, { API_KEY: key, DELIVER_TO: `lmtp://127.0.0.1:${lmtp.port}`, ALIASES_FILE: join(dir, "aliases") });
    const server = startServer({ ...config, port: 0 }, { log: () => {} });
    try {
      const res = await fetch(server.url + INBOUND_PATH, {
        method: "POST",
        headers: { "x-api-key": key, "content-type": "message/rfc822", "x-envelope-from": "s@sender.test", "x-envelope-to": "info@example.test, sales@example.test" },
        body: "Subject: hi\r\n\r\nhello\r\n",
      });
      const answer = (await res.json()) as { recipients: RecipientResult[] };
      expect(res.status).toBe(200);
      expect(answer.recipients.map((r) => [r.address, r.code])).toEqual([
        ["info@example.test", 250],
        ["sales@example.test", 250],
      ]);
      expect(lmtp.lines.filter((l) => l.startsWith("RCPT"))).toEqual(["RCPT TO:<alice@example.test> ORCPT=rfc822;info@example.test", "RCPT TO:<bob@example.test> ORCPT=rfc822;sales@example.test"]);
      expect(lmtp.messages).toHaveLength(1);
    } finally {
      await server.stop();
      await lmtp.close();
    }
  });
});
