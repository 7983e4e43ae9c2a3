// A message put straight into a spool's queue/ (as the host would have, or an older host, or a
// hand edit): for tests of what reads the spool (the doctor, /status).

import type { SpoolHeader } from "../../host/spool-file.ts";
import type { Spool } from "../../host/spool.ts";

export async function spoolDirect(spool: Spool, from: string, to: string[], receivedAt = Date.now(), text = "Subject: x\r\n\r\nhi\r\n"): Promise<SpoolHeader> {
  const staged = spool.stage();
  try {
    await staged.write(new TextEncoder().encode(text));
    return await staged.commit({ from, to, received_at: receivedAt });
  } finally {
    await staged.discard();
  }
}
