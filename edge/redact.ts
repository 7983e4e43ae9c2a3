// What the host says goes into the Worker's log, R2's metadata, the notice to POSTMASTER and the
// bounce to the sender; the request it answers carried the key and the Access service token. A
// host (or a proxy in front of it) that echoes them, in a redirect's Location or in its reply,
// must not make the Worker write them down: every secret, and any run of at least eight
// characters that starts one, is replaced before the text is used. Linear in the text.

const MIN_RUN = 8;
const MARK = "[redacted]";

/** A function that takes the Worker's secrets out of a text from the host. */
export function redactor(secrets: readonly (string | null | undefined)[]): (text: string) => string {
  const list = secrets.filter((s): s is string => typeof s === "string" && s.length >= MIN_RUN);
  if (!list.length) return (text) => text;
  return (text) => {
    for (const secret of list) {
      const start = secret.slice(0, MIN_RUN);
      let at = text.indexOf(start);
      while (at >= 0) {
        let end = at + MIN_RUN;
        while (end < text.length && end - at < secret.length && text[end] === secret[end - at]) end++;
        text = text.slice(0, at) + MARK + text.slice(end);
        at = text.indexOf(start, at + MARK.length);
      }
    }
    return text;
  };
}
