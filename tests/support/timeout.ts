// Time limits for suites that start real Dovecot, workerd or relay processes: a 2-core machine
// needs more than Bun's 5 s. Bun resets the default limit for every test file (a preload's
// setDefaultTimeout covers only the first file), so each file calls allowSlowTests() itself; and
// hooks keep their own 5 s unless given HOOK_TIMEOUT_MS.
import { setDefaultTimeout } from "bun:test";

export const HOOK_TIMEOUT_MS = 60_000;

export function allowSlowTests(): void {
  setDefaultTimeout(60_000);
}
