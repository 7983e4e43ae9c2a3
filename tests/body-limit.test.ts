// The body idle limit (idleLimited): a read that waits too long for the client fails with
// BodyStalled; a slow but moving client, or a consumer that is busy elsewhere, does not.

import { describe, expect, test } from "bun:test";
import { BodyStalled, idleLimited } from "../shared/body-limit.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

/** A source that gives `n` one-byte chunks, each after `everyMs`, then ends (or, if `stall`, never ends). */
function trickle(n: number, everyMs: number, stall = false): ReadableStream<Uint8Array> {
  let sent = 0;
  return new ReadableStream<Uint8Array>(
    {
      async pull(c) {
        if (sent === n) {
          if (stall) return new Promise(() => {});
          return c.close();
        }
        await Bun.sleep(everyMs);
        c.enqueue(new Uint8Array([sent++]));
      },
    },
    { highWaterMark: 0 },
  );
}

async function readAll(s: ReadableStream<Uint8Array>): Promise<number[]> {
  const out: number[] = [];
  for await (const c of s) out.push(...c);
  return out;
}

describe("idleLimited", () => {
  test("a client that stops sending: the read fails with BodyStalled, after the bytes it did send", async () => {
    const got: number[] = [];
    const err = await (async () => {
      for await (const c of idleLimited(trickle(3, 10, true), 200)) got.push(...c);
    })().catch((e) => e);
    expect(err).toBeInstanceOf(BodyStalled);
    expect(String(err.message)).toContain("no bytes for 0.2 s");
    expect(got).toEqual([0, 1, 2]);
  });

  test("a slow client that keeps sending (a byte every half of the limit) is never cut off", async () => {
    expect(await readAll(idleLimited(trickle(8, 100), 200))).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });

  test("time the consumer spends elsewhere does not count: nothing is read ahead", async () => {
    const source = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new Uint8Array([1]));
        c.enqueue(new Uint8Array([2]));
        c.close();
      },
    });
    const reader = idleLimited(source, 100).getReader();
    expect((await reader.read()).value).toEqual(new Uint8Array([1]));
    await Bun.sleep(300); // three idle limits without a read
    expect((await reader.read()).value).toEqual(new Uint8Array([2]));
    expect((await reader.read()).done).toBe(true);
  });

  test("an error of the client's stream passes through as it is", async () => {
    const source = new ReadableStream<Uint8Array>({
      pull(c) {
        c.error(new Error("client gone"));
      },
    });
    const err = await readAll(idleLimited(source, 1_000)).catch((e) => e);
    expect(err).not.toBeInstanceOf(BodyStalled);
    expect(String(err.message)).toBe("client gone");
  });
});
