// Where the LMTP server listens: a TCP host and port, or a unix socket.

export type LmtpTarget = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };

/** LMTP_HOST starting with "/" names a unix socket; anything else is a TCP host. */
export function lmtpTarget(host: string, port: number): LmtpTarget {
  return host.startsWith("/") ? { kind: "unix", path: host } : { kind: "tcp", host, port };
}

export function describeTarget(t: LmtpTarget): string {
  return t.kind === "unix" ? `unix:${t.path}` : `${t.host}:${t.port}`;
}
