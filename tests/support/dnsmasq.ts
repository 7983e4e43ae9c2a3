// A private DNS server for tests (Debian's dnsmasq-base): answers MX and TXT records given on its
// command line for names under the test's own domain (a comma in a TXT text splits it into
// strings), NXDOMAIN for other names there, and refuses
// everything else (no upstream: nothing leaves this machine).

import { Resolver } from "node:dns/promises";
import type { Subprocess } from "bun";
import { freePort } from "../../scripts/free-port.ts";
import { until } from "./wait.ts";

export interface DnsRecords {
  mx?: [name: string, host: string, priority: number][];
  txt?: [name: string, text: string][];
}

export interface LocalDns {
  /** "127.0.0.1:PORT", as DNS_SERVER takes it. */
  server: string;
  stop(): Promise<void>;
}

const INSTALL_HINT = "apt-get install -y dnsmasq-base (scripts/setup.sh does)";

/** Serves `records` for every name under `zone`. Throws when dnsmasq is missing: a failure, never a skip. */
export async function startDnsmasq(zone: string, records: DnsRecords): Promise<LocalDns> {
  const bin = Bun.which("dnsmasq") ?? Bun.which("dnsmasq", { PATH: "/usr/sbin:/sbin" });
  if (!bin) throw new Error(`dnsmasq is not installed: ${INSTALL_HINT}`);
  const port = await freePort();
  const args = [
    "--keep-in-foreground",
    "--no-resolv",
    "--no-hosts",
    "--no-poll",
    `--port=${port}`,
    "--listen-address=127.0.0.1",
    "--bind-interfaces",
    `--local=/${zone}/`,
    "--pid-file=",
    "--user=",
    ...(records.mx ?? []).map(([name, host, prio]) => `--mx-host=${name},${host},${prio}`),
    // A comma splits the text into the record's strings (RFC 7208 3.3: read as one text).
    ...(records.txt ?? []).map(([name, text]) => `--txt-record=${name},${text}`),
  ];
  const proc: Subprocess = Bun.spawn([bin, ...args], { stdout: "ignore", stderr: "pipe" });
  const resolver = new Resolver({ timeout: 200, tries: 1 });
  resolver.setServers([`127.0.0.1:${port}`]);
  // Ready once it answers anything for its zone (NXDOMAIN is an answer).
  await until(
    "dnsmasq to answer",
    async () => {
      if (proc.exitCode !== null) throw new Error(`dnsmasq exited with ${proc.exitCode}: ${await new Response(proc.stderr as ReadableStream).text()}`);
      return resolver.resolveTxt(`ready-check.${zone}`).then(
        () => true,
        (e: NodeJS.ErrnoException) => e.code === "ENOTFOUND" || e.code === "ENODATA",
      );
    },
    10_000,
    50,
  );
  return {
    server: `127.0.0.1:${port}`,
    async stop() {
      proc.kill();
      await proc.exited;
    },
  };
}
