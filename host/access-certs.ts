// Cloudflare Access's signing keys (the JWKS at https://<team domain>/cdn-cgi/access/certs), kept
// for the JWT check (middleware/access-jwt.ts).
//   - Fetched at start and kept; refreshed in the background once they are an hour old. A refresh
//     that fails keeps the keys there are: Access signs with them for weeks (it rotates every 6
//     weeks and publishes the previous key for 7 more days), so an unreachable endpoint costs
//     nothing while a cached key fits.
//   - A token naming a key not in the set (a rotation) fetches the set again at once, but at most
//     one fetch per MIN_REFETCH_MS whatever the outcome: made-up key ids cannot turn into a flood
//     of requests to Cloudflare.
//   - No key that fits and the endpoint unreachable: CertsUnavailable (the caller answers 503).
// jose does the JOSE work: matching a key to the token's header and importing it.

import { createLocalJWKSet, errors, type JSONWebKeySet, type JWTHeaderParameters, type FlattenedJWSInput } from "jose";
import type { LogWriter } from "../shared/log.ts";
import { get } from "./http-get.ts";

/** No key that fits and the certs could not be fetched: a temporary condition, not the token's fault. */
export class CertsUnavailable extends Error {
  override name = "CertsUnavailable";
}

export interface AccessCertsOptions {
  /** Keys older than this are refreshed in the background (default 1 h). */
  maxAgeMs?: number;
  /** At most one fetch per this long (default 5 s). */
  minRefetchMs?: number;
  /** One fetch gives up after this long (default 5 s). */
  timeoutMs?: number;
  log?: LogWriter;
  now?: () => number;
}

type KeyResolver = ReturnType<typeof createLocalJWKSet>;

export class AccessCerts {
  private keys: KeyResolver | null = null;
  private fetchedAt = -Infinity;
  private lastAttempt = -Infinity;
  private lastError = "";
  private pending: Promise<void> | null = null;
  private readonly maxAgeMs: number;
  private readonly minRefetchMs: number;
  private readonly timeoutMs: number;
  private readonly now: () => number;

  constructor(
    readonly url: string,
    private readonly opts: AccessCertsOptions = {},
  ) {
    this.maxAgeMs = opts.maxAgeMs ?? 3_600_000;
    this.minRefetchMs = opts.minRefetchMs ?? 5_000;
    this.timeoutMs = opts.timeoutMs ?? 5_000;
    this.now = opts.now ?? Date.now;
  }

  /** The key for a token's header, for jose's jwtVerify. Throws CertsUnavailable, or jose's JWKSNoMatchingKey. */
  readonly key = async (header: JWTHeaderParameters, token: FlattenedJWSInput): Promise<CryptoKey> => {
    if (!this.keys) await this.refresh();
    else if (this.now() - this.fetchedAt > this.maxAgeMs) void this.refresh();
    if (!this.keys) throw new CertsUnavailable(`Access signing keys unavailable from ${this.url}: ${this.lastError}`);
    try {
      return (await this.keys(header, token)) as CryptoKey;
    } catch (e) {
      if (!(e instanceof errors.JWKSNoMatchingKey)) throw e;
      // A key published since the last fetch (a rotation), or a made-up kid.
      const before = this.fetchedAt;
      await this.refresh();
      if (this.fetchedAt === before && this.lastError) throw new CertsUnavailable(`no Access signing key "${String(header.kid)}" known, and ${this.url} cannot be fetched: ${this.lastError}`);
      return (await this.keys(header, token)) as CryptoKey;
    }
  };

  /** Fetches the set now unless a fetch ran within MIN_REFETCH_MS (then waits for that one, if still under way). */
  refresh(): Promise<void> {
    if (this.pending) return this.pending;
    if (this.now() - this.lastAttempt < this.minRefetchMs) return Promise.resolve();
    this.lastAttempt = this.now();
    this.pending = fetchCerts(this.url, this.timeoutMs)
      .then((jwks) => {
        this.keys = createLocalJWKSet(jwks);
        this.fetchedAt = this.now();
        this.lastError = "";
        this.opts.log?.({ event: "access_certs", url: this.url, keys: jwks.keys.map((k) => k.kid ?? "") });
      })
      .catch((e: Error) => {
        this.lastError = e.message;
        this.opts.log?.({ event: "access_certs_error", url: this.url, error: e.message, cached: this.keys !== null });
      })
      .finally(() => {
        this.pending = null;
      });
    return this.pending;
  }
}

async function fetchCerts(url: string, timeoutMs: number): Promise<JSONWebKeySet> {
  const a = await get(new URL(url), timeoutMs, { accept: "application/json" });
  if (typeof a === "string") throw new Error(a);
  if (a.status !== 200) throw new Error(`HTTP ${a.status}`);
  if (!a.json || !Array.isArray(a.json.keys)) throw new Error("the answer is not a JSON Web Key Set (no keys array)");
  return a.json as unknown as JSONWebKeySet;
}

/**
 * Whether the host's Access settings can fetch the signing keys now, for a check of the set-up
 * (the doctor): the key ids on success, the reason otherwise.
 */
export async function accessCertsReachable(certsUrl: string, timeoutMs = 5_000): Promise<{ ok: true; kids: string[] } | { ok: false; error: string }> {
  try {
    const jwks = await fetchCerts(certsUrl, timeoutMs);
    const kids = jwks.keys.filter((k) => k.kty === "RSA").map((k) => k.kid ?? "");
    return kids.length ? { ok: true, kids } : { ok: false, error: `${certsUrl} publishes no RSA key` };
  } catch (e) {
    return { ok: false, error: `${certsUrl}: ${(e as Error).message}` };
  }
}
