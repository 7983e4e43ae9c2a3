// The run half of `bun run test:image` (scripts/test-image.sh builds the image first):
//   bun scripts/test-image-run.ts IMAGE
// Starts the image with `buildah run` (chroot isolation, this machine's network, listening on
// loopback only), with a fake LMTP server in this process standing in for Dovecot, and checks: the
// image's settings, GET /health and the time to it, the binary's healthcheck subcommand, one
// delivery (byte-exact), a refused key, one message through the spool on the image's volume, the
// metrics, `mail-relay doctor`, the non-root user, and a clean stop on SIGTERM. Ends with "N passed, N failed".

import { readFileSync, readdirSync } from "node:fs";
import { startFakeLmtp } from "../fake-lmtp.ts";
import { newApiKey } from "./keygen.ts";
import { sendToHost, testMessage } from "./send-test.ts";
import { freePort } from "./free-port.ts";

const image = process.argv[2];
if (!image) {
  console.error("usage: bun scripts/test-image-run.ts IMAGE");
  process.exit(2);
}
const buildahArgs = (process.env.TEST_IMAGE_BUILDAH_ARGS ?? "--storage-driver vfs").split(/\s+/).filter(Boolean);
const BIN = "/app/mail-relay";
const SPOOL = "/var/spool/mail-relay";

let passed = 0;
let failed = 0;
function check(name: string, ok: boolean, detail = ""): boolean {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? ` (${detail})` : ""}`);
  return ok;
}

function buildah(args: string[]): { code: number; out: string; err: string } {
  const p = Bun.spawnSync(["buildah", ...buildahArgs, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
}

/** The same, without blocking this process: for commands that talk to the fake LMTP server in it. */
async function buildahAsync(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const p = Bun.spawn(["buildah", ...buildahArgs, ...args], { stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, out, err };
}

const mb = (bytes: number) => `${(bytes / 1e6).toFixed(1)} MB`;
const since = (t: number) => Math.round(performance.now() - t);


/** The pid of the container's server, found by its command line and its PORT in /proc. */
function serverPid(port: number): number | null {
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, "latin1").split("\0");
      if (cmd[0] !== BIN || cmd.length > 2) continue;
      if (readFileSync(`/proc/${d}/environ`, "latin1").split("\0").includes(`PORT=${port}`)) return Number(d);
    } catch {
      // gone meanwhile
    }
  }
  return null;
}

// --- the image's settings ------------------------------------------------------------------
const inspected = buildah(["inspect", "--type", "image", image]);
if (inspected.code !== 0) {
  console.error(`cannot inspect ${image}: ${inspected.err}`);
  process.exit(1);
}
const cfg = JSON.parse(inspected.out).Docker?.config ?? {};
const env: string[] = cfg.Env ?? [];
check("runs as uid 10001, not root", cfg.User === "10001:10001", cfg.User);
check("HOST=0.0.0.0 PORT=8080 SPOOL_DIR set", ["HOST=0.0.0.0", "PORT=8080", `SPOOL_DIR=${SPOOL}`].every((e) => env.includes(e)), env.join(" "));
check("spool volume declared", SPOOL in (cfg.Volumes ?? {}));
check("port 8080 exposed", "8080/tcp" in (cfg.ExposedPorts ?? {}));
check("HEALTHCHECK runs the binary", JSON.stringify(cfg.Healthcheck?.Test) === JSON.stringify(["CMD", BIN, "healthcheck"]), JSON.stringify(cfg.Healthcheck?.Test));

// buildah reports sizes as text ("188 MB", decimal units).
const sizes = JSON.parse(buildah(["images", "--json"]).out || "[]") as { names?: string[] | null; size: string }[];
const UNITS: Record<string, number> = { B: 1, kB: 1e3, KB: 1e3, MB: 1e6, GB: 1e9 };
const sizeOf = (name: string | undefined) => {
  const m = /^([\d.]+)\s*(B|kB|KB|MB|GB)$/.exec(sizes.find((i) => name && i.names?.includes(name))?.size ?? "");
  return m ? Number(m[1]) * UNITS[m[2]!]! : NaN;
};
const imageSize = sizeOf(image.includes(":") ? image : `${image}:latest`);
const baseSize = sizeOf(process.env.TEST_IMAGE_STANDIN_BASE);

// --- start it --------------------------------------------------------------------------------
const fake = await startFakeLmtp({ host: "127.0.0.1", port: 0 });
const port = await freePort();
const key = newApiKey();
const url = `http://127.0.0.1:${port}`;

let t = performance.now();
const from = buildah(["from", "--pull=never", image]);
if (from.code !== 0) {
  console.error(`buildah from failed: ${from.err}`);
  process.exit(1);
}
const ctr = from.out.trim().split("\n").pop()!;
const createMs = since(t);

const runArgs = (extraEnv: Record<string, string>, cmd: string[]) => [
  "run",
  "--isolation",
  "chroot",
  "--network",
  "host",
  ...Object.entries(extraEnv).flatMap(([k, v]) => ["--env", `${k}=${v}`]),
  ctr,
  "--",
  ...cmd,
];

// HOST=127.0.0.1: the container shares this machine's network here, so listen on loopback only.
const serverEnv = { HOST: "127.0.0.1", PORT: String(port), API_KEY: key, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port) };
let logs = "";
t = performance.now();
const proc = Bun.spawn(["buildah", ...buildahArgs, ...runArgs(serverEnv, [BIN])], { stdout: "pipe", stderr: "pipe" });
const collect = async (s: ReadableStream<Uint8Array>) => {
  for await (const chunk of s) logs += new TextDecoder().decode(chunk);
};
void collect(proc.stdout);
void collect(proc.stderr);

let healthyMs = -1;
let healthyAt = 0;
let processStartToHealthyMs = NaN;
/** How long ago the process started (kernel clock ticks of 10 ms, so +-10 ms). */
function processAgeMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const startTicks = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]);
  const uptimeS = Number(readFileSync("/proc/uptime", "latin1").split(" ")[0]);
  return uptimeS * 1000 - startTicks * 10;
}
while (performance.now() - t < 30_000 && proc.exitCode === null) {
  const res = await fetch(`${url}/health`).catch(() => null);
  if (res?.ok && ((await res.json()) as { status?: string }).status === "healthy") {
    healthyMs = since(t);
    healthyAt = performance.now();
    break;
  }
  await Bun.sleep(5);
}

try {
  if (!check("GET /health answers healthy", healthyMs >= 0, healthyMs >= 0 ? `${healthyMs} ms after buildah run` : "no answer in 30 s")) throw new Error("not started");

  const pid = serverPid(port);
  const uid = pid ? /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, "latin1"))?.[1] : undefined;
  if (pid) processStartToHealthyMs = processAgeMs(pid) - (performance.now() - healthyAt);
  check("the server process runs as uid 10001", uid === "10001", `pid ${pid}, uid ${uid}`);

  let hc = buildah(runArgs({ PORT: String(port) }, [BIN, "healthcheck"]));
  check("`mail-relay healthcheck` exits 0 while the server runs", hc.code === 0, `exit ${hc.code}`);
  hc = buildah(runArgs({ PORT: String(await freePort()) }, [BIN, "healthcheck"]));
  check("`mail-relay healthcheck` exits 1 where nothing listens", hc.code === 1, `exit ${hc.code}`);

  // One delivery through the container into the fake LMTP server, byte for byte.
  const msg = testMessage({ from: "sender@example.com", to: "user@example.com" });
  let r = await sendToHost(url, key, msg);
  check("a message is delivered (200)", r.status === 200 && r.json?.status === "success", `HTTP ${r.status} ${r.json?.status}, ${r.ms} ms`);
  const got = fake.received.at(-1);
  check("the fake LMTP server got exactly the bytes sent", fake.received.length === 1 && !!got && Buffer.from(got.data).equals(Buffer.from(msg.raw)), `${fake.received.length} received`);

  r = await sendToHost(url, "x".repeat(64), testMessage({ from: "sender@example.com", to: "user@example.com" }));
  check("a wrong key is refused (401)", r.status === 401, `HTTP ${r.status}`);

  // Dovecot says "try later": the message goes to the spool on the image's volume (written by uid
  // 10001), the sender is told 202, and the background deliverer delivers it once LMTP accepts.
  fake.behaviour.rcpt = () => 450;
  const spooled = testMessage({ from: "sender@example.com", to: "user@example.com" });
  r = await sendToHost(url, key, spooled);
  check("a message Dovecot defers is spooled (202)", r.status === 202, `HTTP ${r.status} ${r.json?.status}`);
  const list = buildah(runArgs({}, [BIN, "queue", "list"]));
  check("`mail-relay queue list` shows it", list.code === 0 && /queued: 1\b/.test(list.out), list.out.split("\n")[0] ?? list.err.trim());
  fake.behaviour.rcpt = () => 250;
  const waitStart = performance.now();
  while (fake.received.length < 2 && performance.now() - waitStart < 30_000) await Bun.sleep(50);
  const later = fake.received[1];
  check(
    "the spooled message is delivered later, byte-exact",
    !!later && Buffer.from(later.data).equals(Buffer.from(spooled.raw)),
    later ? `after ${since(waitStart)} ms` : "not within 30 s",
  );

  const metrics = await fetch(`${url}/metrics`, { headers: { "x-api-key": key } }).then((m) => m.text());
  check("/metrics counts them", /^relay_delivered_total 1$/m.test(metrics) && /^relay_queued_total 1$/m.test(metrics) && /^relay_spool_delivered_total 1$/m.test(metrics));

  // `mail-relay doctor` in the image, beside the running server: the target, the spool on the
  // volume and the path to the server all ok (no MAIL_DOMAIN: DNS skipped), exit 0; with a key
  // the server does not hold, the PUBLIC_URL check fails (exit 1). Neither prints the key.
  const doctorEnv = { API_KEY: key, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port), PUBLIC_URL: `${url}/api/v1/inbound-mail` };
  // Asynchronously: the doctor and the server both talk to the fake LMTP server in this process.
  let doc = await buildahAsync(runArgs(doctorEnv, [BIN, "doctor", "--json"]));
  const parts = (out: string) => {
    try {
      return (JSON.parse(out) as { findings: { part: string; status: string }[] }).findings.map((f) => `${f.part}:${f.status}`).join(" ");
    } catch {
      return `not JSON: ${out.slice(0, 200)}`;
    }
  };
  check(
    "`mail-relay doctor --json` in the image: target, spool and PUBLIC_URL ok, exit 0",
    doc.code === 0 && ["target:ok", "spool:ok", "public-url:ok", "dns:skip", "edge:skip"].every((p) => parts(doc.out).includes(p)) && !parts(doc.out).includes(":fail"),
    `exit ${doc.code}: ${parts(doc.out)}`,
  );
  const otherKey = newApiKey();
  doc = await buildahAsync(runArgs({ ...doctorEnv, API_KEY: otherKey }, [BIN, "doctor"]));
  const output = doc.out + doc.err;
  check("`mail-relay doctor` with another key: the keys differ (exit 1)", doc.code === 1 && /✗ public-url .*keys and these differ/.test(output), `exit ${doc.code}`);
  check("the doctor prints no key, nor the start of one", ![key, otherKey].some((k) => output.includes(k.slice(0, 6))));

  // docker stop: SIGTERM to the server, which should say "stopped" and exit 0.
  t = performance.now();
  const pid2 = serverPid(port);
  if (pid2) process.kill(pid2, "SIGTERM");
  const code = await Promise.race([proc.exited, Bun.sleep(30_000).then(() => null)]);
  check("SIGTERM stops it cleanly", code === 0 && /"event":"stopped"/.test(logs), `exit ${code} in ${since(t)} ms`);
} catch (e) {
  if ((e as Error).message !== "not started") check("no unexpected error", false, (e as Error).message);
} finally {
  if (proc.exitCode === null) {
    const pid = serverPid(port);
    if (pid) process.kill(pid, "SIGKILL");
    proc.kill("SIGKILL");
    await proc.exited;
  }
  buildah(["rm", ctr]);
  await fake.close();
}

if (failed) console.log(`--- the server's output ---\n${logs.slice(-4000)}`);
const buildMs = Number(process.env.TEST_IMAGE_BUILD_MS);
console.log(`
image ${image}: ${mb(imageSize)}${Number.isFinite(baseSize) ? ` (base ${mb(baseSize)}, added by the Dockerfile ${mb(imageSize - baseSize)})` : ""}
build ${Number.isFinite(buildMs) ? `${(buildMs / 1000).toFixed(1)} s` : "?"}; container created (buildah from) in ${createMs} ms
healthy ${healthyMs} ms after \`buildah run\`; ${Number.isFinite(processStartToHealthyMs) ? `${Math.max(0, Math.round(processStartToHealthyMs))} ms (+-10) after the server process started` : ""}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
