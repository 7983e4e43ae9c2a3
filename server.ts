// The host: configuration from the environment, Bun.serve on the app, delivery to Dovecot over
// LMTP with the durable spool behind it.
//   bun run server.ts                       serve
//   bun run server.ts healthcheck           exit 0 if GET /health answers (the container's check)
//   bun run server.ts queue list|flush|retry ID|purge-failed
//   bun run server.ts doctor [--json]        check the whole path (docs/doctor.md)
// Tests and `bun run dev` call startServer().

import { Resolver } from "node:dns/promises";
import { join } from "node:path";
import { AccessCerts } from "./host/access-certs.ts";
import { ServerEnv, deliveryTarget, type ServerConfig } from "./host/config.ts";
import { openDeliveredLog, type DeliveredLog } from "./host/delivered-log.ts";
import { AliasesFile, expandAliases } from "./host/aliases.ts";
import { deliverNow, deliverNowOrSpool, deliverSpooled, type HostDelivery, type SpoolQueue } from "./host/delivery.ts";
import { LastAnswer } from "./host/last-answer.ts";
import { Metrics } from "./host/metrics.ts";
import { accessJwt } from "./host/middleware/access-jwt.ts";
import { exceptOnMonitor, monitorFetch } from "./host/monitor-listener.ts";
import { RspamdClient } from "./host/spam-scan.ts";
import { QueueRunner, type QueueRunnerOptions } from "./host/queue-runner.ts";
import { Spool } from "./host/spool.ts";
import { statusApp } from "./host/status-http.ts";
import { LmtpPool, describeTarget, targetUrl, type LmtpPoolOptions } from "./lmtp.ts";
import { createApp, type Deliverer } from "./shared/app.ts";
import { ConfigError, fromEnv } from "./shared/config-env.ts";
import { jsonLines, stamped, type LogWriter } from "./shared/log.ts";

export interface RunningServer {
  url: string;
  port: number;
  /** MONITOR_PORT's listener, when there is one (host/monitor-listener.ts). */
  monitorPort: number | null;
  pool: LmtpPool;
  metrics: Metrics;
  runner: QueueRunner | null;
  /** ALIASES_FILE, when set: reload() reads it again (SIGHUP). */
  aliases: AliasesFile | null;
  /** Graceful: stop accepting, let requests under way finish (answered or spooled), QUIT LMTP. */
  stop(): Promise<void>;
}

export interface ServerOptions {
  log?: LogWriter;
  /** The spam filter's DNS (the sending server's name); the system's resolver by default. */
  resolver?: Resolver;
  lmtp?: LmtpPoolOptions;
  queue?: QueueRunnerOptions;
}

export function startServer(config: ServerConfig, opts: ServerOptions = {}): RunningServer {
  const log = opts.log ?? jsonLines;
  const event = stamped(log);
  // The runner below is made with these metrics; they read its stats only when rendered.
  const metrics = new Metrics(() => runner?.stats(), config.rspamd !== undefined);
  const target = deliveryTarget(config);
  const pool = new LmtpPool(target, { lhloName: "mail-relay", ...opts.lmtp });

  // As ServerEnv says: a message is scanned whole, and past 1 MiB only the spool's tmp/ holds it.
  if (config.rspamd && !config.spoolDir) throw new ConfigError("RSPAMD_URL needs SPOOL_DIR (a message is scanned whole before delivery; past 1 MiB it waits in the spool's tmp/)");
  let spool: Spool | null = null;
  if (config.spoolDir) {
    spool = new Spool(config.spoolDir);
    let discarded: string[];
    try {
      ({ discarded } = spool.prepare());
    } catch (e) {
      // Not a fault to retry: without a usable spool the host must not start and acknowledge mail.
      throw new ConfigError(`SPOOL_DIR=${config.spoolDir} cannot be used as the spool: ${(e as Error).message}`);
    }
    // Half-written files were never acknowledged (the sender retries); say so, don't hide it.
    for (const name of discarded) event({ event: "spool_incomplete_discarded", file: name });
    metrics.inc("spool_incomplete_discarded", discarded.length);
  }
  const deliveredPath = config.spoolDir ? join(config.spoolDir, "delivered.sqlite") : null;
  let delivered: DeliveredLog;
  try {
    // Best effort once open (a lost record costs a duplicate, never a message): a full disk is
    // logged and counted, and delivery goes on.
    delivered = openDeliveredLog(deliveredPath, {
      onError: (e, during) => {
        metrics.inc("delivered_log_errors");
        event({ event: "delivered_log_error", during, error: e.message });
      },
    });
  } catch (e) {
    // A full or read-only disk, or something else in its place: the same as an unusable spool.
    throw new ConfigError(`SPOOL_DIR=${config.spoolDir} cannot be used: its ${deliveredPath} cannot be opened: ${(e as Error).message}`);
  }
  let aliases: AliasesFile | null = null;
  if (config.aliasesFile) {
    try {
      aliases = AliasesFile.open(config.aliasesFile, event);
    } catch (e) {
      throw new ConfigError(`ALIASES_FILE=${config.aliasesFile} ${(e as Error).message}`);
    }
  }
  const spam = config.rspamd
    ? {
        rspamd: new RspamdClient(config.rspamd.url, config.rspamd.timeoutMs),
        resolver: opts.resolver ?? new Resolver(),
        // The name is a hint for rspamd: a slow DNS must not eat the scan's own time.
        nameTimeoutMs: Math.min(2_000, config.rspamd.timeoutMs / 4),
        metrics,
        log: event,
      }
    : undefined;
  const lastAnswer = new LastAnswer();
  const host: HostDelivery = { pool, delivered, metrics, log: event, exactlyOnce: config.exactlyOnce ?? false, spam, lastAnswer };
  const queue: SpoolQueue | null = spool ? { spool, runner: new QueueRunner(spool, deliverSpooled(host, spool), { maxAgeMs: config.spoolMaxAgeMs, metrics, log, ...opts.queue }) } : null;
  const runner = queue?.runner ?? null;
  runner?.start().catch((e) => event({ event: "spool_error", error: `queue runner did not start: ${(e as Error).message}` }));

  // Access's keys are fetched now, so that the first message finds them there (and a wrong URL
  // shows in the log at once).
  const certs = config.access ? new AccessCerts(config.access.certsUrl, { log: event }) : null;
  void certs?.refresh();

  const app = createApp({
    door: config.access && certs ? exceptOnMonitor(accessJwt(config.access, certs)) : undefined,
    apiKeys: config.apiKeys,
    maxMessageBytes: config.maxMessageBytes,
    bodyIdleMs: config.bodyIdleMs ?? 10_000,
    deliver: withAliases(aliases, queue ? deliverNowOrSpool(host, queue) : deliverNow(host)),
    // Neither says anything about the spool before what is on disk has been read.
    // `target` names the protocol too (smtp://, lmtp://, lmtp:/socket); `lmtp` is its older form, kept for the clients that read it.
    ready: async () => ({ target: targetUrl(target), lmtp: describeTarget(target), capabilities: await pool.check(), spooled: runner ? (await runner.scanned(), runner.size) : null }),
    metrics: async () => (await runner?.scanned(), metrics.render()),
    log,
    onAnswer: (outcome) => metrics.countAnswer(outcome),
  });
  app.route("/", statusApp({ apiKeys: config.apiKeys, metrics, lastAnswer, target: targetUrl(target), spool, edgeUrl: config.edgeUrl }));
  const server = Bun.serve({
    hostname: config.host,
    port: config.port,
    // Nothing of Bun's own reaches the app as its env (the monitoring listener's marks its requests).
    fetch: (request) => app.fetch(request),
    // No limit of Bun's own: its 413 has no body and cuts the connection. The app refuses every
    // body that is too large itself (by Content-Length first, then counting as it streams), with
    // a 413 that names the limit.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    // A delivery may wait on Dovecot's fsync with no bytes moving; don't cut it off at Bun's 10 s.
    idleTimeout: 60,
  });
  const url = httpUrl(server.hostname ?? config.host, server.port!);
  let monitor: ReturnType<typeof Bun.serve> | null = null;
  try {
    monitor = config.monitorPort ? Bun.serve({ hostname: config.host, port: config.monitorPort, fetch: monitorFetch(app), idleTimeout: 60 }) : null;
  } catch (e) {
    server.stop(true);
    throw new ConfigError(`HOST=${config.host} MONITOR_PORT=${config.monitorPort} cannot be listened on: ${(e as Error).message}`);
  }
  event({ event: "listening", url, lmtp: describeTarget(target), spool: config.spoolDir ?? null, max_message_bytes: config.maxMessageBytes, keys: config.apiKeys.length, access: config.access?.issuer ?? null, ...(monitor ? { monitor: httpUrl(config.host, monitor.port!) } : {}), ...(config.rspamd ? { rspamd: config.rspamd.url } : {}) });

  let stopping: Promise<void> | null = null;
  return {
    url,
    port: server.port!,
    monitorPort: monitor?.port ?? null,
    pool,
    metrics,
    runner,
    aliases,
    stop() {
      stopping ??= (async () => {
        aliases?.close();
        // Stop listening; requests under way run to their answer (LMTP's timeouts bound them).
        await Promise.all([server.stop(false), monitor?.stop(false)]);
        await runner?.stop();
        await pool.close();
        delivered.close();
      })();
      return stopping;
    },
  };
}

/** A listener's URL; an IPv6 address in brackets. */
function httpUrl(hostname: string, port: number): string {
  return `http://${hostname.includes(":") ? `[${hostname}]` : hostname}:${port}`;
}

/** The alias step before delivery (ALIASES_FILE), when there is a file. */
function withAliases(aliases: AliasesFile | null, deliver: Deliverer): Deliverer {
  return aliases ? expandAliases(aliases, deliver) : deliver;
}

// ---------------------------------------------------------------------------------------------

/** The one line for a start-up failure caused by the configuration or the machine; null for a bug. */
function startupProblem(e: unknown, config: ServerConfig): string | null {
  if (e instanceof ConfigError) return e.message;
  const code = (e as NodeJS.ErrnoException).code;
  if (code === "EADDRINUSE" || code === "EADDRNOTAVAIL" || code === "EACCES") {
    return `HOST=${config.host} PORT=${config.port} cannot be listened on: ${(e as Error).message}`;
  }
  return null;
}

/** A command's exit code, or "serving": the server runs on until a signal stops it. */
async function main(argv: string[]): Promise<number | "serving"> {
  if (argv[0] === "healthcheck") {
    const port = process.env.PORT || "8080";
    try {
      const res = await fetch(`http://127.0.0.1:${port}/health`, { signal: AbortSignal.timeout(3_000) });
      return res.ok ? 0 : 1;
    } catch {
      return 1;
    }
  }
  if (argv[0] === "queue") {
    const { queueCommand } = await import("./host/queue-cli.ts");
    return queueCommand(process.env.SPOOL_DIR, argv.slice(1));
  }
  if (argv[0] === "doctor") {
    const { doctorCommand } = await import("./host/doctor/cli.ts");
    return doctorCommand(argv.slice(1), process.env);
  }
  if (argv.length) {
    console.error(`unknown command: ${argv.join(" ")} (commands: healthcheck, queue list|flush|retry ID|purge-failed, doctor [--json])`);
    return 2;
  }
  let config: ServerConfig;
  try {
    config = fromEnv(ServerEnv, process.env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    console.error(e.message);
    return 2;
  }

  let running: RunningServer;
  try {
    running = startServer(config);
  } catch (e) {
    const line = startupProblem(e, config);
    if (!line) throw e;
    console.error(line);
    return 2;
  }
  const event = stamped(jsonLines);
  const shutdown = async (signal: string) => {
    event({ event: "shutdown", signal });
    // Bounded: whatever has not answered by then was never acknowledged, and its sender retries.
    const limit = setTimeout(() => {
      event({ event: "shutdown_forced" });
      process.exit(1);
    }, 25_000);
    await running.stop();
    clearTimeout(limit);
    event({ event: "stopped" });
    process.exit(0);
  };
  // Only with a file to reload: otherwise SIGHUP keeps its default (the process ends), as before.
  const aliases = running.aliases;
  if (aliases) process.on("SIGHUP", () => void aliases.reload());
  process.once("SIGTERM", () => void shutdown("SIGTERM"));
  process.once("SIGINT", () => void shutdown("SIGINT"));
  return "serving";
}

if (import.meta.main) {
  const result = await main(process.argv.slice(2));
  if (result !== "serving") process.exit(result);
}
