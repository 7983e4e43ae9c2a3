// The host asking the Worker what its edge spool holds (GET /edge/queue with the key), for
// /status and the doctor. The host may hold several keys (API_KEYS, during a rotation); the
// Worker has one: each is tried in turn, and the answer says which one the Worker took, by the
// setting's name only.

import { EdgeListing } from "../shared/edge-listing.ts";
import { get } from "./http-get.ts";


export type EdgeQueueAnswer =
  | { kind: "listing"; listing: EdgeListing; keyName: string }
  /** Every key was answered 401: the Worker's API_KEY is none of the host's. */
  | { kind: "refused" }
  /** The Worker has no R2 bucket bound as EDGE_SPOOL: it holds nothing. */
  | { kind: "no_spool" }
  | { kind: "error"; message: string };

/**
 * GET /edge/queue with each key until one is taken. `keys`: [setting name, key]. `headers` go with
 * each request (the doctor's Access service token, for a Worker behind Access).
 */
export async function fetchEdgeQueue(edgeUrl: string, keys: [string, string][], timeoutMs = 5_000, headers: Record<string, string> = {}): Promise<EdgeQueueAnswer> {
  const url = new URL("/edge/queue", edgeUrl);
  for (const [keyName, key] of keys) {
    const a = await get(url, timeoutMs, { ...headers, "x-api-key": key });
    if (typeof a === "string") return { kind: "error", message: `${url.origin} cannot be reached: ${a}` };
    if (a.status === 401) continue;
    if (a.status === 404 && a.json?.error === "no_edge_spool") return { kind: "no_spool" };
    if (a.status >= 300 && a.status < 400) return { kind: "error", message: `GET /edge/queue answered ${a.status}, a redirect to ${a.location ?? "nowhere"}` };
    const listing = EdgeListing.safeParse(a.json);
    if (a.status < 200 || a.status > 299 || !listing.success) return { kind: "error", message: `GET /edge/queue answered ${a.status}${listing.success ? "" : ", not the edge spool's listing"}` };
    return { kind: "listing", listing: listing.data, keyName };
  }
  return { kind: "refused" };
}
