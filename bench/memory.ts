// One 24 MiB message through the host (its own process): the time it takes, and how far the
// host's memory rises above its idle level while it streams the message into LMTP.
//
// Idle: after warm-up deliveries and a pause, VmRSS. Then VmHWM (the kernel's high-water mark of
// RSS) is reset to the current RSS through /proc/PID/clear_refs, so after the message VmHWM is the
// peak *during* it. VmRSS is also sampled every 10 ms (a cross-check, and the fallback where the
// reset is not allowed: VmHWM alone would still hold start-up's peak).
// The body comes from a generator, 64 KiB at a time: the bench never holds the message whole.

import { RAW_HEADERS, post } from "./paths.ts";
import { streamOf } from "../tests/support/streams.ts";
import { messageFactory, streamedMessage } from "./messages.ts";
import { memStatus, resetHighWaterMark, rssSampler } from "./proc.ts";

export interface MemoryResult {
  bytes: number;
  ms: number;
  status: number;
  idleRss: number;
  idleHwm: number;
  peakHwm: number | null;
  peakSampled: number;
  /** Peak RSS above idle, bytes (from VmHWM after the reset, else the sampled peak). */
  aboveIdle: number;
  /** aboveIdle / message size. */
  multiple: number;
  source: "VmHWM" | "VmRSS samples";
  rssAfter: number;
  samples: number;
  failure: string | null;
}

export async function bigMessage(opts: {
  url: string;
  pid: number;
  apiKey: string;
  bytes: number;
}): Promise<MemoryResult> {
  const { url, pid, apiKey, bytes } = opts;
  // Warm-up: a few deliveries of 10 KB and one of 1 MiB (the code paths, the pool's connection,
  // buffers that any later message would also get), then let the host settle.
  const small = messageFactory("mem-warm", 10 * 1024);
  for (let i = 0; i < 5; i++) {
    const r = await post(url, apiKey, small(i), { ...RAW_HEADERS, "content-length": String(10 * 1024) });
    if (r.detail) throw new Error(`warm-up delivery failed: ${r.detail}`);
  }
  const mid = messageFactory("mem-warm-1m", 1024 * 1024);
  const w = await post(url, apiKey, mid(0), { ...RAW_HEADERS, "content-length": String(1024 * 1024) });
  if (w.detail) throw new Error(`warm-up delivery failed: ${w.detail}`);
  await Bun.sleep(1_500);

  const idle = memStatus(pid);
  const reset = resetHighWaterMark(pid);
  const sampler = rssSampler(pid, 10);
  const t0 = performance.now();
  const r = await post(url, apiKey, streamOf(streamedMessage("mem-24m", bytes)), { ...RAW_HEADERS, "content-length": String(bytes) });
  const ms = performance.now() - t0;
  const { peak, samples } = sampler.stop();
  const after = memStatus(pid);
  const peakHwm = reset ? after.hwm : null;
  const top = peakHwm ?? peak;
  const aboveIdle = Math.max(0, top - idle.rss);
  return {
    bytes,
    ms,
    status: r.status,
    idleRss: idle.rss,
    idleHwm: idle.hwm,
    peakHwm,
    peakSampled: peak,
    aboveIdle,
    multiple: aboveIdle / bytes,
    source: reset ? "VmHWM" : "VmRSS samples",
    rssAfter: after.rss,
    samples: samples.length,
    failure: r.detail,
  };
}


/** Messages bigMessage() delivers before the measured one (they are in the mailbox too). */
export const WARMUP_MESSAGES = 6;
