// The record of deliveries behind duplicate suppression: what it remembers (Message-ID, recipient
// and the SHA-256 of the bytes), for how long, that what it holds in memory for a moment reaches
// the file (and survives a restart), that records of the older key never match, and that a disk
// that cannot take a record is reported, never thrown.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openDeliveredLog } from "../host/delivered-log.ts";
import { allowSlowTests } from "./support/timeout.ts";
import { fillDisk, mountTmpfs } from "./support/tmpfs.ts";

allowSlowTests();

let dir: string;
let file: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "delivered-log-"));
  file = join(dir, "delivered.sqlite");
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const sha = (text: string) => new Bun.CryptoHasher("sha256").update(text).digest("hex");
const D1 = sha("message one");
const D2 = sha("message two");

const rowsOnDisk = () => {
  const db = new Database(file, { readonly: true });
  try {
    return db.query<{ n: number }, []>("SELECT count(*) AS n FROM delivered_sha256").get()!.n;
  } finally {
    db.close();
  }
};

describe("delivered log", () => {
  test("remembers a delivery at once, by Message-ID, recipient (any case) and the digest of the bytes", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "User@Example.test", D1);
    expect(log.has("<a@x>", "user@example.test", D1)).toBe(true);
    expect(log.has("<a@x>", "user@example.test", D2)).toBe(false); // other bytes, same Message-ID
    expect(log.has("<a@x>", "other@example.test", D1)).toBe(false);
    expect(log.has("<b@x>", "user@example.test", D1)).toBe(false);
    log.close();
  });

  test("recipients fold ASCII letters only, as Dovecot does: the Kelvin sign is not k, nor the dotted I i", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "kim@example.test", D1);
    log.add("<a@x>", "i@example.test", D1);
    expect(log.has("<a@x>", "KIM@example.TEST", D1)).toBe(true);
    expect(log.has("<a@x>", "\u212aim@example.test", D1)).toBe(false); // KELVIN SIGN, which toLowerCase() makes "k"
    expect(log.has("<a@x>", "\u0130@example.test", D1)).toBe(false); // LATIN CAPITAL I WITH DOT ABOVE
    log.close();
  });

  test("a message without a Message-ID is recorded by recipient and digest, and survives a restart", () => {
    const log = openDeliveredLog(file);
    log.add(null, "u@x.test", D1);
    expect(log.has(null, "u@x.test", D1)).toBe(true);
    expect(log.has(null, "u@x.test", D2)).toBe(false);
    expect(log.has("<a@x>", "u@x.test", D1)).toBe(false);
    log.close();
    const again = openDeliveredLog(file);
    expect(again.has(null, "U@X.test", D1)).toBe(true);
    again.close();
  });

  test("flush() writes what is held at once", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "u@x.test", D1);
    log.flush();
    expect(rowsOnDisk()).toBe(1);
    log.close();
  });

  test("records reach the file shortly after, without a close", async () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "u@x.test", D1);
    log.add("<b@x>", "u@x.test", D2);
    const deadline = Date.now() + 5_000;
    while (rowsOnDisk() < 2 && Date.now() < deadline) await Bun.sleep(25);
    expect(rowsOnDisk()).toBe(2);
    log.close();
  });

  test("close() writes what is still held; a new process (reopened file) knows it", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "u@x.test", D1);
    log.close();
    const again = openDeliveredLog(file);
    expect(again.has("<a@x>", "u@x.test", D1)).toBe(true);
    again.close();
  });

  test("forgets after the window, held or written", async () => {
    const log = openDeliveredLog(file, { windowMs: 50 });
    log.add("<a@x>", "u@x.test", D1);
    await Bun.sleep(80);
    expect(log.has("<a@x>", "u@x.test", D1)).toBe(false);
    log.close();
    const again = openDeliveredLog(file, { windowMs: 50 });
    expect(again.has("<a@x>", "u@x.test", D1)).toBe(false);
    again.close();
  });

  test("records of the older key (Message-ID, recipient, size; no size for a chunked request) never match", () => {
    const old = new Database(file, { create: true });
    old.run("CREATE TABLE delivered (key TEXT PRIMARY KEY, at INTEGER NOT NULL)");
    for (const key of ["<a@x>\u0000u@x.test\u0000", "<a@x>\u0000u@x.test\u0000100", `<a@x>\u0000u@x.test\u0000${D1}`]) {
      old.query("INSERT INTO delivered (key, at) VALUES (?, ?)").run(key, Date.now());
    }
    old.close();
    const log = openDeliveredLog(file);
    expect(log.has("<a@x>", "u@x.test", D1)).toBe(false);
    expect(log.has("<a@x>", "u@x.test", "")).toBe(false);
    expect(log.has("<a@x>", "u@x.test", "100")).toBe(false);
    log.close();
    const db = new Database(file, { readonly: true });
    expect(db.query("SELECT name FROM sqlite_master WHERE type = 'table'").all()).toEqual([{ name: "delivered_sha256" }]);
    db.close();
  });
});

describe("delivered log on a full disk (a real tmpfs)", () => {
  let mnt: string;
  beforeEach(() => {
    mnt = join(dir, "tmpfs");
    mkdirSync(mnt);
    mountTmpfs(mnt, "256k"); // this small, it fills up at once
  });
  afterEach(() => {
    Bun.spawnSync(["umount", "-l", mnt]);
  });

  const fill = () => fillDisk(mnt);

  test("a write that fails is reported to onError, never thrown; the records are still known from memory, and written once there is room", async () => {
    const path = join(mnt, "delivered.sqlite");
    const errors: string[] = [];
    const log = openDeliveredLog(path, { onError: (e, during) => void errors.push(`${during}: ${e.message}`) });
    const filler = fill();
    const many = "x".repeat(1000); // big keys: the file needs new pages at once
    for (let i = 0; i < 30; i++) log.add(`<m${i}-${many}@x>`, "u@x.test", D1);
    const deadline = Date.now() + 5_000;
    while (errors.length === 0 && Date.now() < deadline) await Bun.sleep(25);
    expect(errors.length).toBeGreaterThan(0);
    expect(errors[0]).toMatch(/^write: /);
    expect(log.has(`<m7-${many}@x>`, "u@x.test", D1)).toBe(true);

    rmSync(filler);
    writeFileSync(join(mnt, "probe"), "room again");
    log.close(); // writes what waited
    const again = openDeliveredLog(path);
    expect(again.has(`<m7-${many}@x>`, "u@x.test", D1)).toBe(true);
    expect(again.has(`<m29-${many}@x>`, "u@x.test", D1)).toBe(true);
    expect(errors.filter((e) => e.startsWith("write")).length).toBe(errors.length);
    again.close();
  });
});
