// The host's own check of Cloudflare Access (docs/access.md): a request must carry the JWT that
// Access adds after it let the Worker's service token through, in Cf-Access-Jwt-Assertion (the
// bare token, not "Bearer ..."). cloudflared checks it too (originRequest.access); the host checks
// again, so that nothing reaching the port another way (a second tunnel, a hostname without the
// Access application, a local process) passes on the API key alone.
//   RS256 only; a key Access publishes (access-certs.ts); iss is https://<team domain>; aud holds
//   one of ACCESS_AUD; exp and nbf with CLOCK_SKEW_S of tolerance.
// Answers (the Worker treats all three as temporary: a mix-up never bounces mail):
//   401 access_token_missing, 403 access_token_invalid with jose's reason, 503 access_certs_unavailable.

import type { MiddlewareHandler } from "hono";
import { errors, jwtVerify } from "jose";
import type { AccessSettings } from "../config.ts";
import { logFields } from "../../shared/middleware/access-log.ts";
import { CertsUnavailable, type AccessCerts } from "../access-certs.ts";

export const ACCESS_JWT_HEADER = "cf-access-jwt-assertion";
/** Clocks a little apart (the host's and Cloudflare's) must not refuse a fresh token. */
export const CLOCK_SKEW_S = 60;
const RETRY_AFTER_S = "30";

export function accessJwt(settings: AccessSettings, certs: AccessCerts): MiddlewareHandler {
  return async (c, next) => {
    const refuse = (status: 401 | 403 | 503, error: string, message: string) => {
      logFields(c, { error, access: message });
      if (status === 503) c.header("Retry-After", RETRY_AFTER_S);
      return c.json({ status: status === 503 ? "deferred" : "error", error, message, request_id: c.get("requestId" as never) as string | undefined }, status);
    };
    const token = c.req.header(ACCESS_JWT_HEADER)?.trim();
    if (!token) return refuse(401, "access_token_missing", "no Cloudflare Access token (Cf-Access-Jwt-Assertion): the request did not come through the Access application");
    try {
      await jwtVerify(token, certs.key, {
        algorithms: ["RS256"],
        issuer: settings.issuer,
        audience: settings.audiences,
        clockTolerance: CLOCK_SKEW_S,
        requiredClaims: ["exp"],
      });
    } catch (e) {
      if (e instanceof CertsUnavailable) return refuse(503, "access_certs_unavailable", `${e.message}; nothing was delivered, try again`);
      if (e instanceof errors.JOSEError) return refuse(403, "access_token_invalid", `Cloudflare Access token refused: ${reason(e)}`);
      throw e;
    }
    await next();
  };
}

/** Why, in the operator's words; never the token or its claims' values. */
function reason(e: InstanceType<typeof errors.JOSEError>): string {
  if (e instanceof errors.JWTExpired) return 'expired ("exp" has passed)';
  if (e instanceof errors.JWTClaimValidationFailed) {
    if (e.claim === "nbf") return 'not yet valid ("nbf" is in the future)';
    if (e.claim === "aud") return 'for another application (its "aud" holds none of ACCESS_AUD)';
    if (e.claim === "iss") return 'issued by another team (its "iss" is not https://<ACCESS_TEAM_DOMAIN>)';
  }
  if (e instanceof errors.JWKSNoMatchingKey) return "signed by no key that Access publishes (unknown kid)";
  if (e instanceof errors.JWSSignatureVerificationFailed) return "the signature does not verify";
  if (e instanceof errors.JOSEAlgNotAllowed) return 'not signed with RS256 (its "alg" is not allowed)';
  return e.message;
}
