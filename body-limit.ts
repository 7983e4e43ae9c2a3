// Size limits on request bodies, without holding more than needed.
//
// Not hono/body-limit: for a body without Content-Length it reads the whole body into one buffer
// before the route runs, which would hold a 25 MiB message in memory (twice, while it grows).
// Here a streamed message is counted as it passes through to LMTP instead.

/** Passes the stream through and fails it once more than `max` bytes have gone by. */
export function countBytes(body: ReadableStream<Uint8Array>, max: number) {
  let seen = 0;
  let over = false;
  const stream = body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        seen += chunk.byteLength;
        if (seen > max) {
          over = true;
          controller.error(new Error(`message larger than ${max} bytes`));
          return;
        }
        controller.enqueue(chunk);
      },
    }),
  );
  return { stream, exceeded: () => over };
}

/** The whole body, or null if it is (or declares itself) larger than `max` bytes. */
export async function readAtMost(req: Request, max: number): Promise<Uint8Array | null> {
  const declared = Number(req.headers.get("content-length") ?? NaN);
  if (declared > max) return null;
  if (!req.body) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = req.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > max) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0]!;
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.byteLength;
  }
  return out;
}
