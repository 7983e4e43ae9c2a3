// A stream of some chunks already in hand, then whatever a reader still has: the header peek hands
// on the bytes it read before the rest, and the spam filter puts its fields before the message.

export function replayThen(chunks: readonly Uint8Array[], rest: ReadableStreamDefaultReader<Uint8Array> | null): ReadableStream<Uint8Array> {
  let i = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (i < chunks.length) return controller.enqueue(chunks[i++]!);
      if (!rest) return controller.close();
      try {
        const r = await rest.read();
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      } catch (e) {
        controller.error(e);
      }
    },
    cancel(reason) {
      return rest?.cancel(reason);
    },
  });
}
