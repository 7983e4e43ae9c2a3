// What GET /edge/queue answers: the Worker builds it (edge/queue-http.ts), the host reads it for
// /status and the doctor (host/edge-client.ts). One schema, so the two ends cannot drift apart.
// Runtime-neutral: zod only.

import { z } from "zod";

export const EdgeRow = z.object({
  id: z.string(),
  kind: z.string(),
  from: z.string(),
  to: z.string(),
  size: z.number(),
  age_seconds: z.number(),
  attempts: z.number(),
  next_attempt: z.string().nullable(),
  last_reply: z.string(),
  why: z.string().optional(),
});
export type EdgeRow = z.infer<typeof EdgeRow>;

export const EdgeListing = z.object({
  held: z.number(),
  oldest_held_age_seconds: z.number().nullable(),
  failed: z.number(),
  complete: z.boolean(),
  messages: z.array(EdgeRow),
  failed_messages: z.array(EdgeRow),
});
export type EdgeListing = z.infer<typeof EdgeListing>;
