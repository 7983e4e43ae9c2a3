// A request refused before delivery, with the HTTP status the contract gives it (docs/contract.md).

/** A request refused before delivery: the status, a short code, and what was wrong. */
export class Refusal extends Error {
  constructor(
    readonly status: 400 | 401 | 413 | 415 | 422 | 429 | 503,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** The message itself is over the limit (the contract's 413). */
export function tooLarge(max: number): Refusal {
  return new Refusal(413, "payload_too_large", `the message is larger than ${max} bytes`);
}
