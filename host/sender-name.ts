// The sending server's name, as Postfix gives it to a milter: a name its address's PTR record
// gives, confirmed by that name's own A or AAAA records holding the address again (forward-
// confirmed reverse DNS). Cloudflare's Received names only the address and the HELO; without a
// name rspamd counts the client as unknown (HFILTER_HOSTNAME_UNKNOWN, 2.5 points on every message).
// No name, no answer within the time limit, or any DNS failure: null, and the scan goes on without.

import type { Resolver } from "node:dns/promises";
import { isIPv6 } from "node:net";

/** PTR names looked at, at most (a PTR set is usually one name). */
const MAX_NAMES = 3;

export async function confirmedName(resolver: Resolver, ip: string, timeoutMs: number): Promise<string | null> {
  let timer: Timer | undefined;
  const limit = new Promise<null>((resolve) => {
    timer = setTimeout(() => resolve(null), timeoutMs);
  });
  try {
    return await Promise.race([lookUp(resolver, ip), limit]);
  } finally {
    clearTimeout(timer);
  }
}

async function lookUp(resolver: Resolver, ip: string): Promise<string | null> {
  const names = await resolver.reverse(ip).catch(() => [] as string[]);
  const same = (a: string) => (isIPv6(ip) ? sameIPv6(a, ip) : a === ip);
  for (const name of names.slice(0, MAX_NAMES)) {
    if (!/^[a-z0-9-]+(\.[a-z0-9-]+)*\.?$/i.test(name) || name.length > 253) continue;
    const addresses = await (isIPv6(ip) ? resolver.resolve6(name) : resolver.resolve4(name)).catch(() => [] as string[]);
    if (addresses.some(same)) return name.replace(/\.$/, "").toLowerCase();
  }
  return null;
}

/** Two spellings of one IPv6 address ("2001:db8::1" and "2001:0db8:0:0::1"). */
function sameIPv6(a: string, b: string): boolean {
  return expand(a) === expand(b);
}

function expand(ip: string): string {
  const [head, tail] = ip.toLowerCase().split("::") as [string, string | undefined];
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const fill = tail === undefined ? [] : Array(8 - left.length - right.length).fill("0");
  return [...left, ...fill, ...right].map((g) => g.padStart(4, "0")).join(":");
}
