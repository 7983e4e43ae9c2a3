// A TCP proxy in front of an LMTP server, to see how the client's bytes are grouped on the wire
// and to rewrite or cut the conversation.

import net from "node:net";

export interface Proxy {
  port: number;
  /** Client -> server chunks, one entry per "data" event, per connection. */
  chunks: string[][];
  close(): Promise<void>;
}

export interface ProxyHooks {
  /**
   * What becomes of a chunk from the client (`seen`: this connection's chunks so far, this one
   * last): true passes it on, false cuts both sides instead, and "forward, then cut the client"
   * passes it on and cuts the client's side, while the server's gets an orderly end: the server
   * has it all and answers into the void.
   */
  fromClient?: (chunk: string, seen: readonly string[]) => boolean | "forward, then cut the client";
  /** What the client gets instead of the server's chunk. */
  fromServer?: (chunk: string) => string;
}

export async function startProxy(upstreamPort: number, hooks: ProxyHooks = {}): Promise<Proxy> {
  const sockets = new Set<net.Socket>();
  const p: Proxy = {
    port: 0,
    chunks: [],
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        for (const sock of sockets) sock.destroy();
      }),
  };
  const server = net.createServer((client) => {
    const seen: string[] = [];
    p.chunks.push(seen);
    const upstream = net.connect(upstreamPort, "127.0.0.1");
    for (const sock of [client, upstream]) {
      sockets.add(sock);
      sock.on("error", () => {});
      sock.on("close", () => sockets.delete(sock));
    }
    // The client gone: the server hears an orderly end of what it was sent. The server gone: so is the client.
    client.on("close", () => upstream.end());
    upstream.on("close", () => client.destroy());
    client.on("data", (chunk: Buffer) => {
      const text = chunk.toString("latin1");
      seen.push(text);
      const action = hooks.fromClient?.(text, seen) ?? true;
      if (action === false) {
        client.destroy();
        upstream.destroy();
        return;
      }
      upstream.write(chunk);
      if (action === "forward, then cut the client") client.destroy();
    });
    upstream.on("data", (chunk: Buffer) => {
      if (!client.destroyed) client.write(hooks.fromServer ? Buffer.from(hooks.fromServer(chunk.toString("latin1")), "latin1") : chunk);
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  p.port = (server.address() as net.AddressInfo).port;
  return p;
}
