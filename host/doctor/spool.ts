// The spool (SPOOL_DIR): that it takes a written, fsynced file (in tmp/, under a name of the
// doctor's own, removed at once: the running host's staged messages are never touched), and what
// it holds: how many wait and for how long, how many failed, how many cannot be read.

import { existsSync } from "node:fs";
import { age } from "../queue-cli.ts";
import { Spool } from "../spool.ts";
import type { DoctorPart, Finding } from "./finding.ts";

const HOUR_MS = 3_600_000;

export const spool: DoctorPart = {
  name: "spool",
  async run(ctx) {
    if (!ctx.config) return [{ part: "spool", status: "skip", found: "the host's settings do not parse (see configuration)" }];
    const dir = ctx.config.spoolDir;
    if (!dir) return [{ part: "spool", status: "skip", found: "SPOOL_DIR is not set: when Dovecot cannot take a message, the sender is asked to retry (503)" }];
    const s = new Spool(dir);
    if (!existsSync(s.tmp)) return [{ part: "spool", status: "warn", found: `${dir} has no tmp/: the host has not started with this spool yet`, fix: "the host makes tmp/, queue/ and failed/ when it starts; start it, then run the doctor again" }];
    const writable = writeProbe(s);
    if (writable) return [{ part: "spool", status: "fail", found: `${dir} cannot be written: ${writable}`, fix: `free space on its disk, or make ${dir} writable by the host's user (the container runs as uid 10001)` }];
    const findings: Finding[] = [{ part: "spool", status: "ok", found: `${dir} takes writes (a file written and fsynced in tmp/)` }];
    let queue, failed;
    try {
      [queue, failed] = await Promise.all([s.scan("queue"), s.scan("failed")]);
    } catch (e) {
      return [...findings, { part: "spool", status: "fail", found: `${dir} cannot be listed: ${(e as Error).message}`, fix: "the host prepares queue/ and failed/ at start: start it once, or check their owner" }];
    }
    const oldest = queue.entries[0] ? Date.now() - Math.min(...queue.entries.map((e) => e.header.received_at)) : 0;
    const depth = `${queue.entries.length} waiting${queue.entries.length ? `, the oldest for ${age(oldest)}` : ""}`;
    if (oldest > HOUR_MS) findings.push({ part: "spool", status: "warn", found: `${depth}: Dovecot has not taken it for over an hour`, fix: "the last reply is in `queue list`; fix what it says, then `queue flush`" });
    else findings.push({ part: "spool", status: "ok", found: depth });
    if (failed.entries.length) findings.push({ part: "spool", status: "warn", found: `${failed.entries.length} failed (given up on; in failed/)`, fix: "read why with `queue list`; `queue retry ID` once fixed, or `queue purge-failed`" });
    else findings.push({ part: "spool", status: "ok", found: "0 failed" });
    const unreadable = queue.unreadable.length + failed.unreadable.length;
    if (unreadable) findings.push({ part: "spool", status: "warn", found: `${unreadable} file(s) in the spool cannot be read as spool files`, fix: "`queue list` names them; repair or remove them by hand" });
    return findings;
  },
};

/** Why tmp/ does not take a written and fsynced file, or null. */
function writeProbe(s: Spool): string | null {
  try {
    s.proveWritable(`doctor-${process.pid}-${Date.now()}`);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}
