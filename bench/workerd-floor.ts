// The floor for the Worker's CPU in workerd: an email() that reads the message and does nothing
// else. What the local runtime spends to hand a message to any handler (wrangler's
// /cdn-cgi/handler/email builds the message in the same process) before the product's code.

export default {
  async email(message: { raw: ReadableStream<Uint8Array> }): Promise<void> {
    await new Response(message.raw).arrayBuffer();
  },
};
