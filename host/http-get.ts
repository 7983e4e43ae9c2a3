// One GET from the host to something it asks (the Worker's /edge/queue, Access's signing keys, the
// doctor's checks): never follows a redirect (a redirect is an answer of its own: Access's login
// page, a wrong hostname), gives up after a limit, and reads the body as JSON if it is.

export interface Answer {
  status: number;
  location: string | null;
  /** The body, when it is a JSON object. */
  json: Record<string, unknown> | null;
  text: string;
}

/** The answer, or why none came (a string). */
export async function get(url: URL, ms: number, headers: Record<string, string> = {}): Promise<Answer | string> {
  let res: Response;
  try {
    res = await fetch(url, { headers, redirect: "manual", signal: AbortSignal.timeout(ms) });
  } catch (e) {
    const err = e as Error;
    return err.name === "TimeoutError" ? `no answer within ${ms} ms` : err.message;
  }
  const text = await res.text().catch(() => "");
  let json: Record<string, unknown> | null = null;
  try {
    const parsed: unknown = JSON.parse(text);
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) json = parsed as Record<string, unknown>;
  } catch {}
  return { status: res.status, location: res.headers.get("location"), json, text };
}
