// The LMTP server the bench delivers into: a private real Dovecot when the `dovecot` binary is
// installed, otherwise the fake LMTP (and then every output line says so).

import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { dovecotAvailable, startDovecot, type DovecotInstance } from "../tests/support/dovecot.ts";
import { dovecotVersion } from "./proc.ts";
import { RECIPIENT } from "./messages.ts";

export interface Backend {
  kind: "dovecot" | "fake";
  version: string | null;
  host: string;
  port: number;
  /** Messages stored for the bench recipient since the last clear(). */
  count(): Promise<number>;
  clear(): Promise<void>;
  dispose(): Promise<void>;
}

export async function startBackend(want: "auto" | "fake" = "auto"): Promise<Backend> {
  if (want === "auto" && dovecotAvailable()) return fromDovecot(await startDovecot({ users: [RECIPIENT] }));
  return fromFake(await startFakeLmtp());
}

function fromDovecot(dv: DovecotInstance): Backend {
  return {
    kind: "dovecot",
    version: dovecotVersion(),
    host: dv.host,
    port: dv.port,
    async count() {
      // Counting file names is enough (and cheap); reading 2000 files would not add anything.
      let n = 0;
      for (const sub of ["new", "cur"]) n += (await readdir(join(dv.maildir(RECIPIENT), sub)).catch(() => [] as string[])).length;
      return n;
    },
    clear: () => dv.clear(),
    dispose: () => dv.dispose(),
  };
}

function fromFake(fake: FakeLmtpServer): Backend {
  return {
    kind: "fake",
    version: null,
    host: fake.host,
    port: fake.port,
    async count() {
      return fake.received.filter((m) => m.to.includes(RECIPIENT)).length;
    },
    async clear() {
      fake.received = [];
      fake.commands = [];
    },
    dispose: () => fake.close(),
  };
}
