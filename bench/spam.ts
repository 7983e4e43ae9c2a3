// The spam filter's cost: the host with RSPAMD_URL beside the same host without it, in the same run,
// both with a spool, into the same LMTP server, with the same 10 KB messages, each carrying Email
// Routing's Received on top (as the Worker hands them on), so that the host reads the sending
// server and looks its name up, and rspamd checks its SPF. rspamd is a private Debian rspamd with
// its own dnsmasq (tests/support/rspamd.ts): no scan waits on a network. Order per concurrency:
// without, with, with, without (drift hits both alike); each pair's mean is reported.

import type { LoadResult, Operation } from "./load.ts";
import { relayRawOp } from "./paths.ts";
import { spawnServer, type ServerChild } from "./server-child.ts";
import { startRspamd, type RspamdInstance } from "../tests/support/rspamd.ts";
import type { Backend } from "./backend.ts";

export interface SpamRun {
  concurrency: number;
  rspamd: boolean;
  stored: number;
  result: LoadResult;
}

export interface SpamOptions {
  backend: Backend;
  apiKey: string;
  perRun: number;
  concurrency: readonly number[];
  /** One measured run, warm-up included, as the bench's other paths get (run.ts); its failures noted under `what`. */
  measure(what: string, order: number, concurrency: number, op: (tag: string) => Operation, serverPid?: number): Promise<{ result: LoadResult; stored: number }>;
  /** The messages of one run, built before the clock starts. */
  messagesFor(tag: string, concurrency: number): Uint8Array<ArrayBuffer>[];
  spoolDir(name: string): string;
  progress(line: string): void;
  failures: string[];
}

const SENDING_IP = "203.0.113.5";
const RECEIVED = new TextEncoder().encode(
  `Received: from mail-sor-f41.example.net (${SENDING_IP})\r\n        by cloudflare-email.net (cloudflare) id AuYfoj6x77E4\r\n        for <user@kuma8088.com>; Thu, 28 Nov 2024 12:00:00 +0000\r\n`,
);

/** A message as the Worker hands it on: Email Routing's Received on top. */
function withReceived(m: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(RECEIVED.length + m.length);
  out.set(RECEIVED);
  out.set(m, RECEIVED.length);
  return out;
}

export async function spamFilterRuns(o: SpamOptions): Promise<SpamRun[]> {
  const runs: SpamRun[] = [];
  let rspamd: RspamdInstance | null = null;
  const hosts: ServerChild[] = [];
  try {
    rspamd = await startRspamd({ dns: [`--txt-record=example.org,v=spf1 ip4:${SENDING_IP} -all`] });
    const spawn = (name: string, env: Record<string, string>) => spawnServer({ apiKey: o.apiKey, lmtpHost: o.backend.host, lmtpPort: o.backend.port, name, spoolDir: o.spoolDir(name), env });
    const without = await spawn("spam-off", {});
    hosts.push(without);
    const withFilter = await spawn("spam-on", { RSPAMD_URL: rspamd.url });
    hosts.push(withFilter);
    o.progress(`spam filter: rspamd at ${rspamd.url}; hosts without (pid ${without.pid}) and with RSPAMD_URL (pid ${withFilter.pid})`);
    for (const c of o.concurrency) {
      for (const [order, host, on] of [
        [1, without, false],
        [2, withFilter, true],
        [3, withFilter, true],
        [4, without, false],
      ] as const) {
        const op = (tag: string) => relayRawOp(host.url, o.apiKey, o.messagesFor(`${tag}-spam`, c).map(withReceived));
        const { result, stored } = await o.measure(`spam filter ${on ? "on" : "off"}`, order, c, op, host.pid);
        runs.push({ concurrency: c, rspamd: on, stored, result });
        o.progress(`c=${c} #${order} relay rfc822 ${on ? "with" : "without"} RSPAMD_URL: ${result.perSecond.toFixed(0)} msg/s, p50 ${result.p50Ms.toFixed(2)} ms, p99 ${result.p99Ms.toFixed(2)} ms, stored ${stored}/${o.perRun}`);
      }
    }
  } catch (e) {
    o.failures.push(`spam filter: ${(e as Error).stack ?? e}`);
  } finally {
    for (const h of hosts) await h.stop();
    await rspamd?.dispose();
  }
  return runs;
}
