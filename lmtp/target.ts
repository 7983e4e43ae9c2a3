// Where mail is delivered: Dovecot's LMTP (a TCP host and port, or a unix socket) or an MTA's
// SMTP (a TCP host and port), and DELIVER_TO's URL form of it.

export type LmtpTarget =
  /** `protocol` absent means LMTP (every target before DELIVER_TO was one). */
  | { kind: "tcp"; host: string; port: number; protocol?: "lmtp" | "smtp" }
  | { kind: "unix"; path: string; protocol?: "lmtp" };

export type DeliveryProtocol = "lmtp" | "smtp";

export const protocolOf = (t: LmtpTarget): DeliveryProtocol => t.protocol ?? "lmtp";

/** LMTP_HOST starting with "/" names a unix socket; anything else is a TCP host. */
export function lmtpTarget(host: string, port: number): LmtpTarget {
  return host.startsWith("/") ? { kind: "unix", path: host } : { kind: "tcp", host, port };
}

/**
 * DELIVER_TO: `lmtp://host:port`, `lmtp:/path/to/socket` (or `lmtp:///path`), `smtp://host[:port]`
 * (port 25 when left out; LMTP has no port of its own, so lmtp:// names one). Throws an Error
 * saying what is wrong, in words for the start-up line.
 */
export function parseDeliverTo(value: string): LmtpTarget {
  const scheme = /^([a-z]+):/i.exec(value)?.[1]?.toLowerCase();
  if (scheme !== "lmtp" && scheme !== "smtp") throw new Error("must start with lmtp:// , lmtp:/ (a unix socket) or smtp://");
  const rest = value.slice(scheme.length + 1);
  if (!rest.startsWith("//") || rest.startsWith("///")) {
    if (scheme === "smtp") throw new Error("smtp: takes a host and port (smtp://host:port), not a socket path");
    const path = rest.replace(/^\/\/(?=\/)/, "");
    if (!path.startsWith("/") || path.length < 2 || /[\0\s]/.test(path)) throw new Error("lmtp:/ must be followed by the socket's absolute path");
    return { kind: "unix", path, protocol: "lmtp" };
  }
  let url: URL;
  try {
    url = new URL(`http:${rest}`); // the URL parser knows host:port only for "special" schemes
  } catch {
    throw new Error(`is not a URL of the form ${scheme}://host:port`);
  }
  if (url.username || url.password || (url.pathname !== "/" && url.pathname !== "") || url.search || url.hash) {
    throw new Error(`must be ${scheme}://host:port and nothing more`);
  }
  const explicitPort = /:(\d+)\/?$/.exec(rest)?.[1];
  if (explicitPort === undefined && scheme === "lmtp") throw new Error("needs a port (lmtp://host:port)");
  const port = Number(explicitPort ?? 25);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error("has a port outside 1-65535");
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  return { kind: "tcp", host, port, protocol: scheme };
}

export function describeTarget(t: LmtpTarget): string {
  if (t.kind === "unix") return `unix:${t.path}`;
  return t.protocol === "smtp" ? targetUrl(t) : `${t.host}:${t.port}`;
}

/**
 * The target as DELIVER_TO writes it, protocol first: `lmtp://host:port`, `lmtp:/path` (a unix
 * socket), `smtp://host:port`. parseDeliverTo reads it back as the same target.
 */
export function targetUrl(t: LmtpTarget): string {
  if (t.kind === "unix") return `lmtp:${t.path}`;
  return `${protocolOf(t)}://${t.host.includes(":") ? `[${t.host}]` : t.host}:${t.port}`;
}
