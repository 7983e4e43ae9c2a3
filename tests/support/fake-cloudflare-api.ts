// A stand-in for Cloudflare's API (https://api.cloudflare.com/client/v4), enough for wrangler 4.86's
// `wrangler deploy` of a new Worker to run to its end: wrangler talks to it when
// CLOUDFLARE_API_BASE_URL points here. It records every request, so a test sees what a real
// deploy would upload (the script's metadata: its bindings, secrets, observability; the cron
// schedules) without a Cloudflare account.

export interface ApiRequest {
  method: string;
  path: string;
  authorization: string | null;
  body: string;
}

export interface FakeCloudflareApi {
  /** For CLOUDFLARE_API_BASE_URL. */
  baseUrl: string;
  requests: ApiRequest[];
  /** The metadata part of each script upload (PUT .../workers/scripts/NAME), parsed. */
  uploads(): { bindings: { name: string; type: string; text?: string; bucket_name?: string }[]; observability?: unknown }[];
  stop(): Promise<void>;
}

const ok = (result: unknown) => Response.json({ success: true, errors: [], messages: [], result });

export function startFakeCloudflareApi(): FakeCloudflareApi {
  const requests: ApiRequest[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const path = new URL(req.url).pathname.replace(/^\/client\/v4/, "");
      requests.push({ method: req.method, path, authorization: req.headers.get("authorization"), body: await req.text() });
      // A Worker that does not exist yet: its first deploy.
      if (path.includes("/workers/services/")) {
        return Response.json({ success: false, errors: [{ code: 10090, message: "workers.api.error.service_not_found" }], messages: [], result: null }, { status: 404 });
      }
      if (path.endsWith("/workers/subdomain")) return ok({ subdomain: "relay-test" });
      if (path.endsWith("/deployments")) return ok({ deployments: [] });
      if (path.endsWith("/settings") && req.method === "GET") return ok({ bindings: [], logpush: false, tail_consumers: [] });
      if (path.endsWith("/subdomain")) return ok({ enabled: true, previews_enabled: true });
      if (path.endsWith("/schedules")) return ok({ schedules: [] });
      if (req.method === "PUT" && /\/workers\/scripts\/[^/]+$/.test(path)) return ok({ id: path.split("/").pop(), etag: "test", startup_time_ms: 1 });
      return ok({});
    },
  });
  return {
    baseUrl: `http://127.0.0.1:${server.port}/client/v4`,
    requests,
    uploads: () =>
      requests
        .filter((r) => r.method === "PUT" && /\/workers\/scripts\/[^/]+$/.test(r.path))
        .map((r) => JSON.parse(/name="metadata"\r\n(?:[^\r\n]+\r\n)*\r\n(.*)\r\n/.exec(r.body)![1]!)),
    stop: () => server.stop(true),
  };
}
