// The message bytes as DATA sends them (RFC 5321 4.5.2): CRLF line ends, dot-stuffed, closed by ".".

const LF = 0x0a;
const CR = 0x0d;
const DOT = 0x2e;

/**
 * Encodes message bytes for DATA: a bare LF becomes CRLF, a line starting with "." gets another
 * "." (RFC 5321 4.5.2), and end() closes with CRLF "." CRLF. It keeps two bits of state across
 * chunks (previous byte, start of line) so chunk boundaries change nothing. A chunk that needs no
 * change is passed through as is, without a copy.
 */
export class DotStuffer {
  private prev = LF; // the message starts at the start of a line

  push(chunk: Uint8Array): Uint8Array {
    if (chunk.length === 0) return chunk;
    let extra = 0;
    if (chunk[0] === DOT && this.prev === LF) extra++;
    // An LF at index 0 counts too, for the byte after it: "\n." starting a chunk needs both a CR
    // (unless the previous chunk ended in CR) and a second dot. The count must be exact, the
    // output buffer is sized by it and a typed array drops writes past its end.
    for (let i = chunk.indexOf(LF); i !== -1; i = chunk.indexOf(LF, i + 1)) {
      if ((i === 0 ? this.prev : chunk[i - 1]) !== CR) extra++;
      if (chunk[i + 1] === DOT) extra++;
    }
    if (extra === 0) {
      this.prev = chunk[chunk.length - 1]!;
      return chunk;
    }
    const out = new Uint8Array(chunk.length + extra);
    let o = 0;
    let prev = this.prev;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === LF && prev !== CR) out[o++] = CR;
      else if (b === DOT && prev === LF) out[o++] = DOT;
      out[o++] = b;
      prev = b;
    }
    this.prev = prev;
    return out;
  }

  /** The terminator; a message without a final line end gets one (the protocol needs it). */
  end(): Uint8Array {
    return new TextEncoder().encode(this.prev === LF ? ".\r\n" : "\r\n.\r\n");
  }
}
