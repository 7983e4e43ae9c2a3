// `bun run dev` as the README promises it: one command starts the host, the Worker in local
// workerd and the fake LMTP writing a Maildir, and prints curls that work when pasted as they are.
// It runs in its own DEV_DIR and on its own ports, beside a developer's own `bun run dev`.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { freePort } from "../../scripts/free-port.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const repo = join(import.meta.dir, "..", "..");
const USER = "user@kuma8088.com";

let devDir: string;
let proc: Subprocess<"ignore", "pipe", "pipe">;
let output = "";
let workerPort: number;

/** The curl commands the dev chain printed, each joined back onto one line. */
function printedCurls(text: string): string[] {
  const curls: string[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i]!.trimStart().startsWith("curl ")) continue;
    let cmd = lines[i]!.trim();
    while (cmd.endsWith("\\")) cmd = `${cmd.slice(0, -1).trimEnd()} ${lines[++i]!.trim()}`;
    curls.push(cmd);
  }
  return curls;
}

/** Runs a printed command as a developer would paste it (bash, from the repository's root). */
async function paste(cmd: string): Promise<{ status: number; body: string }> {
  const p = Bun.spawn(["bash", "-c", `${cmd} -w '\\nHTTP %{http_code}'`], { cwd: repo, stdout: "pipe", stderr: "pipe" });
  const out = await new Response(p.stdout).text();
  await p.exited;
  const m = /\nHTTP (\d{3})$/.exec(out);
  if (!m) throw new Error(`no status from: ${cmd}\n${out}\n${await new Response(p.stderr).text()}`);
  return { status: Number(m[1]), body: out.slice(0, m.index) };
}

const inbox = () => {
  const dir = join(devDir, "maildir", USER, "new");
  try {
    return readdirSync(dir).map((f) => readFileSync(join(dir, f)));
  } catch {
    return [];
  }
};

const refuses = (port: number) =>
  new Promise<boolean>((resolve) => {
    const s = net.connect({ host: "127.0.0.1", port });
    s.once("connect", () => (s.destroy(), resolve(false)));
    s.once("error", () => resolve(true));
  });

beforeAll(async () => {
  devDir = mkdtempSync(join(tmpdir(), "relay-dev-"));
  workerPort = await freePort();
  const env: Record<string, string> = { ...(process.env as Record<string, string>), DEV_DIR: devDir, PORT: String(await freePort()), WORKER_PORT: String(workerPort) };
  for (const name of ["LMTP_HOST", "LMTP_PORT", "API_KEY", "API_KEYS", "SPOOL_DIR"]) delete env[name];
  proc = Bun.spawn([process.execPath, "run", "scripts/dev.ts"], { cwd: repo, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  void (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of proc.stdout) output += decoder.decode(chunk, { stream: true });
  })();
  const deadline = Date.now() + 60_000;
  while (!output.includes("then: ls")) {
    if (proc.exitCode !== null) throw new Error(`bun run dev exited with ${proc.exitCode}:\n${output}\n${await new Response(proc.stderr).text()}`);
    if (Date.now() > deadline) throw new Error(`bun run dev printed no curls within 60 s:\n${output}`);
    await Bun.sleep(100);
  }
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  // A test that failed early leaves it running: the polite stop first, so workerd goes too.
  if (proc && proc.exitCode === null) {
    proc.kill("SIGTERM");
    await Promise.race([proc.exited, Bun.sleep(10_000)]);
    if (proc.exitCode === null) proc.kill("SIGKILL");
  }
  rmSync(devDir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

describe("bun run dev", () => {
  test("prints two curls: one through the Worker's email() in workerd, one to the host in the runbook's JSON", () => {
    const curls = printedCurls(output);
    expect(curls).toHaveLength(2);
    expect(curls[0]).toContain(`127.0.0.1:${workerPort}/cdn-cgi/handler/email`);
    expect(curls[1]).toContain("/api/v1/inbound-mail");
    expect(curls[1]).toContain("application/json");
  });

  test("the Worker's curl, pasted as printed: accepted, and the sample lands in the Maildir byte for byte", async () => {
    const before = inbox().length;
    const r = await paste(printedCurls(output)[0]!);
    expect(r.status).toBe(200);
    expect(r.body).toContain("Worker successfully processed email");
    const after = inbox();
    expect(after).toHaveLength(before + 1);
    const sample = readFileSync(join(devDir, "sample.eml"));
    expect(after.some((m) => m.includes(sample))).toBe(true);
  });

  test("the host's curl (runbook 4.1), pasted as printed: 200 success, and the message in the Maildir", async () => {
    const before = inbox().length;
    const r = await paste(printedCurls(output)[1]!);
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body)).toMatchObject({ status: "success", recipient: USER });
    const after = inbox();
    expect(after).toHaveLength(before + 1);
    expect(after.some((m) => m.toString("latin1").includes("Subject: Test Email\r\n\r\nThis is a test message."))).toBe(true);
  });

  test("the same curl with X-API-Key: invalid-key (runbook 4.3.1): 401, nothing delivered", async () => {
    const before = inbox().length;
    const cmd = printedCurls(output)[1]!.replace(/-H "X-API-Key: \$\(cat [^)]+\)"/, '-H "X-API-Key: invalid-key"');
    expect(cmd).toContain("invalid-key");
    const r = await paste(cmd);
    expect(r.status).toBe(401);
    expect(inbox()).toHaveLength(before);
  });

  test("SIGTERM stops everything it started: workerd's port is closed afterwards", async () => {
    proc.kill("SIGTERM");
    expect(await proc.exited).toBe(0);
    const deadline = Date.now() + 10_000;
    while (!(await refuses(workerPort)) && Date.now() < deadline) await Bun.sleep(100);
    expect(await refuses(workerPort)).toBe(true);
  });
});
