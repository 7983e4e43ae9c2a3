// The host: configuration from the environment, Bun.serve on the app, delivery to Dovecot over
// LMTP. `bun run server.ts` starts it; tests and `bun run dev` call startServer().

import { TemporaryFailure, createApp, maxJsonBytes, type Deliverer } from "./app.ts";
import { ConfigError, ServerEnv, fromEnv, type ServerConfig } from "./config.ts";
import type { RecipientResult } from "./contract.ts";
import { BodyAborted, LmtpFault, LmtpPool, describeTarget, formatReply, lmtpTarget, type LmtpPoolOptions } from "./lmtp.ts";
import { jsonLines, type LogWriter } from "./middleware/access-log.ts";

/** The host's Deliverer: one LMTP transaction per message through the pool. */
export function deliverViaLmtp(pool: LmtpPool): Deliverer {
  return async ({ envelope, body, size }) => {
    try {
      const replies = await pool.deliver(envelope, body, size);
      return replies.map(
        (r): RecipientResult => ({ address: r.recipient, code: r.code, enhanced: r.enhanced, reply: formatReply(r) }),
      );
    } catch (e) {
      // The connection failed: whatever the phase, nothing is confirmed delivered. Temporary.
      if (e instanceof LmtpFault || e instanceof BodyAborted) throw new TemporaryFailure(e.message, { cause: e });
      throw e;
    }
  };
}

export interface RunningServer {
  url: string;
  port: number;
  pool: LmtpPool;
  stop(): Promise<void>;
}

export interface ServerOptions {
  log?: LogWriter;
  lmtp?: LmtpPoolOptions;
}

export function startServer(config: ServerConfig, opts: ServerOptions = {}): RunningServer {
  const log = opts.log ?? jsonLines;
  const target = lmtpTarget(config.lmtpHost, config.lmtpPort);
  const pool = new LmtpPool(target, { lhloName: "mail-relay", ...opts.lmtp });
  const app = createApp({
    apiKeys: config.apiKeys,
    maxMessageBytes: config.maxMessageBytes,
    deliver: deliverViaLmtp(pool),
    ready: async () => ({ lmtp: describeTarget(target), capabilities: await pool.check() }),
    log,
  });
  const server = Bun.serve({
    hostname: config.host,
    port: config.port,
    fetch: app.fetch,
    // Bun refuses larger bodies itself; the app's own limit (a clear 413) sits below this.
    maxRequestBodySize: maxJsonBytes(config.maxMessageBytes),
    // A delivery may wait on Dovecot's fsync with no bytes moving; don't cut it off at Bun's 10 s.
    idleTimeout: 60,
  });
  const url = `http://${server.hostname?.includes(":") ? `[${server.hostname}]` : server.hostname}:${server.port}`;
  log({ time: new Date().toISOString(), event: "listening", url, lmtp: describeTarget(target), max_message_bytes: config.maxMessageBytes, keys: config.apiKeys.length });
  return {
    url,
    port: server.port!,
    pool,
    async stop() {
      await server.stop();
      await pool.close();
    },
  };
}

if (import.meta.main) {
  let config: ServerConfig;
  try {
    config = fromEnv(ServerEnv, process.env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    console.error(e.message);
    process.exit(2);
  }
  const running = startServer(config);
  const shutdown = async (signal: string) => {
    jsonLines({ time: new Date().toISOString(), event: "shutdown", signal });
    await running.stop();
    process.exit(0);
  };
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  process.on("SIGINT", () => void shutdown("SIGINT"));
}
