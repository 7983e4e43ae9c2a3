// `bun run doctor` / `mail-relay doctor` [--json]: every check, one line each (✓ / ! / ✗, or
// skipped) with what it found and the fix. Exit 0 only when nothing is ✗; 2 for a wrong command line.

import { examine, exitCode, renderJson, renderText } from "./finding.ts";
import { PARTS } from "./parts.ts";
import { doctorContext } from "./settings.ts";

const USAGE = "usage: doctor [--json]";

export async function doctorCommand(args: string[], env: Record<string, string | undefined>, out: (text: string) => void = (t) => process.stdout.write(t)): Promise<number> {
  const json = args.includes("--json");
  if (args.some((a) => a !== "--json")) {
    console.error(USAGE);
    return 2;
  }
  const { ctx, findings } = doctorContext(env);
  findings.push(...(await examine(PARTS, ctx)));
  out(json ? renderJson(findings) : renderText(findings));
  return exitCode(findings);
}
