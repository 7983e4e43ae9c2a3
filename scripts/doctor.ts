// `bun run doctor [--json]`: checks the whole path, DNS to Dovecot, with the host's environment
// plus PUBLIC_URL, EDGE_URL, MAIL_DOMAIN and DNS_SERVER (docs/doctor.md). The container image runs
// the same checks as `/app/mail-relay doctor`.

import { doctorCommand } from "../host/doctor/cli.ts";

process.exit(await doctorCommand(process.argv.slice(2), process.env));
