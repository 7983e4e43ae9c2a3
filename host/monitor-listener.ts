// MONITOR_PORT: a second listener for what watches the host from its own network (Prometheus, a
// health check, the operator's browser on the LAN). It serves GET /health, /ready, /metrics and
// /status, each as on PORT and behind the same key, and nothing else: never the inbound route.
// The tunnel reaches PORT only, and there, with Cloudflare Access on, every route but /health
// needs Access's JWT, which only a request through Cloudflare carries: Prometheus on the Docker
// network could not scrape /metrics at all. Here the Access check does not apply (no request
// through the tunnel arrives here); the key still does.

import type { MiddlewareHandler } from "hono";

/** What the monitoring listener serves (GET or HEAD). */
export const MONITOR_PATHS: ReadonlySet<string> = new Set(["/health", "/ready", "/metrics", "/status"]);

/** What the app sees as its env on a request that came in on the monitoring listener. */
const ON_MONITOR = { monitor: true } as const;

/** The monitoring listener's fetch: the monitoring routes of the one app, the rest 404. */
export function monitorFetch(app: { fetch(request: Request, env?: unknown): Response | Promise<Response> }) {
  return (request: Request): Response | Promise<Response> => {
    const path = new URL(request.url).pathname;
    if ((request.method === "GET" || request.method === "HEAD") && MONITOR_PATHS.has(path)) return app.fetch(request, ON_MONITOR);
    const message = `${request.method} ${path} is not served on MONITOR_PORT, which serves only GET ${[...MONITOR_PATHS].join(", ")}; mail goes to PORT`;
    return Response.json({ status: "error", error: "not_found", message }, { status: 404 });
  };
}

/** The door (the Access check) on every listener but the monitoring one. */
export function exceptOnMonitor(door: MiddlewareHandler): MiddlewareHandler {
  return (c, next) => ((c.env as { monitor?: unknown } | undefined)?.monitor === true ? next() : door(c, next));
}
