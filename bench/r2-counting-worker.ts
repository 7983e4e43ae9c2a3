// worker.ts as it is, with its R2 bucket counted: every call by R2's price class (A: put, list;
// B: get, head; delete is free) and every invocation of the Worker (each one is a request of
// the free plan's 100,000 a day, the drain's chained runs included: they come back through SELF
// to this same entry). For bench/worker-workerd.ts's R2 costs; never deployed.
//   GET /bench/r2   the counts since the last POST /bench/r2 (which answers them and starts again)

import worker from "../worker.ts";

type Env = Record<string, unknown>;
type Ctx = { waitUntil(p: Promise<unknown>): void };

const CLASS: Record<string, "A" | "B" | "free"> = { put: "A", list: "A", get: "B", head: "B", delete: "free" };
let counts = { A: 0, B: 0, free: 0, invocations: 0 };

function counted(bucket: object): object {
  return new Proxy(bucket, {
    get(target, name) {
      const value = Reflect.get(target, name) as unknown;
      if (typeof value !== "function") return value;
      return (...args: unknown[]) => {
        const cls = CLASS[String(name)];
        if (cls) counts[cls]++;
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

/** One counted env per env workerd passes: worker.ts keeps its settings per env object. */
const envs = new WeakMap<Env, Env>();
function countedEnv(env: Env): Env {
  let e = envs.get(env);
  if (!e) envs.set(env, (e = { ...env, EDGE_SPOOL: counted(env.EDGE_SPOOL as object) }));
  return e;
}

export default {
  async fetch(req: Request, env: Env, ctx: Ctx): Promise<Response> {
    if (new URL(req.url).pathname === "/bench/r2") {
      const now = counts;
      if (req.method === "POST") counts = { A: 0, B: 0, free: 0, invocations: 0 };
      return Response.json(now);
    }
    counts.invocations++;
    return worker.fetch(req, countedEnv(env), ctx);
  },
  async email(message: Parameters<typeof worker.email>[0], env: Env, ctx: Ctx): Promise<void> {
    counts.invocations++;
    return worker.email(message, countedEnv(env), ctx);
  },
  async scheduled(controller: { scheduledTime: number }, env: Env): Promise<void> {
    counts.invocations++;
    return worker.scheduled(controller, countedEnv(env));
  },
};
