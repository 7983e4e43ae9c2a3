// Cloudflare Access, played locally for the tests: RSA signing keys made here (WebCrypto), tokens
// minted by hand (so that forged ones can be made too: alg none, HS256 keyed with the public key,
// a signature by another key under a published kid), and a JWKS server whose published keys and
// availability a test changes as it goes.

import type { Server } from "bun";

export interface SigningKey {
  kid: string;
  privateKey: CryptoKey;
  /** The public half as Access publishes it (kty, kid, alg, use, n, e). */
  jwk: JsonWebKey & { kid: string };
}

const RS256 = { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048, publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" } as const;

export async function signingKey(kid = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex")): Promise<SigningKey> {
  const pair = (await crypto.subtle.generateKey(RS256, true, ["sign", "verify"])) as CryptoKeyPair;
  const pub = (await crypto.subtle.exportKey("jwk", pair.publicKey)) as JsonWebKey;
  return { kid, privateKey: pair.privateKey, jwk: { kty: "RSA", kid, alg: "RS256", use: "sig", n: pub.n, e: pub.e } };
}

const b64url = (bytes: Uint8Array | string) => Buffer.from(bytes).toString("base64url");

/** header.payload, base64url each, as a JWS signs it. */
function signingInput(header: Record<string, unknown>, payload: Record<string, unknown>): string {
  return `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
}

/** A token signed RS256 by `key`, under `kid` (the key's own unless told). */
export async function mint(key: SigningKey, payload: Record<string, unknown>, kid = key.kid): Promise<string> {
  const input = signingInput({ alg: "RS256", kid, typ: "JWT" }, payload);
  const sig = new Uint8Array(await crypto.subtle.sign("RSASSA-PKCS1-v1_5", key.privateKey, new TextEncoder().encode(input)));
  return `${input}.${b64url(sig)}`;
}

/** alg "none": no signature at all. */
export function unsigned(payload: Record<string, unknown>, kid: string): string {
  return `${signingInput({ alg: "none", kid, typ: "JWT" }, payload)}.`;
}

/** HS256 with the published public key (its JWK text) as the HMAC secret: the classic key-confusion forgery. */
export async function hs256WithPublicKey(key: SigningKey, payload: Record<string, unknown>): Promise<string> {
  const input = signingInput({ alg: "HS256", kid: key.kid, typ: "JWT" }, payload);
  const secret = await crypto.subtle.importKey("raw", new TextEncoder().encode(JSON.stringify(key.jwk)), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", secret, new TextEncoder().encode(input)));
  return `${input}.${b64url(sig)}`;
}

/** The claims of a service-token JWT as Access writes them, valid for an hour from now. */
export function claims(team: string, aud: string | string[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  const now = Math.floor(Date.now() / 1000);
  return { aud: Array.isArray(aud) ? aud : [aud], iss: `https://${team}`, iat: now, nbf: now, exp: now + 3600, type: "app", common_name: "0123abcd.access", sub: "", ...extra };
}

export interface JwksServer {
  url: string;
  /** The keys published now (change freely). */
  keys: SigningKey[];
  /** When true, the endpoint answers 503 (Access's edge unreachable, as far as the host can tell). */
  down: boolean;
  /** How many times the key set was asked for. */
  fetches: number;
  stop(): Promise<void>;
}

export function startJwksServer(keys: SigningKey[]): JwksServer {
  const state: JwksServer = {
    url: "",
    keys,
    down: false,
    fetches: 0,
    stop: async () => void (await server.stop(true)),
  };
  const server: Server<undefined> = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch(req) {
      if (new URL(req.url).pathname !== "/cdn-cgi/access/certs") return new Response("not found", { status: 404 });
      state.fetches++;
      if (state.down) return new Response("unavailable", { status: 503 });
      // Access's shape: the JWKs, and the same keys as PEM (not used here).
      return Response.json({ keys: state.keys.map((k) => k.jwk), public_cert: {}, public_certs: [] });
    },
  });
  state.url = `http://127.0.0.1:${server.port}/cdn-cgi/access/certs`;
  return state;
}

/** How the played Access application turns a request away. */
export type AccessRefusal =
  /** Its default: a redirect to the team's login page. */
  | "login"
  /** The application's "401 Response for Service Auth policies". */
  | "401"
  /** Its block page. */
  | "403";

export interface AccessApp {
  url: string;
  /** The service tokens its Service Auth policy includes (change freely). */
  tokens: { id: string; secret: string }[];
  refusal: AccessRefusal;
  /** The aud of the JWT it adds (its own AUD tag unless a test plays a mix-up). */
  aud: string;
  /** Every request it saw: the service token's two headers as they came. */
  saw: { path: string; id: string | null; secret: string | null }[];
  stop(): Promise<void>;
}

/**
 * Cloudflare Access on a hostname, played in front of `origin`: a request with one of `tokens`
 * goes through with a JWT signed by `key` (iss https://<team>, aud `aud`) in place of the token's
 * headers; any other is turned away as `refusal` says.
 */
export function startAccessApp(origin: string, key: SigningKey, team: string, aud: string, tokens: { id: string; secret: string }[]): AccessApp {
  const state: AccessApp = { url: "", tokens, refusal: "login", aud, saw: [], stop: async () => void (await server.stop(true)) };
  const server: Server<undefined> = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      const id = req.headers.get("cf-access-client-id");
      const secret = req.headers.get("cf-access-client-secret");
      state.saw.push({ path: url.pathname, id, secret });
      if (!state.tokens.some((t) => t.id === id && t.secret === secret)) {
        if (state.refusal === "401") return new Response("Unauthorized", { status: 401 });
        if (state.refusal === "403") return new Response("<html><body>Forbidden. You don't have permission to view this.</body></html>", { status: 403, headers: { "content-type": "text/html" } });
        const login = `https://${team}/cdn-cgi/access/login/${url.host}?kid=0123&redirect_url=${encodeURIComponent(url.pathname)}&meta=eyJ0eXAi`;
        return new Response(null, { status: 302, headers: { location: login } });
      }
      const headers = new Headers(req.headers);
      headers.delete("cf-access-client-id");
      headers.delete("cf-access-client-secret");
      headers.set("cf-access-jwt-assertion", await mint(key, claims(team, state.aud, { common_name: id })));
      const body = new Uint8Array(await req.arrayBuffer());
      const res = await fetch(`${origin}${url.pathname}${url.search}`, { method: req.method, headers, body: body.length ? body : undefined, redirect: "manual" });
      return new Response(await res.arrayBuffer(), { status: res.status, headers: res.headers });
    },
  });
  state.url = `http://127.0.0.1:${server.port}`;
  return state;
}
