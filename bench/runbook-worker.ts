// The baseline for the Worker CPU comparison: the runbook's Email Worker (seed runbook, section
// 3.3.2, worker.js) adapted to TypeScript with its logic kept: read message.raw fully into one
// Uint8Array, decode it as UTF-8, JSON.stringify {from, to, subject, raw, timestamp}, POST it as
// application/json, and setReject on any error. Bench-only: its faults (UTF-8 corruption of 8-bit
// mail, a bounce for every temporary failure) are why worker.ts exists; do not use it for mail.

import type { IncomingEmail } from "../worker.ts";

export interface RunbookEnv {
  DELL_API_ENDPOINT: string;
  API_KEY: string;
}

export const runbookWorker = {
  async email(message: IncomingEmail, env: RunbookEnv): Promise<void> {
    const startTime = Date.now();

    try {
      // Basic information
      const from = message.from;
      const to = message.to;
      const subject = message.headers.get("subject") || "(件名なし)";

      console.log(`[INFO] メール受信: From=${from}, To=${to}, Subject=${subject}`);

      // The message as a string
      const rawEmail = await streamToString(message.raw);

      // The data for the host's API
      const emailData = {
        from: from,
        to: to,
        subject: subject,
        raw: rawEmail,
        timestamp: new Date().toISOString(),
      };

      // POST to the host's API
      const response = await fetch(env.DELL_API_ENDPOINT, {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          "X-API-Key": env.API_KEY,
          "User-Agent": "Cloudflare-Email-Worker/1.0",
        },
        body: JSON.stringify(emailData),
        // 25 s timeout (below the Worker's 30 s limit)
        signal: AbortSignal.timeout(25000),
      });

      const elapsed = Date.now() - startTime;

      if (!response.ok) {
        const errorText = await response.text();
        console.error(`[ERROR] API応答エラー (${response.status}): ${errorText}, 経過時間=${elapsed}ms`);

        // 5xx: rejected as temporary (the runbook's comment; setReject is in fact a bounce)
        if (response.status >= 500) {
          message.setReject(`Temporary API error: ${response.status}`);
        } else {
          // 4xx: rejected as permanent
          message.setReject(`Permanent API error: ${response.status}`);
        }
        return;
      }

      const result = await response.json();
      console.log(`[SUCCESS] メール転送成功: ${to}, 経過時間=${elapsed}ms, 結果=${JSON.stringify(result)}`);
    } catch (error) {
      const elapsed = Date.now() - startTime;
      console.error(`[ERROR] メール処理エラー: ${(error as Error).message}, 経過時間=${elapsed}ms`);

      // On error: rejected (the runbook expects the sender to retry)
      message.setReject(`Processing failed: ${(error as Error).message}`);
    }
  },
};

/** ReadableStream to a string: every chunk kept, joined into one Uint8Array, decoded as UTF-8. */
async function streamToString(stream: ReadableStream<Uint8Array>): Promise<string> {
  const chunks: Uint8Array[] = [];
  const reader = stream.getReader();

  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
    }

    // Join the Uint8Arrays
    const totalLength = chunks.reduce((acc, chunk) => acc + chunk.length, 0);
    const result = new Uint8Array(totalLength);
    let offset = 0;

    for (const chunk of chunks) {
      result.set(chunk, offset);
      offset += chunk.length;
    }

    // UTF-8 decode
    return new TextDecoder("utf-8").decode(result);
  } finally {
    reader.releaseLock();
  }
}
