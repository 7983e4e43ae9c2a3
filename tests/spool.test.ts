// The durable spool on disk: what commit makes, what discard and prepare() leave, how damaged
// files are treated, the failed/ area and its operator commands, and an unwritable spool.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from "node:fs";
import { mkdtemp, open, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import fc from "fast-check";
import { MAX_RECIPIENTS } from "../shared/contract.ts";
import { peekHeaders } from "../host/message-headers.ts";
import { HEADER_RESERVED, SpoolWriteError, type SpoolHeader } from "../host/spool-file.ts";
import { FLUSH_REQUEST, Spool } from "../host/spool.ts";
import { StagedMessage, type OpenFile } from "../host/staged-message.ts";
import { allowSlowTests } from "./support/timeout.ts";
import { snapshot } from "./support/tree.ts";
import { fillDisk, mountTmpfs } from "./support/tmpfs.ts";

allowSlowTests();

let dir: string;
let spool: Spool;

beforeEach(async () => {
  dir = await mkdtemp("/tmp/spool-test-");
  spool = new Spool(dir);
  spool.prepare();
});

/** Spools made outside `dir` by a test, removed after it whatever its outcome. */
const outsideDirs: string[] = [];

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
  for (const d of outsideDirs.splice(0)) await rm(d, { recursive: true, force: true });
});

/** Bytes 0..255 repeated, with CRLF, bare LF, lone CR, dots and NULs: nothing a text path would keep. */
function awkwardBytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

async function readAll(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const meta = (over: Partial<Omit<SpoolHeader, "id" | "size">> = {}) => ({
  from: "",
  to: ["user@example.test", "alice@example.test"],
  received_at: Date.now(),
  request_id: "req-1",
  message_id: "<m1@example.org>",
  ...over,
});

/** Stages a message written in the given chunks and commits it. */
async function spoolMessage(chunks: Uint8Array[], over: Partial<Omit<SpoolHeader, "id" | "size">> = {}): Promise<SpoolHeader> {
  const staged = spool.stage();
  for (const c of chunks) void staged.write(c); // not awaited: order must still hold
  return staged.commit(meta(over));
}

const names = (sub: string) => readdirSync(join(dir, sub)).sort();

describe("commit and discard", () => {
  test("commit puts one file in queue/ whose body is exactly the written chunks, and the envelope round-trips", async () => {
    const chunks = [awkwardBytes(1, 1), awkwardBytes(70_000, 2), awkwardBytes(0), new TextEncoder().encode("\r\n.\r\n"), awkwardBytes(333, 3)];
    const all = Buffer.concat(chunks);
    const header = await spoolMessage(chunks, { from: "sender@example.org", message_id: "<x.y@example.org>" });

    expect(names("queue")).toEqual([header.id]);
    expect(names("tmp")).toEqual([]);
    expect(header.size).toBe(all.length);

    const body = await readAll(await spool.body(header.id));
    expect(Buffer.from(body).equals(all)).toBe(true);

    const entry = await spool.read(header.id);
    expect(entry.header).toEqual(header);
    expect(entry.header.from).toBe("sender@example.org");
    expect(entry.header.to).toEqual(["user@example.test", "alice@example.test"]);
    expect(entry.header.message_id).toBe("<x.y@example.org>");
    // No state file yet: the defaults say "due now, every recipient still to do".
    expect(entry.state).toEqual({ attempts: 0, next_at: 0, last_reply: null, remaining: header.to });

    const listed = await spool.list();
    expect(listed.map((e) => e.header.id)).toEqual([header.id]);
  });

  test("a message larger than what is held in memory spills into tmp/ as it streams; the file is the same", async () => {
    const chunks = Array.from({ length: 40 }, (_, i) => awkwardBytes(65_536, 10 + i)); // 2.5 MiB
    const staged = spool.stage();
    for (const c of chunks.slice(0, 10)) await staged.write(c);
    expect(names("tmp")).toEqual([]); // 640 KiB: still in memory
    for (const c of chunks.slice(10)) void staged.write(c);
    await staged.write(new Uint8Array(0));
    expect(names("tmp")).toEqual([staged.id]); // past 1 MiB: on disk while it streams
    const header = await staged.commit(meta());
    expect(names("tmp")).toEqual([]);
    expect(Buffer.from(await readAll(await spool.body(header.id))).equals(Buffer.concat(chunks))).toBe(true);
  });

  test("an empty body and the null sender are kept as such", async () => {
    const header = await spoolMessage([], { from: "" });
    expect(header.size).toBe(0);
    expect((await readAll(await spool.body(header.id))).length).toBe(0);
    expect((await spool.read(header.id)).header.from).toBe("");
  });

  test("ids are unique and list() is oldest first", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) ids.push((await spoolMessage([new TextEncoder().encode(`m${i}`)])).id);
    expect(new Set(ids).size).toBe(20);
    const listed = (await spool.list()).map((e) => e.header.id);
    expect(listed).toEqual([...ids].sort());
    // Whole milliseconds apart at least every so often: the order of ids follows arrival.
    expect(listed[0]).toBe([...ids].sort()[0]!);
  });

  test("a small message delivered at once never touches the disk; discard leaves nothing", async () => {
    const staged = spool.stage();
    await staged.write(awkwardBytes(10_000));
    expect(names("tmp")).toEqual([]);
    await staged.discard();
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([]);
  });

  test("discard of a message that spilled into tmp/ removes the file", async () => {
    const staged = spool.stage();
    await staged.write(awkwardBytes(2 * 1024 * 1024));
    expect(names("tmp")).toEqual([staged.id]);
    await staged.discard();
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([]);
  });

  test("saveState is read back; remove() deletes the message and its state", async () => {
    const header = await spoolMessage([awkwardBytes(100)]);
    const state = { attempts: 3, next_at: 12345, last_reply: "451 4.3.0 later", remaining: ["alice@example.test"] };
    await spool.saveState(header.id, state);
    expect((await spool.read(header.id)).state).toEqual(state);
    expect(names("tmp")).toEqual([]); // the state's own temporary file was renamed away
    await spool.remove(header.id);
    expect(names("queue")).toEqual([]);
  });
});

describe("prepare()", () => {
  test("removes what a crash left in tmp/ and reports each file; queue/ is untouched", async () => {
    const kept = await spoolMessage([awkwardBytes(500)]);
    const half = spool.stage();
    await half.write(awkwardBytes(2 * 1024 * 1024)); // large enough to be in tmp/ already
    // The process "dies" here: the staged file is never committed nor discarded (its descriptor
    // goes with the process; closed by hand here).
    await (half as unknown as { phase: { fh: { close(): Promise<void> } } }).phase.fh.close();
    writeFileSync(join(dir, "tmp", "0000000000junk"), "x");

    const again = new Spool(dir);
    const { discarded } = again.prepare();
    expect(discarded.sort()).toEqual(["0000000000junk", half.id].sort());
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([kept.id]);
    expect((await again.list()).map((e) => e.header.id)).toEqual([kept.id]);
  });

  test("creates the directory tree when it does not exist", () => {
    const fresh = new Spool(join(dir, "new", "spool"));
    expect(fresh.prepare()).toEqual({ discarded: [] });
    for (const d of ["tmp", "queue", "failed"]) expect(statSync(join(dir, "new", "spool", d)).isDirectory()).toBe(true);
  });
});

describe("damaged files", () => {
  test("a truncated queue file is reported by scan() as unreadable and left in queue/ untouched; list() leaves it out", async () => {
    const good = await spoolMessage([awkwardBytes(1000, 7)]);
    const bad = await spoolMessage([awkwardBytes(50_000, 8)]);
    const path = join(dir, "queue", bad.id);
    const before = statSync(path).size;
    truncateSync(path, before - 1000);

    expect((await spool.list()).map((e) => e.header.id)).toEqual([good.id]);
    const { entries, unreadable } = await spool.scan();
    expect(entries.map((e) => e.header.id)).toEqual([good.id]);
    expect(unreadable).toEqual([{ name: bad.id, problem: "truncated: 49000 of 50000 bytes" }]);
    expect(names("queue").filter((n) => !n.endsWith(".state"))).toEqual([good.id, bad.id].sort());
    expect(statSync(path).size).toBe(before - 1000);
    expect(names("failed")).toEqual([]);
  });

  test("a file cut inside its header, or not a spool file at all, is reported as such and stays where it is", async () => {
    const cut = await spoolMessage([awkwardBytes(10)]);
    truncateSync(join(dir, "queue", cut.id), 100);
    writeFileSync(join(dir, "queue", "0000000000garbage"), "hello, not a spool file\n");
    expect(await spool.list()).toEqual([]);
    const { unreadable } = await spool.scan();
    expect(unreadable.map((u) => u.name)).toEqual(["0000000000garbage", cut.id].sort());
    expect(unreadable.find((u) => u.name === cut.id)!.problem).toContain("truncated inside its header");
    expect(unreadable.find((u) => u.name === "0000000000garbage")!.problem).toBe("not a spool file (no spool header)");
    expect(names("queue").sort()).toEqual(["0000000000garbage", cut.id].sort());
    expect(names("failed")).toEqual([]);
  });

  test("a file removed while scan() reads the queue is neither listed nor reported", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    // Simulates the deliverer removing a delivered message between readdir and read.
    const original = spool.read.bind(spool);
    spool.read = async (id, area) => {
      if (id === h.id) await spool.remove(id);
      return original(id, area);
    };
    expect(await spool.scan()).toEqual({ entries: [], unreadable: [], notReadNow: [] });
    expect(names("failed")).toEqual([]);
  });

  test("a read that fails for a reason that passes (EMFILE) is reported apart, as not readable now, never as damaged", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    const original = spool.read.bind(spool);
    spool.read = async (id, area) => {
      if (id === h.id) throw Object.assign(new Error("EMFILE: too many open files, open"), { code: "EMFILE" });
      return original(id, area);
    };
    expect(await spool.scan()).toEqual({ entries: [], unreadable: [], notReadNow: [{ name: h.id, problem: "EMFILE: too many open files, open" }] });
  });

  test("state files are not entries; a name that is not a spool id (an editor's leftover) is reported, not listed, not touched", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    await spool.saveState(h.id, { attempts: 1, next_at: 0, last_reply: null, remaining: h.to });
    writeFileSync(join(dir, "queue", "README"), "x");
    expect((await spool.list()).map((e) => e.header.id)).toEqual([h.id]);
    expect((await spool.scan()).unreadable).toEqual([{ name: "README", problem: "not a spool file (its name is not a spool id)" }]);
    expect(names("queue")).toContain("README");
  });
});

describe("failed/ and the operator's commands", () => {
  test("moveToFailed keeps the exact bytes and the reason; retryFailed puts it back, due now; purgeFailed counts", async () => {
    const bytes = awkwardBytes(40_000, 9);
    const a = await spoolMessage([bytes.subarray(0, 100), bytes.subarray(100)], { to: ["user@example.test"] });
    const b = await spoolMessage([awkwardBytes(10)]);
    await spool.saveState(a.id, { attempts: 7, next_at: Date.now() + 60_000, last_reply: "451 4.3.0 busy", remaining: ["user@example.test"] });

    await spool.moveToFailed(a.id, "expired after 120 h in the spool; last reply: 451 4.3.0 busy");
    expect(names("queue").filter((n) => !n.endsWith(".state"))).toEqual([b.id]);
    const failed = await spool.list("failed");
    expect(failed.map((e) => e.header.id)).toEqual([a.id]);
    expect(failed[0]!.state.reason).toBe("expired after 120 h in the spool; last reply: 451 4.3.0 busy");
    expect(failed[0]!.state.attempts).toBe(7);
    const raw = readFileSync(join(dir, "failed", a.id));
    expect(Buffer.from(raw.subarray(raw.length - bytes.length)).equals(Buffer.from(bytes))).toBe(true);
    expect(existsSync(join(dir, "queue", `${a.id}.state`))).toBe(false);

    await spool.retryFailed(a.id);
    expect(await spool.list("failed")).toEqual([]);
    const back = await spool.read(a.id);
    expect(back.state).toEqual({ attempts: 0, next_at: 0, last_reply: null, remaining: ["user@example.test"] });
    expect(Buffer.from(await readAll(await spool.body(a.id))).equals(Buffer.from(bytes))).toBe(true);

    await spool.moveToFailed(a.id, "refused: 550 5.1.1 no such user");
    await spool.moveToFailed(b.id, "refused: 550 5.1.1 no such user");
    expect(await spool.purgeFailed()).toEqual({ removed: [a.id, b.id].sort(), skipped: [] });
    expect(names("failed")).toEqual([]);
    expect(await spool.purgeFailed()).toEqual({ removed: [], skipped: [] });
  });

  test("retryFailed refuses a path instead of an id", async () => {
    await expect(spool.retryFailed("../queue/x")).rejects.toThrow("not a spool id");
  });

  test("requestFlush drops the flush-request file into the spool directory", () => {
    spool.requestFlush();
    expect(existsSync(join(dir, FLUSH_REQUEST))).toBe(true);
  });
});

describe("an unwritable spool", () => {
  test("commit() throws SpoolWriteError when tmp/ cannot hold files (tmp is a regular file)", async () => {
    rmSync(join(dir, "tmp"), { recursive: true });
    writeFileSync(join(dir, "tmp"), "not a directory");
    const staged = spool.stage();
    await staged.write(awkwardBytes(100));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(String(err.message)).toContain("spool not writable");
    expect(names("queue")).toEqual([]);
  });

  test("commit() throws SpoolWriteError for a spool under /proc", async () => {
    const staged = new Spool("/proc/self/no-such-spool").stage();
    await staged.write(awkwardBytes(100));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
  });

  test("a large message whose spill fails: the failure surfaces at commit(), nothing is left", async () => {
    rmSync(join(dir, "tmp"), { recursive: true });
    writeFileSync(join(dir, "tmp"), "not a directory");
    const staged = spool.stage();
    await staged.write(awkwardBytes(2 * 1024 * 1024)); // does not throw: the delivery goes on
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(names("queue")).toEqual([]);
  });

  test("commit fails with SpoolWriteError, and leaves nothing in queue/, when queue/ is gone", async () => {
    const staged = spool.stage();
    await staged.write(awkwardBytes(100));
    rmSync(join(dir, "queue"), { recursive: true });
    writeFileSync(join(dir, "queue"), "not a directory");
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(names("tmp")).toEqual([]);
  });

  test("a write that fails surfaces at commit() as SpoolWriteError, and the staged file is removed", async () => {
    const staged = spool.stage();
    await staged.write(awkwardBytes(2 * 1024 * 1024)); // in tmp/ from here on
    // Close the file under the staged message: the next write fails (EBADF).
    await (staged as unknown as { phase: { fh: { close(): Promise<void> } } }).phase.fh.close();
    await staged.write(awkwardBytes(100));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([]);
  });
});

describe("the header is measured in bytes", () => {
  const latin1 = (s: string) => new Uint8Array(Buffer.from(s, "latin1"));

  test("an 8-bit Message-ID (as the host reads it) and a UTF-8 sender come back exactly, and so does every byte of the body", async () => {
    // The Message-ID as message-headers.ts reads it: one character per byte (latin1), so a
    // UTF-8 "é" in the field becomes two characters of two bytes each once written as UTF-8.
    const raw = Buffer.concat([latin1("Message-ID: <caf"), Buffer.from("é-ü-€-😀", "utf8"), latin1("\xff\x80@example.org>\r\nSubject: x\r\n\r\nbody\r\n")]);
    const { info } = await peekHeaders(new Uint8Array(raw));
    expect(info.messageId).toBe(`<caf${Buffer.from("é-ü-€-😀", "utf8").toString("latin1")}\xff\x80@example.org>`);
    const body = Buffer.concat([raw, awkwardBytes(5000, 4)]);
    const header = await spoolMessage([body], { from: "jürgen@exämple.org", to: ["пользователь@пример.рф", "用户@例子.广告"], message_id: info.messageId });

    const entry = await spool.read(header.id);
    expect(entry.header).toEqual(header);
    expect(entry.header.from).toBe("jürgen@exämple.org");
    expect(entry.header.message_id).toBe(info.messageId);
    expect(Buffer.from(await readAll(await spool.body(header.id))).equals(body)).toBe(true);
    expect((await spool.scan()).unreadable).toEqual([]);
  });

  test("the largest envelope the contract allows, at the costliest encoding, fits: 100 recipients and a sender of 254 lone surrogates, a 998-character Message-ID of control characters", async () => {
    // A lone surrogate and a control character are the most a UTF-16 code unit can cost in JSON
    // (a 6-byte \\uXXXX escape).
    const address = (i: number) => `${String.fromCharCode(0xd800 + i).repeat(64)}@${"\udfff".repeat(189)}`;
    const to = Array.from({ length: MAX_RECIPIENTS }, (_, i) => address(i));
    expect(to.every((a) => a.length === 254)).toBe(true);
    const messageId = Array.from({ length: 998 }, (_, i) => String.fromCharCode(i % 32)).join("");
    const body = awkwardBytes(3000, 5);
    const header = await spoolMessage([body], { from: address(200), to, message_id: messageId, request_id: "r".repeat(255) });
    const entry = await spool.read(header.id);
    expect(entry.header).toEqual(header);
    expect(entry.header.to).toEqual(to);
    expect(entry.header.message_id).toBe(messageId);
    expect(Buffer.from(await readAll(await spool.body(header.id))).equals(Buffer.from(body))).toBe(true);
  });

  test("100 recipients of 254 three-byte characters: fits, where sizing in characters wrote past the reserved space into the message", async () => {
    const to = Array.from({ length: MAX_RECIPIENTS }, (_, i) => `${String.fromCharCode(0x4e00 + i).repeat(64)}@${"€".repeat(189)}`);
    const body = new TextEncoder().encode("From: a@b.test\r\n\r\nthe first bytes of the message\r\n");
    const header = await spoolMessage([body], { to });
    expect(Buffer.from(await readAll(await spool.body(header.id))).equals(Buffer.from(body))).toBe(true);
    expect((await spool.read(header.id)).header.to).toEqual(to);
  });

  test("a header that does not fit is refused with SpoolWriteError (the sender gets 503) and leaves no file", async () => {
    const to = Array.from({ length: 2 * MAX_RECIPIENTS }, (_, i) => `${String.fromCharCode(0xd800 + i).repeat(64)}@${"\udfff".repeat(189)}`);
    const staged = spool.stage();
    await staged.write(awkwardBytes(2 * 1024 * 1024)); // already in tmp/
    const err = await staged.commit(meta({ to })).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(String(err.message)).toContain("spool header too large");
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([]);
  });

  test("the reserved space costs no disk beyond the header's own bytes (a hole in the file)", async () => {
    const header = await spoolMessage([awkwardBytes(100)]);
    const path = join(dir, "queue", header.id);
    expect(statSync(path).size).toBe(HEADER_RESERVED + 100);
    // Blocks of 512 bytes: the header and the message take a few pages, not the reserved 160 KiB.
    expect(statSync(path).blocks * 512).toBeLessThan(32 * 1024);
  });

  test("a file written before the header was sized in bytes (version 1, 32 KiB of spaces) is still read and delivered byte-exact", async () => {
    const id = "0000000000oldformat";
    const h = { id, size: 0, from: "old@example.org", to: ["user@example.test"], received_at: 1_700_000_000_000, request_id: "req-old", message_id: "<old@example.org>" };
    const body = awkwardBytes(777, 6);
    h.size = body.length;
    const line = `RELAY-SPOOL 1 ${JSON.stringify(h)}`.padEnd(32 * 1024 - 1, " ") + "\n";
    writeFileSync(join(dir, "queue", id), Buffer.concat([Buffer.from(line, "utf8"), body]));
    expect((await spool.read(id)).header).toEqual(h);
    expect(Buffer.from(await readAll(await spool.body(id))).equals(Buffer.from(body))).toBe(true);
  });

  test("a version 1 file whose non-ASCII header overran its space (what sizing in characters did) is reported, never read as a message", async () => {
    const id = "0000000000overran";
    const h = { id, size: 10, from: "jürgen@example.org", to: ["user@example.test"], received_at: 1, message_id: "<é@x>" };
    const line = Buffer.from(`RELAY-SPOOL 1 ${JSON.stringify(h)}`.padEnd(32 * 1024 - 1, " ") + "\n", "utf8"); // 32 KiB + 2 bytes
    const file = Buffer.alloc(32 * 1024 + 10, 0x41);
    line.copy(file, 0);
    writeFileSync(join(dir, "queue", id), file);
    const { entries, unreadable } = await spool.scan();
    expect(entries).toEqual([]);
    expect(unreadable).toEqual([{ name: id, problem: "damaged header (it overruns its reserved space)" }]);
  });

  test("headers that are damaged in other ways are reported with what is wrong: not UTF-8, not JSON, another id, no recipients", async () => {
    const good = await spoolMessage([awkwardBytes(50)]);
    const original = readFileSync(join(dir, "queue", good.id));
    const variant = (name: string, edit: (b: Buffer) => void) => {
      const b = Buffer.from(original);
      edit(b);
      writeFileSync(join(dir, "queue", name), b);
    };
    const at = original.indexOf('"from"');
    variant("0000000000badutf8", (b) => (b[at + 1] = 0xff));
    variant("0000000000badjson", (b) => (b[at] = 0x7d));
    variant("0000000000otherid", () => {});
    const other = await spoolMessage([awkwardBytes(50)]);
    const path = join(dir, "queue", other.id);
    const norcpt = readFileSync(path);
    norcpt.write('"tx"', norcpt.indexOf('"to"'), "latin1");
    writeFileSync(path, norcpt);
    const problems = Object.fromEntries((await spool.scan()).unreadable.map((u) => [u.name, u.problem]));
    expect(problems["0000000000badutf8"]).toStartWith("damaged header (");
    expect(problems["0000000000badjson"]).toStartWith("damaged header (");
    expect(problems["0000000000otherid"]).toBe(`damaged header (its id is ${JSON.stringify(good.id)}, not the file's name)`);
    expect(problems[other.id]).toBe("damaged header (no recipients)");
    expect((await spool.list()).map((e) => e.header.id)).toEqual([good.id]);
  });

  // Any UTF-16 code unit at all, lone surrogates and controls included.
  const anyUnit = fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c));
  const anyString = (maxLength: number) => fc.oneof(fc.string({ unit: anyUnit, maxLength }), fc.string({ unit: "grapheme", maxLength: Math.ceil(maxLength / 4) }), fc.string({ maxLength }));
  const latin1String = fc.string({ unit: fc.integer({ min: 0, max: 255 }).map((c) => String.fromCharCode(c)), maxLength: 998 });

  test("property: any envelope within the contract's limits comes back exactly, with every byte of the message", async () => {
    await fc.assert(
      fc.asyncProperty(
        anyString(254),
        fc.array(anyString(254), { minLength: 1, maxLength: MAX_RECIPIENTS }),
        fc.option(latin1String, { nil: null }),
        fc.option(fc.stringMatching(/^[\w=-]{1,255}$/), { nil: undefined }),
        fc.array(fc.uint8Array({ maxLength: 3000 }), { maxLength: 4 }),
        async (from, to, message_id, request_id, chunks) => {
          const header = await spoolMessage(chunks, { from, to, message_id, request_id });
          const entry = await spool.read(header.id);
          expect(entry.header).toEqual(header);
          expect(Buffer.from(await readAll(await spool.body(header.id))).equals(Buffer.concat(chunks))).toBe(true);
          await spool.remove(header.id);
        },
      ),
      { numRuns: 150 },
    );
  });

  test("property: any envelope at all is either kept exactly or refused with SpoolWriteError, never written over the message", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.string({ unit: anyUnit, minLength: 200, maxLength: 2000 }), { minLength: 1, maxLength: 150 }), async (to) => {
        const body = awkwardBytes(100, to.length);
        const staged = spool.stage();
        await staged.write(body);
        const result = await staged.commit(meta({ to })).catch((e) => e);
        if (result instanceof Error) {
          expect(result).toBeInstanceOf(SpoolWriteError);
        } else {
          expect((await spool.read(result.id)).header.to).toEqual(to);
          expect(Buffer.from(await readAll(await spool.body(result.id))).equals(Buffer.from(body))).toBe(true);
          await spool.remove(result.id);
        }
        expect(names("tmp")).toEqual([]);
      }),
      { numRuns: 40 },
    );
  });
});

describe("reading never changes the spool, and shows what it cannot read", () => {
  test("junk, a directory, a FIFO, links (to /etc/passwd, and to a valid spool file outside the spool): scan() reports each, follows none, moves nothing", async () => {
    const good = await spoolMessage([awkwardBytes(300, 11)]);
    // A valid spool file outside the spool, linked in under its id: following the link would list it.
    const outside = await mkdtemp("/tmp/spool-outside-");
    outsideDirs.push(outside);
    const elsewhere = new Spool(outside);
    elsewhere.prepare();
    const staged = elsewhere.stage();
    await staged.write(awkwardBytes(10));
    const foreign = await staged.commit(meta());
    symlinkSync(join(outside, "queue", foreign.id), join(dir, "queue", foreign.id));
    symlinkSync("/etc/passwd", join(dir, "queue", "0000000000passwd"));
    mkdirSync(join(dir, "queue", "0000000000adirectory"));
    writeFileSync(join(dir, "queue", "0000000000junk"), "junk");
    expect(Bun.spawnSync(["mkfifo", join(dir, "queue", "0000000000fifo")]).exitCode).toBe(0);
    writeFileSync(join(dir, "failed", "0000000000junk"), "junk in failed/");
    writeFileSync(join(dir, "failed", "0000000000junk.state"), JSON.stringify({ attempts: 3, next_at: 0, last_reply: null, remaining: [], reason: "unreadable spool file: not a spool file" }));
    // A state file that is a link: not followed either (the message reads with default state).
    symlinkSync(join(outside, "queue", foreign.id), join(dir, "queue", `${good.id}.state`));

    const before = snapshot(dir);
    const queue = await spool.scan("queue");
    const failed = await spool.scan("failed");
    expect(snapshot(dir)).toEqual(before);

    expect(queue.entries.map((e) => e.header.id)).toEqual([good.id]);
    expect(queue.entries[0]!.state).toEqual({ attempts: 0, next_at: 0, last_reply: null, remaining: good.to });
    expect(Object.fromEntries(queue.unreadable.map((u) => [u.name, u.problem]))).toEqual({
      [foreign.id]: "a symbolic link, not a spool file (not followed)",
      "0000000000passwd": "a symbolic link, not a spool file (not followed)",
      "0000000000adirectory": "a directory, not a spool file",
      "0000000000junk": "not a spool file (no spool header)",
      "0000000000fifo": "not a regular file",
    });
    expect(failed).toEqual({ entries: [], unreadable: [{ name: "0000000000junk", problem: "not a spool file (no spool header)", reason: "unreadable spool file: not a spool file" }], notReadNow: [] });
  });

  test("read() refuses a path instead of an id", async () => {
    await expect(spool.read("../../etc/passwd")).rejects.toThrow("not a spool id");
    await expect(spool.body("../failed/x")).rejects.toThrow();
  });

  test("a state file that is not a spool state ({} or junk) reads as the default state, never as a broken one", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    for (const junk of ["{}", "[1]", "null", "not json", JSON.stringify({ attempts: 1, next_at: 0, last_reply: null, remaining: "x" })]) {
      writeFileSync(join(dir, "queue", `${h.id}.state`), junk);
      expect((await spool.read(h.id)).state).toEqual({ attempts: 0, next_at: 0, last_reply: null, remaining: h.to });
    }
  });
});

describe("purge-failed", () => {
  test("removes every message in failed/, readable or not, and a link (never its target); leaves a directory and foreign names, and says so", async () => {
    const a = await spoolMessage([awkwardBytes(10)]);
    await spool.moveToFailed(a.id, "refused: 550 5.1.1 no such user");
    writeFileSync(join(dir, "failed", "0000000000junk"), "junk");
    const target = join(dir, "outside-target");
    writeFileSync(target, "must survive");
    symlinkSync(target, join(dir, "failed", "0000000000link"));
    mkdirSync(join(dir, "failed", "0000000000adirectory"));
    writeFileSync(join(dir, "failed", "0000000000adirectory", "inside"), "kept");
    writeFileSync(join(dir, "failed", "notes.txt"), "the operator's");

    const result = await spool.purgeFailed();
    expect(result.removed).toEqual(["0000000000junk", "0000000000link", a.id].sort());
    expect(result.skipped).toEqual([
      { name: "0000000000adirectory", why: "a directory (the spool never makes one here)" },
      { name: "notes.txt", why: "not a spool file (its name is not a spool id)" },
    ]);
    expect(names("failed")).toEqual(["0000000000adirectory", "notes.txt"]);
    expect(readFileSync(target, "utf8")).toBe("must survive");
    expect(readFileSync(join(dir, "failed", "0000000000adirectory", "inside"), "utf8")).toBe("kept");
  });
});

describe("file modes", () => {
  const mode = (p: string) => (lstatSync(p).mode & 0o777).toString(8);

  test("prepare() makes the spool folders 0700 (and the spool folder itself when it creates it); messages, states and the flush request are 0600", async () => {
    const root = join(dir, "fresh", "spool");
    const s = new Spool(root);
    s.prepare();
    for (const d of [root, join(root, "tmp"), join(root, "queue"), join(root, "failed")]) expect(`${d} ${mode(d)}`).toBe(`${d} 700`);
    const staged = s.stage();
    await staged.write(awkwardBytes(10));
    const h = await staged.commit(meta());
    await s.saveState(h.id, { attempts: 1, next_at: 0, last_reply: null, remaining: h.to });
    s.requestFlush();
    expect(mode(join(root, "queue", h.id))).toBe("600");
    expect(mode(join(root, "queue", `${h.id}.state`))).toBe("600");
    expect(mode(join(root, FLUSH_REQUEST))).toBe("600");
    await s.moveToFailed(h.id, "refused");
    expect(mode(join(root, "failed", h.id))).toBe("600");
    expect(mode(join(root, "failed", `${h.id}.state`))).toBe("600");
  });

  test("folders an older version left 0755 are made 0700 by prepare()", () => {
    for (const d of ["tmp", "queue", "failed"]) chmodSync(join(dir, d), 0o755);
    new Spool(dir).prepare();
    for (const d of ["tmp", "queue", "failed"]) expect(mode(join(dir, d))).toBe("700");
  });
});

describe("prepare() at start-up", () => {
  test("clears whatever a crash left in tmp/, directories included, instead of stopping the host", () => {
    mkdirSync(join(dir, "tmp", "leftover-dir", "deeper"), { recursive: true });
    writeFileSync(join(dir, "tmp", "leftover-dir", "deeper", "f"), "x");
    expect(new Spool(dir).prepare().discarded).toEqual(["leftover-dir"]);
    expect(names("tmp")).toEqual([]);
  });

  test("throws on a full disk (a 64 KiB tmpfs filled up), where creating the folders alone succeeds", async () => {
    const mnt = await mkdtemp("/tmp/spool-full-");
    mountTmpfs(mnt, "64k");
    try {
      writeFileSync(join(mnt, "fill"), Buffer.alloc(64 * 1024)); // exactly full
      const err = (() => {
        try {
          new Spool(join(mnt, "spool")).prepare();
        } catch (e) {
          return e as NodeJS.ErrnoException;
        }
        return null;
      })();
      expect(err?.code).toBe("ENOSPC");
      expect(readdirSync(join(mnt, "spool", "tmp"))).toEqual([]); // the write test leaves nothing
    } finally {
      expect(Bun.spawnSync(["umount", mnt]).exitCode).toBe(0);
      await rm(mnt, { recursive: true, force: true });
    }
  });
});

describe("short writes and failed syncs (a full disk)", () => {
  type Faults = { maxPerWrite?: number; budget?: number; syncFails?: boolean };
  /**
   * node:fs/promises' open, with a file handle that behaves like one on a filling disk: each write
   * takes at most `maxPerWrite` bytes and reports that (without an error, as write(2) does); past
   * `budget` bytes in all, a write that can take nothing fails with ENOSPC; sync() may fail (EIO).
   */
  function faultyOpen(f: Faults): OpenFile {
    return async (path, flags, mode) => {
      const fh = await open(path, flags, mode);
      let total = 0;
      const write = async (buf: Uint8Array, offset: number, length: number, position: number) => {
        let n = Math.min(length, f.maxPerWrite ?? length, (f.budget ?? Infinity) - total);
        if (n <= 0) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
        const r = await fh.write(buf, offset, n, position);
        total += r.bytesWritten;
        n = r.bytesWritten;
        return { bytesWritten: n, buffer: buf };
      };
      const sync = async () => {
        if (f.syncFails) throw Object.assign(new Error("EIO: i/o error, fsync"), { code: "EIO" });
        return fh.sync();
      };
      // What StagedMessage uses of a FileHandle.
      return { write, sync, close: () => fh.close() } as unknown as FileHandle;
    };
  }
  const stageWith = (f: Faults) => {
    const id = `${Date.now().toString(36)}faulty${Math.random().toString(36).slice(2, 8)}`;
    return new StagedMessage(spool, id, join(spool.tmp, id), faultyOpen(f));
  };

  for (const [label, size] of [
    ["held in memory until commit", 300_000],
    ["spilled into tmp/ while it arrives", 2 * 1024 * 1024 + 333],
  ] as const) {
    test(`writes that take only part of a chunk are completed: the spooled message is whole and byte-exact (${label})`, async () => {
      const bytes = awkwardBytes(size, 21);
      const staged = stageWith({ maxPerWrite: 4093 });
      for (let at = 0; at < bytes.length; at += 65_536) await staged.write(bytes.subarray(at, at + 65_536));
      const header = await staged.commit(meta());
      expect(header.size).toBe(size);
      const body = await readAll(await spool.body(header.id));
      expect(body.length).toBe(size);
      expect(Buffer.from(body).equals(Buffer.from(bytes))).toBe(true);
    });
  }

  test("a disk that fills up part-way through a message: commit fails with SpoolWriteError, nothing in queue/ or tmp/", async () => {
    const staged = stageWith({ maxPerWrite: 10_000, budget: 150_000 });
    for (let i = 0; i < 5; i++) await staged.write(awkwardBytes(60_000, 30 + i));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(String(err.message)).toContain("ENOSPC");
    expect(names("queue")).toEqual([]);
    expect(names("tmp")).toEqual([]);
  });

  test("a failed fsync fails the commit: SpoolWriteError, nothing in queue/ or tmp/", async () => {
    const staged = stageWith({ syncFails: true });
    await staged.write(awkwardBytes(5_000));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(String(err.message)).toContain("EIO");
    expect(names("queue")).toEqual([]);
    expect(names("tmp")).toEqual([]);
  });

  test("content() gives back exactly what was written, held or spilled; a spill that failed is SpoolWriteError", async () => {
    const small = awkwardBytes(70_000, 40);
    const held = spool.stage();
    await held.write(small.subarray(0, 1000));
    await held.write(small.subarray(1000));
    const c1 = await held.content();
    expect(c1).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(c1 as Uint8Array).equals(Buffer.from(small))).toBe(true);
    await held.discard();

    const big = awkwardBytes(3 * 1024 * 1024, 41);
    const spilled = spool.stage();
    for (let at = 0; at < big.length; at += 100_000) await spilled.write(big.subarray(at, at + 100_000));
    const c2 = await spilled.content();
    expect(c2).toBeInstanceOf(ReadableStream);
    expect(Buffer.from(await readAll(c2 as ReadableStream<Uint8Array>)).equals(Buffer.from(big))).toBe(true);
    await spilled.discard();

    const full = stageWith({ budget: 1024 * 1024 });
    await full.write(big);
    expect(await full.content().catch((e) => e)).toBeInstanceOf(SpoolWriteError);
    await full.discard();
    expect(names("tmp")).toEqual([]);
  });
});

describe("state files on a full disk", () => {
  test("a state write that fails (a full tmpfs) throws and leaves nothing in tmp/, however often it is tried", async () => {
    const mnt = await mkdtemp("/tmp/spool-state-full-");
    mountTmpfs(mnt, "256k");
    try {
      const s = new Spool(join(mnt, "spool"));
      s.prepare();
      const staged = s.stage();
      await staged.write(new TextEncoder().encode("queued before the disk filled"));
      const h = await staged.commit({ from: "", to: ["user@example.test"], received_at: Date.now(), message_id: null });
      fillDisk(mnt);
      for (let i = 0; i < 20; i++) {
        const err = await s.saveState(h.id, { attempts: i, next_at: 0, last_reply: "451 busy", remaining: ["user@example.test"] }).then(() => null, (e: NodeJS.ErrnoException) => e);
        expect(err?.code).toBe("ENOSPC");
      }
      expect(readdirSync(join(mnt, "spool", "tmp"))).toEqual([]);
      expect(readdirSync(join(mnt, "spool", "queue"))).toEqual([h.id]);
    } finally {
      expect(Bun.spawnSync(["umount", mnt]).exitCode).toBe(0);
      await rm(mnt, { recursive: true, force: true });
    }
  });
});
