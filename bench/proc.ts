// What /proc tells: the machine, a process's memory, and CPU time (this process, a child, the
// whole machine). Linux only; where /proc is missing the numbers are NaN, never a crash.

import { readFileSync, writeFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";

const CLK_TCK = 100; // USER_HZ: 100 on every Linux we run on (getconf CLK_TCK)

export interface Machine {
  cores: number;
  cpuModel: string;
  memoryBytes: number;
  bun: string;
  dovecot: string | null;
  kernel: string;
  lmtp: "dovecot" | "fake";
}

export function machine(dovecotVersion: string | null, lmtp: "dovecot" | "fake"): Machine {
  let model = cpus()[0]?.model ?? "unknown";
  try {
    model = /^model name\s*:\s*(.+)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1]?.trim() ?? model;
  } catch {}
  let kernel = "unknown";
  try {
    kernel = readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
  } catch {}
  return { cores: cpus().length, cpuModel: model, memoryBytes: totalmem(), bun: Bun.version, dovecot: dovecotVersion, kernel, lmtp };
}

export function dovecotVersion(): string | null {
  const bin = Bun.which("dovecot") ?? "/usr/sbin/dovecot";
  try {
    const r = Bun.spawnSync([bin, "--version"], { stdout: "pipe", stderr: "ignore" });
    return r.success ? r.stdout.toString().trim() : null;
  } catch {
    return null;
  }
}

// --- memory ---------------------------------------------------------------------------------

export interface MemStatus {
  rss: number;
  hwm: number;
}

/** VmRSS and VmHWM of a process, in bytes. */
export function memStatus(pid: number): MemStatus {
  const text = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN) * 1024;
  return { rss: kb("VmRSS"), hwm: kb("VmHWM") };
}

/** Resets VmHWM to the current RSS (Linux >= 4.0: "5" > clear_refs). False where not allowed. */
export function resetHighWaterMark(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}

/** Samples VmRSS every `everyMs` until stopped; also keeps the largest sample. */
export function rssSampler(pid: number, everyMs = 10) {
  const samples: { t: number; rss: number }[] = [];
  const t0 = performance.now();
  let peak = 0;
  const take = () => {
    try {
      const { rss } = memStatus(pid);
      samples.push({ t: performance.now() - t0, rss });
      if (rss > peak) peak = rss;
    } catch {}
  };
  take();
  const timer = setInterval(take, everyMs);
  return {
    stop() {
      clearInterval(timer);
      take();
      return { samples, peak };
    },
  };
}

// --- CPU ------------------------------------------------------------------------------------

export interface CpuSnapshot {
  /** This process (user + system), microseconds. */
  selfUs: number;
  /** The watched child (e.g. the server), microseconds; NaN when none. */
  childUs: number;
  /** The whole machine: busy and total jiffies across all cores. */
  machineBusy: number;
  machineTotal: number;
}

export interface CpuDelta {
  /** CPU ms per message spent in this (the bench) process. */
  benchMsPerMessage: number;
  /** CPU ms per message spent in the server child, when there is one. */
  serverMsPerMessage: number | null;
  /** CPU ms per message across the whole machine (bench, server, Dovecot, everything). */
  machineMsPerMessage: number;
  /** Share of all cores busy during the run, 0..1. */
  machineBusy: number;
}

export function cpuSnapshot(childPid?: number): CpuSnapshot {
  const u = process.cpuUsage();
  const [busy, total] = machineJiffies();
  return { selfUs: u.user + u.system, childUs: childPid ? processCpuUs(childPid) : NaN, machineBusy: busy, machineTotal: total };
}

export function cpuDelta(a: CpuSnapshot, b: CpuSnapshot, messages: number): CpuDelta {
  const per = (us: number) => us / 1000 / Math.max(1, messages);
  const busyJ = b.machineBusy - a.machineBusy;
  const totalJ = b.machineTotal - a.machineTotal;
  return {
    benchMsPerMessage: per(b.selfUs - a.selfUs),
    serverMsPerMessage: Number.isNaN(a.childUs) ? null : per(b.childUs - a.childUs),
    machineMsPerMessage: per((busyJ / CLK_TCK) * 1e6),
    machineBusy: totalJ > 0 ? busyJ / totalJ : NaN,
  };
}

/** utime + stime of a process, microseconds. */
export function processCpuUs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // After the command: state is field 3, utime 14, stime 15 (1-based) -> index 11 and 12 here.
    return ((Number(fields[11]) + Number(fields[12])) / CLK_TCK) * 1e6;
  } catch {
    return NaN;
  }
}

function machineJiffies(): [busy: number, total: number] {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const total = v.slice(0, 8).reduce((s, x) => s + x, 0); // user..steal (guest is inside user)
    const notOurs = (v[3] ?? 0) + (v[4] ?? 0) + (v[7] ?? 0); // idle + iowait + steal (another VM's)
    return [total - notOurs, total];
  } catch {
    return [NaN, NaN];
  }
}
