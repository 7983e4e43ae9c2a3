// Request and message bodies for tests and the bench: pull-based streams, one chunk per read,
// nothing read ahead (highWaterMark 0), so a test controls what has been sent when.

/** A stream of these chunks (an array, or a generator that makes them as they are read). */
export function streamOf(chunks: Iterable<Uint8Array> | Iterator<Uint8Array>): ReadableStream<Uint8Array>;
/** A stream of `data` in views of `size` bytes (no copies); `size` may depend on the offset (uneven chunks). */
export function streamOf(data: Uint8Array, size: number | ((at: number) => number)): ReadableStream<Uint8Array>;
export function streamOf(source: Uint8Array | Iterable<Uint8Array> | Iterator<Uint8Array>, size?: number | ((at: number) => number)): ReadableStream<Uint8Array> {
  const it = source instanceof Uint8Array ? views(source, size!) : Symbol.iterator in source ? source[Symbol.iterator]() : source;
  return new ReadableStream<Uint8Array>(
    {
      pull(controller) {
        const r = it.next();
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      },
    },
    { highWaterMark: 0 },
  );
}

function* views(data: Uint8Array, size: number | ((at: number) => number)): Generator<Uint8Array> {
  for (let at = 0; at < data.length; ) {
    const end = Math.min(at + (typeof size === "number" ? size : size(at)), data.length);
    yield data.subarray(at, end);
    at = end;
  }
}
