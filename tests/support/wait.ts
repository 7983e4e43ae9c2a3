// Waiting for a condition in tests: the condition is the assertion, the limit only stops a hang.

/** Polls cond() every `every` ms until it holds, or throws after `ms` naming `what`. */
export async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 10_000, every = 10): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for: ${what}`);
    await Bun.sleep(every);
  }
}
