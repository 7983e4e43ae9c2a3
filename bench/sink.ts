// A stand-in for the host, in its own process, for the Worker CPU measurement: reads each request
// body to its end and answers 200 with the host's success shape. Prints "port=N" once listening.

const server = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  maxRequestBodySize: 128 * 1024 * 1024,
  idleTimeout: 60,
  async fetch(req) {
    const reader = req.body?.getReader();
    let bytes = 0;
    if (reader) {
      for (;;) {
        const r = await reader.read();
        if (r.done) break;
        bytes += r.value.byteLength;
      }
    }
    return new Response(JSON.stringify({ status: "success", message: "ok" }), {
      status: 200,
      headers: { "content-type": "application/json", "x-bytes-read": String(bytes) },
    });
  },
});

console.log(`port=${server.port}`);
process.on("SIGTERM", () => {
  server.stop(true);
  process.exit(0);
});
