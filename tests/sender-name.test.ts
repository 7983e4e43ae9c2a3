// The sending server's name (host/sender-name.ts): a PTR name counts only when its own A or AAAA
// records hold the address again; anything else, a DNS failure or a resolver that does not answer
// in time, is no name. A stand-in resolver answers from a table; the real one (dnsmasq) is in
// tests/integration/spam-filter.test.ts.

import { describe, expect, test } from "bun:test";
import type { Resolver } from "node:dns/promises";
import { confirmedName } from "../host/sender-name.ts";

type Table = { ptr?: Record<string, string[]>; a?: Record<string, string[]>; aaaa?: Record<string, string[]>; stall?: boolean };

function resolver(t: Table): Resolver {
  const answer = async (map: Record<string, string[]> | undefined, key: string) => {
    if (t.stall) await new Promise(() => {});
    const found = map?.[key];
    if (!found) throw Object.assign(new Error(`queryA ENOTFOUND ${key}`), { code: "ENOTFOUND" });
    return found;
  };
  return { reverse: (ip: string) => answer(t.ptr, ip), resolve4: (n: string) => answer(t.a, n), resolve6: (n: string) => answer(t.aaaa, n) } as unknown as Resolver;
}

describe("confirmedName", () => {
  test("a PTR name whose A record holds the address: that name, lowercased, without a final dot", async () => {
    expect(await confirmedName(resolver({ ptr: { "203.0.113.5": ["Mail.Example.org."] }, a: { "Mail.Example.org.": ["198.51.100.1", "203.0.113.5"] } }), "203.0.113.5", 1_000)).toBe("mail.example.org");
  });

  test("IPv6, compared as addresses, not as strings", async () => {
    expect(await confirmedName(resolver({ ptr: { "2001:db8::1": ["v6.example.org"] }, aaaa: { "v6.example.org": ["2001:0db8:0000:0000:0000:0000:0000:0001"] } }), "2001:db8::1", 1_000)).toBe("v6.example.org");
  });

  test("the second PTR name when the first does not point back", async () => {
    expect(await confirmedName(resolver({ ptr: { "203.0.113.5": ["liar.example", "ok.example"] }, a: { "liar.example": ["192.0.2.9"], "ok.example": ["203.0.113.5"] } }), "203.0.113.5", 1_000)).toBe("ok.example");
  });

  test("no name: no PTR, a PTR that does not point back, a name that is not a host name, a resolver that stalls", async () => {
    expect(await confirmedName(resolver({}), "203.0.113.5", 1_000)).toBeNull();
    expect(await confirmedName(resolver({ ptr: { "203.0.113.5": ["forged.example.org"] }, a: { "forged.example.org": ["192.0.2.1"] } }), "203.0.113.5", 1_000)).toBeNull();
    expect(await confirmedName(resolver({ ptr: { "203.0.113.5": ["bad name\r\nX: y"] }, a: { "bad name\r\nX: y": ["203.0.113.5"] } }), "203.0.113.5", 1_000)).toBeNull();
    expect(await confirmedName(resolver({ stall: true }), "203.0.113.5", 100)).toBeNull();
  });
});
