// The road not taken, kept for the bench: "write every message to R2 first, deliver from it".
// The message goes to the EDGE_SPOOL bucket, then the very same email() (worker.ts, without the
// bucket so it does not tee) delivers it from there, and the copy is deleted after the host's
// answer. Measured beside worker.ts so that the choice in docs/edge-spool.md stays reproducible.

import { newId, sized, type R2BucketLike } from "../edge/spool.ts";
import { email, type IncomingEmail, type WaitUntil } from "../worker.ts";

type Env = Record<string, unknown>;
const withoutBucket = new WeakMap<Env, Env>();

export default {
  async email(message: IncomingEmail, env: Env, ctx: WaitUntil): Promise<void> {
    const bucket = env.EDGE_SPOOL as R2BucketLike;
    let plain = withoutBucket.get(env);
    if (!plain) withoutBucket.set(env, (plain = Object.fromEntries(Object.entries(env).filter(([k]) => k !== "EDGE_SPOOL"))));
    const key = `queue/${newId()}`;
    await bucket.put(key, sized(message.raw, message.rawSize));
    const stored = await bucket.get(key);
    if (!stored) throw new Error("temporary failure: the copy in R2 is missing");
    try {
      await email({ from: message.from, to: message.to, headers: message.headers, raw: stored.body, rawSize: message.rawSize, setReject: (r) => message.setReject(r) }, plain, ctx);
    } finally {
      await bucket.delete(key);
    }
  },
};
