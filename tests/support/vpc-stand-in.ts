// A Worker that stands in for a Workers VPC service in local workerd (a vpc_services binding needs
// Cloudflare's network even under wrangler dev). Bound to the relay's Worker as a service binding
// named HOST, it does what the VPC service does: sends the request on to the one origin it was set
// up for (ORIGIN, here the test's host), whatever host name the URL carries, and with no Access in
// between (no Cf-Access-Jwt-Assertion on this path).

interface Env {
  ORIGIN: string;
}

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    const url = new URL(request.url);
    return fetch(`${env.ORIGIN}${url.pathname}${url.search}`, {
      method: request.method,
      headers: request.headers,
      body: request.body,
      // @ts-expect-error - Bun's RequestInit type lacks it; workerd needs no duplex for a stream body but accepts it
      duplex: "half",
    });
  },
};
