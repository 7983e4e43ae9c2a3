// `bun run dev`: the whole chain on one machine. The Worker in local workerd (wrangler dev),
// pointed at the host server, which delivers to an embedded fake LMTP writing a Maildir under
// .dev/ (unless LMTP_HOST points at a real Dovecot). Prints curls for both entry points.

import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { ServerEnv } from "../host/config.ts";
import { fromEnv } from "../shared/config-env.ts";
import { INBOUND_PATH } from "../shared/contract.ts";
import { startFakeLmtp } from "../fake-lmtp.ts";
import { startServer } from "../server.ts";
import { newApiKey } from "./keygen.ts";
import { startWranglerDev } from "./wrangler-dev.ts";

const root = join(import.meta.dir, "..");
// DEV_DIR moves it (the tests run a second dev chain beside a developer's own).
const devDir = process.env.DEV_DIR ?? join(root, ".dev");
const shown = (path: string) => relative(process.cwd(), path) || ".";
mkdirSync(devDir, { recursive: true });

// One dev key, kept across runs so pasted commands keep working.
const keyFile = join(devDir, "api-key");
if (!process.env.API_KEY && !process.env.API_KEYS) {
  if (!existsSync(keyFile)) writeFileSync(keyFile, newApiKey() + "\n", { mode: 0o600 });
  process.env.API_KEY = readFileSync(keyFile, "utf8").trim();
}

let maildir: string | null = null;
if (!process.env.LMTP_HOST) {
  maildir = join(devDir, "maildir");
  const fake = await startFakeLmtp({ maildir });
  process.env.LMTP_HOST = fake.host;
  process.env.LMTP_PORT = String(fake.port);
}

// The durable spool, as in the container: stop the fake LMTP's Dovecot and watch mail queue up.
process.env.SPOOL_DIR ??= join(devDir, "spool");

const config = fromEnv(ServerEnv, process.env);
const server = startServer(config);
const endpoint = `${server.url}${INBOUND_PATH}`;
const workerPort = Number(process.env.WORKER_PORT ?? 8787);
const worker = await startWranglerDev({ port: workerPort, vars: { API_KEY: config.apiKeys[0]!, DELL_API_ENDPOINT: endpoint } });
const sampleFile = join(devDir, "sample.eml");
writeFileSync(
  sampleFile,
  "From: sender@example.com\r\nTo: user@kuma8088.com\r\nMessage-ID: <dev-sample@example.com>\r\nSubject: Hello from the edge\r\n\r\nThrough workerd, the host and LMTP.\r\n",
);

const sample = "From: test@example.com\\r\\nTo: user@kuma8088.com\\r\\nSubject: Test Email\\r\\n\\r\\nThis is a test message.";
console.log(`
Worker (workerd) on ${worker.url}  ->  host on ${server.url}  (LMTP: ${config.lmtpHost}:${config.lmtpPort}${maildir ? `, fake LMTP writing ${maildir}` : ""})
dev key in ${shown(keyFile)}

a message through the Worker's email() (as Email Routing would hand it over):

  curl -sS -X POST "${worker.url}/cdn-cgi/handler/email?from=sender@example.com&to=user@kuma8088.com" \\
    --data-binary @${shown(sampleFile)}

straight to the host, in the runbook's JSON format:

  curl -sS -X POST ${endpoint} \\
    -H "Content-Type: application/json" \\
    -H "X-API-Key: $(cat ${shown(keyFile)})" \\
    -d '{"from":"test@example.com","to":"user@kuma8088.com","subject":"Test Email","raw":"${sample}","timestamp":"2025-11-12T10:00:00Z"}'
${maildir ? `\nthen: ls ${shown(join(maildir, "user@kuma8088.com", "new"))}\n` : ""}`);

// Ctrl-C, or a SIGTERM from a supervisor: stop workerd (its own process group) and the host.
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, async () => {
    await worker.stop();
    await server.stop();
    process.exit(0);
  });
}
