// One JSON line per request, written when the answer is known. Routes add their own fields
// (envelope, size, LMTP replies) with logFields(c, {...}); bodies and keys are never logged.

import type { Context, MiddlewareHandler } from "hono";
import type { RequestIdVariables } from "hono/request-id";
import { stamped, type LogLine, type LogWriter } from "../log.ts";

export type AccessLogEnv = { Variables: RequestIdVariables & { logFields?: LogLine } };

export function logFields(c: Context<AccessLogEnv>, fields: LogLine): void {
  c.set("logFields", { ...c.get("logFields"), ...fields });
}

export function accessLog(write: LogWriter): MiddlewareHandler<AccessLogEnv> {
  const line = stamped(write);
  return async (c, next) => {
    const started = performance.now();
    await next();
    line({
      request_id: c.get("requestId"),
      method: c.req.method,
      path: c.req.path,
      status: c.res.status,
      ms: Math.round((performance.now() - started) * 10) / 10,
      ...c.get("logFields"),
    });
  };
}
