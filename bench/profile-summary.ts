// Summarises a Chrome-format .cpuprofile (what `bun --cpu-prof` writes) by component: each sample
// is charged to the innermost frame on its stack that belongs to a known component (the product's
// modules, Hono, zod, SQLite, ...); native frames count for the JavaScript that called
// them. JSC samples only while JavaScript runs, so shares are of the JS thread's busy time.

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: Node[];
  samples: number[];
}

const COMPONENTS: [name: string, test: (url: string, fn: string) => boolean][] = [
  ["api key: shared/middleware/api-key.ts (SHA-256, constant-time compare)", (u) => u.endsWith("middleware/api-key.ts")],
  ["header peek: message-headers.ts (stream replay)", (u) => u.endsWith("/message-headers.ts")],
  ["duplicate log: bun:sqlite", (u) => u.startsWith("bun:sqlite") || u.endsWith("/delivered-log.ts")],
  ["validation: zod", (u) => u.includes("node_modules/zod/")],
  ["access log + metrics", (u) => u.endsWith("middleware/access-log.ts") || u.endsWith("/shared/log.ts") || u.endsWith("/metrics.ts") || u.endsWith("/prometheus.ts")],
  ["LMTP client: lmtp.ts, lmtp/", (u) => u.endsWith("/lmtp.ts") || u.includes("/lmtp/")],
  ["delivery.ts", (u) => u.endsWith("/delivery.ts")],
  ["app.ts / contract.ts / replies.ts / body-limit.ts", (u) => /\/(app|contract|replies|body-limit)\.ts$/.test(u)],
  ["hono (router, context, request)", (u) => u.includes("node_modules/hono/")],
  ["server.ts / config", (u) => /\/(server|config|config-env)\.ts$/.test(u)],
  ["bench/bare-relay.ts", (u) => u.endsWith("bench/bare-relay.ts")],
];

export function summarise(profile: Profile): { component: string; samples: number; share: number }[] {
  const parent = new Map<number, number>();
  const byId = new Map<number, Node>();
  for (const n of profile.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  const cache = new Map<number, string>();
  const componentOf = (id: number): string => {
    const hit = cache.get(id);
    if (hit) return hit;
    let name = "other (Bun runtime, streams, timers, native)";
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const f = byId.get(at)!.callFrame;
      if (f.functionName === "(garbage collector)") {
        name = "garbage collector";
        break;
      }
      const c = COMPONENTS.find(([, test]) => test(f.url, f.functionName));
      if (c) {
        name = c[0];
        break;
      }
    }
    cache.set(id, name);
    return name;
  };
  const counts = new Map<string, number>();
  for (const s of profile.samples) {
    const name = componentOf(s);
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  const total = profile.samples.length || 1;
  return [...counts].map(([component, samples]) => ({ component, samples, share: samples / total })).sort((a, b) => b.samples - a.samples);
}

if (import.meta.main) {
  const path = process.argv[2];
  if (!path) throw new Error("usage: bun bench/profile-summary.ts FILE.cpuprofile");
  for (const r of summarise(await Bun.file(path).json())) console.log(`${(r.share * 100).toFixed(1).padStart(5)}%  ${String(r.samples).padStart(6)}  ${r.component}`);
}
