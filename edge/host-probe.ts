// Can the Worker reach the host now? GET /health at DELL_API_ENDPOINT's origin, through the same
// path as the mail (Cloudflare, the tunnel): only the relay's own "healthy" counts, never a
// redirect or another service's page. /edge/metrics reports it as edge_host_up, for the alert
// "the host unreachable from the edge" and the doctor. Through fetchHost, as the mail goes: the
// Workers VPC binding, the Access service token, no redirect followed.

import type { WorkerConfig } from "./config.ts";
import { fetchHost } from "./forward.ts";

const PROBE_MS = 5_000;

export async function hostReachable(config: Pick<WorkerConfig, "endpoint" | "access" | "host">, ms = PROBE_MS): Promise<boolean> {
  try {
    const res = await fetchHost(config, new URL("/health", config.endpoint).toString(), { signal: AbortSignal.timeout(ms) });
    const body = (await res.json().catch(() => null)) as { status?: unknown } | null;
    return res.status === 200 && body?.status === "healthy";
  } catch {
    return false;
  }
}
