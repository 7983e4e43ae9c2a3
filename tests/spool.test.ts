// The durable spool on disk: what commit makes, what discard and prepare() leave, how damaged
// files are treated, the failed/ area and its operator commands, and an unwritable spool.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { mkdtemp, open, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { FLUSH_REQUEST, Spool, SpoolWriteError, StagedMessage, type OpenFile, type SpoolHeader } from "../spool.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

let dir: string;
let spool: Spool;

beforeEach(async () => {
  dir = await mkdtemp("/tmp/spool-test-");
  spool = new Spool(dir);
  spool.prepare();
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
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
    await (half as unknown as { fh: { close(): Promise<void> } }).fh.close();
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
  test("a truncated queue file is moved to failed/ by list(), never listed for delivery, its bytes kept", async () => {
    const good = await spoolMessage([awkwardBytes(1000, 7)]);
    const bad = await spoolMessage([awkwardBytes(50_000, 8)]);
    const path = join(dir, "queue", bad.id);
    const before = statSync(path).size;
    truncateSync(path, before - 1000);

    const listed = await spool.list();
    expect(listed.map((e) => e.header.id)).toEqual([good.id]);
    expect(names("queue")).toEqual([good.id]);
    expect(names("failed")).toContain(bad.id);
    expect(statSync(join(dir, "failed", bad.id)).size).toBe(before - 1000);
    const reason = JSON.parse(readFileSync(join(dir, "failed", `${bad.id}.state`), "utf8")).reason as string;
    expect(reason).toContain("truncated");
    // A second look finds the same: nothing comes back into the queue.
    expect((await spool.list()).map((e) => e.header.id)).toEqual([good.id]);
  });

  test("a file cut inside its header, or not a spool file at all, is moved to failed/ too", async () => {
    const cut = await spoolMessage([awkwardBytes(10)]);
    truncateSync(join(dir, "queue", cut.id), 100);
    writeFileSync(join(dir, "queue", "0000000000garbage"), "hello, not a spool file\n");
    expect(await spool.list()).toEqual([]);
    expect(names("queue")).toEqual([]);
    expect(names("failed").filter((n) => !n.endsWith(".state")).sort()).toEqual(["0000000000garbage", cut.id].sort());
  });

  test("a file removed while list() reads the queue is not turned into a failed/ record", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    // Simulates the deliverer removing a delivered message between readdir and read.
    const original = spool.read.bind(spool);
    spool.read = async (id, area) => {
      if (id === h.id) await spool.remove(id);
      return original(id, area);
    };
    expect(await spool.list()).toEqual([]);
    expect(names("failed")).toEqual([]);
  });

  test("files that are not spool ids (state files, the flush request, editor leftovers) are ignored by list()", async () => {
    const h = await spoolMessage([awkwardBytes(10)]);
    await spool.saveState(h.id, { attempts: 1, next_at: 0, last_reply: null, remaining: h.to });
    writeFileSync(join(dir, "queue", "README"), "x");
    expect((await spool.list()).map((e) => e.header.id)).toEqual([h.id]);
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
    expect(await spool.purgeFailed()).toBe(2);
    expect(names("failed")).toEqual([]);
    expect(await spool.purgeFailed()).toBe(0);
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
    await (staged as unknown as { fh: { close(): Promise<void> } }).fh.close();
    await staged.write(awkwardBytes(100));
    const err = await staged.commit(meta()).catch((e) => e);
    expect(err).toBeInstanceOf(SpoolWriteError);
    expect(names("tmp")).toEqual([]);
    expect(names("queue")).toEqual([]);
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
