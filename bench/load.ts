// Closed-loop load: `concurrency` workers, each starts the next message as soon as its previous one
// is answered, until `n` messages are done. Latency is per message (start of the call to its
// answer); throughput is n / wall time. A failed message is recorded, never retried.

import { cpuSnapshot, cpuDelta, type CpuSnapshot, type CpuDelta } from "./proc.ts";

export interface LoadResult {
  n: number;
  concurrency: number;
  elapsedMs: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  maxMs: number;
  ok: number;
  failures: { index: number; detail: string }[];
  cpu: CpuDelta;
}

/** Resolves when message `index` was delivered; throws (or returns a string) when it was not. */
export type Operation = (index: number) => Promise<string | void>;

export async function closedLoop(n: number, concurrency: number, op: Operation, watch: { serverPid?: number } = {}): Promise<LoadResult> {
  const latencies = new Float64Array(n);
  const failures: LoadResult["failures"] = [];
  let next = 0;
  let ok = 0;
  const before: CpuSnapshot = cpuSnapshot(watch.serverPid);
  const started = performance.now();
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= n) return;
      const t0 = performance.now();
      let problem: string | void;
      try {
        problem = await op(i);
      } catch (e) {
        problem = (e as Error).message ?? String(e);
      }
      latencies[i] = performance.now() - t0;
      if (problem) failures.push({ index: i, detail: problem });
      else ok++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const elapsedMs = performance.now() - started;
  const cpu = cpuDelta(before, cpuSnapshot(watch.serverPid), n);
  const sorted = Array.from(latencies).sort((a, b) => a - b);
  return {
    n,
    concurrency,
    elapsedMs,
    perSecond: (n / elapsedMs) * 1000,
    p50Ms: percentile(sorted, 50),
    p99Ms: percentile(sorted, 99),
    meanMs: sorted.reduce((s, x) => s + x, 0) / Math.max(1, n),
    maxMs: sorted[sorted.length - 1] ?? 0,
    ok,
    failures,
    cpu,
  };
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function median(values: number[]): number {
  return percentile([...values].sort((a, b) => a - b), 50);
}
