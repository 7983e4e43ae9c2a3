// Diagnostic only (bench/profile.ts bare): the least an HTTP-to-LMTP relay can do on this machine.
// Bun.serve takes a message/rfc822 POST and hands its body stream to lmtp.ts's LmtpPool, with no
// authentication, validation, header parsing, duplicate log or access log. Its distance from the
// ceiling is the cost of the HTTP hop itself; the product's distance from it is the product's code.
// Same environment as server.ts: LMTP_HOST, LMTP_PORT, PORT, HOST.

import { LmtpPool, lmtpTarget } from "../lmtp.ts";

const pool = new LmtpPool(lmtpTarget(process.env.LMTP_HOST ?? "127.0.0.1", Number(process.env.LMTP_PORT)), { lhloName: "bare-relay" });

const server = Bun.serve({
  hostname: process.env.HOST ?? "127.0.0.1",
  port: Number(process.env.PORT),
  maxRequestBodySize: 64 * 1024 * 1024,
  async fetch(req) {
    if (new URL(req.url).pathname === "/health") return Response.json({ status: "healthy" });
    const from = req.headers.get("x-envelope-from") ?? "";
    const to = (req.headers.get("x-envelope-to") ?? "").split(",").map((s) => s.trim());
    const length = req.headers.get("content-length");
    const replies = await pool.deliver({ from, to }, req.body!, length ? Number(length) : null);
    const ok = replies.every((r) => r.code === 250);
    return Response.json({ status: ok ? "success" : "error", message: replies.map((r) => `${r.code} ${r.text}`).join("; ") }, { status: ok ? 200 : 503 });
  },
});

process.on("SIGTERM", async () => {
  server.stop();
  await pool.close();
  process.exit(0);
});
