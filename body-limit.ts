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

/** A request body that stopped: no bytes for the idle limit. Nothing of it was delivered. */
export class BodyStalled extends Error {
  override name = "BodyStalled";
}

/**
 * Passes the stream through and fails it with BodyStalled once a read has waited `idleMs` for
 * the next bytes: a client that stops sending costs only its own request, and is answered instead
 * of holding on until the server's socket timeout. Only time spent waiting for the client counts
 * (highWaterMark 0: nothing is read ahead while the consumer is busy).
 */
export function idleLimited(body: ReadableStream<Uint8Array>, idleMs: number): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        let timer: Timer | undefined;
        const stalled = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new BodyStalled(`the request body stopped: no bytes for ${idleMs / 1000} s`)), idleMs);
        });
        try {
          const r = await Promise.race([reader.read(), stalled]);
          if (r.done) controller.close();
          else controller.enqueue(r.value);
        } catch (e) {
          if (e instanceof BodyStalled) reader.cancel(e).catch(() => {});
          controller.error(e);
        } finally {
          clearTimeout(timer);
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
}

/** The whole body, or null if it is (or declares itself) larger than `max` bytes. Fails with BodyStalled past `idleMs` without bytes. */
export async function readAtMost(req: Request, max: number, idleMs?: number): Promise<Uint8Array | null> {
  const declared = Number(req.headers.get("content-length") ?? NaN);
  if (declared > max) return null;
  if (!req.body) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = (idleMs ? idleLimited(req.body, idleMs) : req.body).getReader();
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
