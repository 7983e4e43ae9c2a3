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
 * (highWaterMark 0: nothing is read ahead while the consumer is busy). One timer per idle period,
 * not per chunk: it looks at how long the read under way has waited, and sets itself again.
 */
export function idleLimited(body: ReadableStream<Uint8Array>, idleMs: number): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  /** performance.now() when the read under way began; null while none is. */
  let waitingSince: number | null = null;
  let timer: Timer | null = null;
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const stop = () => {
    if (timer) clearTimeout(timer);
    timer = null;
    waitingSince = null;
  };
  const check = () => {
    timer = null;
    if (waitingSince === null) return; // the next read sets it again
    const left = idleMs - (performance.now() - waitingSince);
    if (left > 0) {
      timer = setTimeout(check, left);
      return;
    }
    stop();
    const e = new BodyStalled(`the request body stopped: no bytes for ${idleMs / 1000} s`);
    controller.error(e);
    reader.cancel(e).catch(() => {});
  };
  return new ReadableStream<Uint8Array>(
    {
      start(c) {
        controller = c;
      },
      async pull(c) {
        waitingSince = performance.now();
        timer ??= setTimeout(check, idleMs);
        let r: Awaited<ReturnType<typeof reader.read>>;
        try {
          r = await reader.read();
        } catch (e) {
          if (waitingSince === null) return; // failed as stalled already
          stop();
          return c.error(e);
        }
        if (waitingSince === null) return;
        waitingSince = null;
        if (r.done) {
          stop();
          c.close();
        } else c.enqueue(r.value);
      },
      cancel(reason) {
        stop();
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
}
