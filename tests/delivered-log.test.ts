// The record of deliveries behind duplicate suppression: what it remembers, for how long, and that
// what it holds in memory for a moment reaches the file (and survives a restart).

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openDeliveredLog } from "../delivered-log.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

let dir: string;
let file: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "delivered-log-"));
  file = join(dir, "delivered.sqlite");
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const rowsOnDisk = () => {
  const db = new Database(file, { readonly: true });
  try {
    return db.query<{ n: number }, []>("SELECT count(*) AS n FROM delivered").get()!.n;
  } finally {
    db.close();
  }
};

describe("delivered log", () => {
  test("remembers a delivery at once, by Message-ID, recipient (any case) and size", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "User@Example.test", 100);
    expect(log.has("<a@x>", "user@example.test", 100)).toBe(true);
    expect(log.has("<a@x>", "user@example.test", 101)).toBe(false);
    expect(log.has("<a@x>", "other@example.test", 100)).toBe(false);
    expect(log.has("<b@x>", "user@example.test", 100)).toBe(false);
    log.close();
  });

  test("records reach the file shortly after, without a close", async () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "u@x.test", 1);
    log.add("<b@x>", "u@x.test", 2);
    const deadline = Date.now() + 5_000;
    while (rowsOnDisk() < 2 && Date.now() < deadline) await Bun.sleep(25);
    expect(rowsOnDisk()).toBe(2);
    log.close();
  });

  test("close() writes what is still held; a new process (reopened file) knows it", () => {
    const log = openDeliveredLog(file);
    log.add("<a@x>", "u@x.test", 1);
    log.close();
    const again = openDeliveredLog(file);
    expect(again.has("<a@x>", "u@x.test", 1)).toBe(true);
    again.close();
  });

  test("forgets after the window, held or written", async () => {
    const log = openDeliveredLog(file, 50);
    log.add("<a@x>", "u@x.test", 1);
    await Bun.sleep(80);
    expect(log.has("<a@x>", "u@x.test", 1)).toBe(false);
    log.close();
    const again = openDeliveredLog(file, 50);
    expect(again.has("<a@x>", "u@x.test", 1)).toBe(false);
    again.close();
  });
});
