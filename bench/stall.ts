// `bun bench/stall.ts [messages] [concurrency]`: what stalled uploads cost everyone else.
// A private Dovecot and the host in its own process with a spool, as the container runs it. First
// `messages` normal 10 KB deliveries (closed loop, `concurrency` in flight, default 500 and 4):
// their latency p50 / p95 / max and how they were answered. Then the same beside 16 stalled
// uploads (as many as the host's LMTP connections): each sends its HTTP headers and the first 500
// bytes of a 10 KB message (its header block and the start of its body), then nothing; one that is answered (after BODY_IDLE_SECONDS) is replaced at once,
// so 16 are stalled the whole time. Prints the figures; asserts no timing. A diagnostic, not part
// of `bun run bench`.

import { startBackend } from "./backend.ts";
import { messageFactory } from "./messages.ts";
import { INBOUND, RAW_HEADERS } from "./paths.ts";
import { marker } from "./report.ts";
import { OUT_DIR, spawnServer } from "./server-child.ts";
import { join } from "node:path";
import { rmSync } from "node:fs";
import { stalledUpload, statusOf, type StalledUpload } from "../tests/support/stalled-upload.ts";
import { until } from "../tests/support/wait.ts";

const n = Number(process.argv[2]) || 500;
const concurrency = Number(process.argv[3]) || 4;
const STALLED = 16;
const apiKey = `stall-${crypto.randomUUID()}${crypto.randomUUID()}`;
const spoolDir = join(OUT_DIR, "stall-spool");
rmSync(spoolDir, { recursive: true, force: true });

interface Phase {
  label: string;
  latencies: number[];
  statuses: Record<number, number>;
  stalledAnswers: Record<string, number>;
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? 0;

const backend = await startBackend();
const mark = marker(backend.kind);
try {
  const server = await spawnServer({ apiKey, lmtpHost: backend.host, lmtpPort: backend.port, name: "stall", spoolDir });
  const headers = { "x-api-key": apiKey, ...RAW_HEADERS };

  async function run(label: string, stalls: boolean): Promise<Phase> {
    const make = messageFactory(`stall-${label}`, 10 * 1024);
    const messages = Array.from({ length: n }, (_, i) => make(i));
    const phase: Phase = { label, latencies: [], statuses: {}, stalledAnswers: {} };
    let stopping = false;
    const open = new Set<StalledUpload>();
    const keepStalled = async (slot: number): Promise<void> => {
      while (!stopping) {
        // A short header block, then the start of the body: the host has the headers and waits for the rest.
        const sent = new TextEncoder().encode(`Message-ID: <stalled-${label}-${slot}-${crypto.randomUUID()}@bench>\r\nSubject: stalled\r\n\r\n${"x".repeat(500)}`).subarray(0, 500);
        const u = await stalledUpload({ url: server.url, path: INBOUND, headers, sent, length: 10 * 1024 });
        open.add(u);
        const answer = await Promise.race([u.answer, until("the normal deliveries are done", () => stopping, Infinity, 50).then(() => null)]);
        open.delete(u);
        u.close();
        if (typeof answer === "string") {
          const key = String(statusOf(answer) ?? "closed");
          phase.stalledAnswers[key] = (phase.stalledAnswers[key] ?? 0) + 1;
        }
      }
    };
    const stallers = stalls ? Array.from({ length: STALLED }, (_, i) => keepStalled(i)) : [];
    if (stalls) await Bun.sleep(300); // all 16 are in before the first normal message
    let next = 0;
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        for (;;) {
          const i = next++;
          if (i >= n) return;
          const t0 = performance.now();
          const res = await fetch(server.url + INBOUND, { method: "POST", headers, body: messages[i]! });
          await res.arrayBuffer();
          phase.latencies.push(performance.now() - t0);
          phase.statuses[res.status] = (phase.statuses[res.status] ?? 0) + 1;
        }
      }),
    );
    stopping = true;
    for (const u of open) u.close();
    await Promise.all(stallers);
    return phase;
  }

  const phases = [await run("alone", false), await run("beside-16-stalled", true)];
  await server.stop();
  for (const p of phases) {
    const sorted = [...p.latencies].sort((a, b) => a - b);
    console.log(
      mark(
        `${p.label.padEnd(18)} ${n} msgs c=${concurrency}: p50 ${percentile(sorted, 50).toFixed(1)} ms, p95 ${percentile(sorted, 95).toFixed(1)} ms, ` +
          `max ${sorted[sorted.length - 1]!.toFixed(1)} ms; answers ${JSON.stringify(p.statuses)}` +
          (Object.keys(p.stalledAnswers).length ? `; stalled uploads answered ${JSON.stringify(p.stalledAnswers)}` : ""),
      ),
    );
  }
  console.log(mark(`delivered into Dovecot: ${await backend.count()} (of ${2 * n} normal messages)`));
} finally {
  await backend.dispose();
  rmSync(spoolDir, { recursive: true, force: true });
}
