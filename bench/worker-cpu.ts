// The Worker's own CPU time per message: worker.ts's email() against the runbook's handler shape
// (bench/runbook-worker.ts), both run in this Bun process against a sink in another process, on a
// fake ForwardableEmailMessage whose raw stream yields the message in 64 KiB chunks.
// process.cpuUsage() (user + system, all of this process's threads) around each call; the median
// per message is reported. This is Bun's JavaScriptCore, not workerd's V8: indicative only.

import { email, type IncomingEmail } from "../worker.ts";
import { median } from "./load.ts";
import { streamOf } from "../tests/support/streams.ts";
import { RECIPIENT, SENDER, messageFactory } from "./messages.ts";
import { runbookWorker } from "./runbook-worker.ts";
import { spawnSink } from "./server-child.ts";

export interface WorkerCpuRow {
  label: string;
  bytes: number;
  iterations: number;
  /** Median CPU ms per message, worker.ts email(). */
  streamedCpuMs: number;
  /** Median CPU ms per message, the runbook's buffer-decode-JSON handler. */
  runbookCpuMs: number;
  /** runbook / streamed. */
  ratio: number;
  /**
   * Median CPU ms of the bare minimum in this runtime: one fetch() POST of the same bytes, already
   * in one buffer, to the same sink, reading its answer. What sending costs before any handler code.
   */
  floorCpuMs: number;
  /** The same, the bytes sent from a stream of 64 KiB chunks (how email() gets them here). */
  streamFloorCpuMs: number;
  streamedWallMs: number;
  runbookWallMs: number;
  failures: string[];
}

export const WORKER_SIZES = [
  { label: "10 KB", bytes: 10 * 1024 },
  { label: "1 MB", bytes: 1024 * 1024 },
  { label: "25 MB", bytes: 25 * 1024 * 1024 },
] as const;

type FakeEmail = IncomingEmail & { rejected: string | null };

function fakeMessage(bytes: Uint8Array, subject: string, messageId: string): FakeEmail {
  const m: FakeEmail = {
    from: SENDER,
    to: RECIPIENT,
    headers: new Headers({ subject, "message-id": messageId, from: SENDER, to: RECIPIENT }),
    raw: streamOf(bytes, 64 * 1024),
    rawSize: bytes.length,
    rejected: null,
    setReject(reason: string) {
      m.rejected = reason;
    },
  };
  return m;
}

async function measure(run: () => Promise<void>): Promise<{ cpuMs: number; wallMs: number }> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await run();
  const wallMs = performance.now() - t0;
  const c = process.cpuUsage(c0);
  return { cpuMs: (c.user + c.system) / 1000, wallMs };
}

export async function workerCpu(iterations: readonly number[], progress: (line: string) => void): Promise<WorkerCpuRow[]> {
  const sink = await spawnSink();
  const env = {
    API_KEY: "bench-worker-key-0123456789abcdefghijklmnopqrstuvwxyz",
    DELL_API_ENDPOINT: `${sink.url}/api/v1/inbound-mail`,
  };
  const rows: WorkerCpuRow[] = [];
  // Both handlers log each message; the terminal is not part of what is measured.
  const { log, error } = console;
  console.log = () => {};
  console.error = () => {};
  try {
    for (const [k, size] of WORKER_SIZES.entries()) {
      const n = iterations[k] ?? 5;
      const make = messageFactory(`cpu-${k}`, size.bytes);
      const bytes = make(0); // one buffer per size; each call streams views of it, no copies
      const failures: string[] = [];
      const streamed: { cpuMs: number; wallMs: number }[] = [];
      const runbook: { cpuMs: number; wallMs: number }[] = [];
      const floor: number[] = [];
      const streamFloor: number[] = [];
      const one = async (which: "streamed" | "runbook" | "floor" | "stream-floor", i: number) => {
        const msg = fakeMessage(bytes, `cpu ${size.label} ${i}`, `<cpu-${k}-${i}@bench.example.org>`);
        const r = await measure(async () => {
          if (which === "streamed") await email(msg, env);
          else if (which === "runbook") await runbookWorker.email(msg, env);
          else {
            const body = which === "floor" ? bytes : streamOf(bytes, 64 * 1024);
            // @ts-expect-error - duplex: Bun needs it for a stream body
            const res = await fetch(env.DELL_API_ENDPOINT, { method: "POST", headers: { "content-type": "message/rfc822", "content-length": String(bytes.byteLength) }, body, duplex: "half" });
            await res.json();
            if (!res.ok) throw new Error(`sink answered ${res.status}`);
          }
        }).catch((e: Error) => {
          failures.push(`${which}: threw ${e.message}`);
          return null;
        });
        if (msg.rejected !== null) failures.push(`${which}: setReject(${msg.rejected})`);
        return r;
      };
      // Warm-up (JIT, connection to the sink), not counted.
      const warm = Math.max(1, Math.min(10, Math.ceil(n / 10)));
      for (let i = 0; i < warm; i++) {
        await one("streamed", -1 - i);
        await one("runbook", -1 - i);
        await one("floor", -1 - i);
        await one("stream-floor", -1 - i);
      }
      failures.length = 0;
      // Interleaved, so drift on a shared machine hits both alike.
      for (let i = 0; i < n; i++) {
        const a = await one("streamed", i);
        if (a) streamed.push(a);
        const b = await one("runbook", i);
        if (b) runbook.push(b);
        const c = await one("floor", i);
        if (c) floor.push(c.cpuMs);
        const d = await one("stream-floor", i);
        if (d) streamFloor.push(d.cpuMs);
      }
      const row: WorkerCpuRow = {
        label: size.label,
        bytes: size.bytes,
        iterations: n,
        streamedCpuMs: median(streamed.map((x) => x.cpuMs)),
        runbookCpuMs: median(runbook.map((x) => x.cpuMs)),
        ratio: NaN,
        floorCpuMs: median(floor),
        streamFloorCpuMs: median(streamFloor),
        streamedWallMs: median(streamed.map((x) => x.wallMs)),
        runbookWallMs: median(runbook.map((x) => x.wallMs)),
        failures: failures.slice(0, 5),
      };
      row.ratio = row.runbookCpuMs / row.streamedCpuMs;
      rows.push(row);
      progress(`worker CPU ${size.label}: streamed ${row.streamedCpuMs.toFixed(2)} ms, runbook ${row.runbookCpuMs.toFixed(2)} ms, fetch floor ${row.floorCpuMs.toFixed(2)} ms (from a stream ${row.streamFloorCpuMs.toFixed(2)} ms) (median of ${n})`);
    }
  } finally {
    console.log = log;
    console.error = error;
    await sink.stop();
  }
  return rows;
}
