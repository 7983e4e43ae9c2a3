// The doctor's parts, in the order a message travels backwards from the mailbox: the settings
// are read first (settings.ts), then DNS, the delivery target, the spool, the spam filter in front
// of them, the door (Access), the tunnel, the Worker. A new part of the path is one module here.

import { access } from "./access.ts";
import { dns } from "./dns.ts";
import { edge } from "./edge.ts";
import type { DoctorPart } from "./finding.ts";
import { publicUrl } from "./public-url.ts";
import { rspamd } from "./rspamd.ts";
import { spool } from "./spool.ts";
import { target } from "./target.ts";

export const PARTS: DoctorPart[] = [dns, target, spool, rspamd, access, publicUrl, edge];
