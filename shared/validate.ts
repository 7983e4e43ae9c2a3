// Route parameters through the design card's validator (@hono/zod-validator): a value that does
// not fit the schema is answered 400 with the contract's JSON error, naming what was wrong.

import { zValidator } from "@hono/zod-validator";
import type { ValidationTargets } from "hono";
import type { z } from "zod";
import { describeIssues } from "./contract.ts";

export function valid<T extends z.ZodType, Target extends keyof ValidationTargets>(target: Target, schema: T) {
  return zValidator(target, schema, (result, c) => {
    if (!result.success) return c.json({ status: "error", error: "invalid_request", message: describeIssues(result.error) }, 400);
  });
}
