// One private Dovecot for a whole test file: started before its first test, running and empty
// before each test (one that failed half-way may have left it stopped), stopped after the last,
// with the temporary folders the file made removed.

import { afterAll, beforeAll, beforeEach } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { startDovecot, type DovecotInstance } from "./dovecot.ts";
import { HOOK_TIMEOUT_MS } from "./timeout.ts";

export function dovecotPerFile(name: string): { dv: DovecotInstance; tempDir(): Promise<string> } {
  let instance: DovecotInstance | null = null;
  const dirs: string[] = [];
  beforeAll(async () => {
    instance = await startDovecot(); // throws when Dovecot is missing: a failure, never a skip
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await instance?.dispose();
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
  }, HOOK_TIMEOUT_MS);
  beforeEach(async () => {
    await instance!.start();
    await instance!.clear();
  }, HOOK_TIMEOUT_MS);
  // The instance exists only once beforeAll has run; the tests reach it through this stand-in.
  const dv = new Proxy({} as DovecotInstance, {
    get(_, key) {
      if (!instance) throw new Error("Dovecot is not started yet (used outside a test or hook?)");
      const v = Reflect.get(instance, key) as unknown;
      return typeof v === "function" ? v.bind(instance) : v;
    },
  });
  return {
    dv,
    async tempDir() {
      const d = await mkdtemp(`/tmp/${name}-`);
      dirs.push(d);
      return d;
    },
  };
}
