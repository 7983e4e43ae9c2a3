// `bun run bench/profile.ts [raw|json|bare] [concurrency] [messages]`: where the host's CPU goes.
// Runs the host in a child under Bun's sampling profiler (--cpu-prof --cpu-prof-md), sends it
// 10 KB messages into a private Dovecot (or the fake LMTP), stops it, and prints the host's CPU per
// message, its profile by component (bench/profile-summary.ts) and the hottest functions.
//   raw   server.ts, message/rfc822 bodies (what the Worker sends)
//   json  server.ts, the runbook's JSON bodies
//   bare  bench/bare-relay.ts: HTTP -> LmtpPool with nothing else, the floor of an HTTP hop
// BENCH_SPOOL=1 runs the host with a spool (SPOOL_DIR), as the container runs it.
// The whole profile (.cpuprofile for Chrome DevTools, and .md) stays under .bench/profile/.

import { readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { startBackend } from "./backend.ts";
import { closedLoop } from "./load.ts";
import { messageFactory } from "./messages.ts";
import { jsonBodies, relayJsonOp, relayRawOp } from "./paths.ts";
import { summarise } from "./profile-summary.ts";
import { marker } from "./report.ts";
import { OUT_DIR, spawnServer } from "./server-child.ts";

const kind = process.argv[2] === "json" ? "json" : process.argv[2] === "bare" ? "bare" : "raw";
const concurrency = Number(process.argv[3]) || 8;
const n = Number(process.argv[4]) || 3000;
const apiKey = `profile-${crypto.randomUUID()}${crypto.randomUUID()}`;
const dir = join(OUT_DIR, "profile");
rmSync(dir, { recursive: true, force: true });

const backend = await startBackend(process.env.BENCH_LMTP === "fake" ? "fake" : "auto");
const mark = marker(backend.kind);
try {
  const server = await spawnServer({
    apiKey,
    lmtpHost: backend.host,
    lmtpPort: backend.port,
    name: `profile-${kind}`,
    script: kind === "bare" ? "bench/bare-relay.ts" : "server.ts",
    bunArgs: ["--cpu-prof", "--cpu-prof-md", `--cpu-prof-dir=${dir}`],
    spoolDir: process.env.BENCH_SPOOL === "1" ? join(dir, "spool") : undefined,
  });
  const make = messageFactory(`profile-${kind}`, 10 * 1024);
  const messages = Array.from({ length: n }, (_, i) => make(i));
  const op = kind === "json" ? relayJsonOp(server.url, apiKey, jsonBodies(messages)) : relayRawOp(server.url, apiKey, messages);
  const r = await closedLoop(n, concurrency, op, { serverPid: server.pid });
  console.log(mark(`${kind} c=${concurrency}: ${r.perSecond.toFixed(0)} msg/s, host ${r.cpu.serverMsPerMessage?.toFixed(3)} ms CPU per message, ${r.failures.length} failures`));
  await server.stop();
  const files = readdirSync(dir);
  const prof = files.find((f) => f.endsWith(".cpuprofile"));
  const md = files.find((f) => f.endsWith(".md"));
  if (prof) {
    console.log(mark("host JS-thread samples by component:"));
    for (const x of summarise(JSON.parse(readFileSync(join(dir, prof), "utf8")))) {
      console.log(mark(`  ${(x.share * 100).toFixed(1).padStart(5)}%  ${x.component}`));
    }
  }
  if (md) {
    const text = readFileSync(join(dir, md), "utf8");
    const at = text.indexOf("## Hot Functions");
    console.log(mark(""));
    console.log(text.slice(at).split("\n").slice(0, 30).map(mark).join("\n"));
  }
  console.log(mark(`full profile: ${dir}`));
  if (r.failures.length) process.exitCode = 1;
} finally {
  await backend.dispose();
}
