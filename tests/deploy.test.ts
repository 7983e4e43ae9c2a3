// `bun run deploy` reads the operator's values from worker.env (untracked) and checks them as the
// Worker will before wrangler runs: what goes where (variable, secret, wrangler's login, neither),
// and every refusal as one line naming the setting.

import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { deployPlan, parseEnvFile, wranglerArgs } from "../scripts/deploy.ts";

const TOML = readFileSync(join(import.meta.dir, "..", "wrangler.toml"), "utf8");
const KEY = "k".repeat(40);
const GOOD = [
  "DELL_API_ENDPOINT=https://mail-api.kuma.test/api/v1/inbound-mail",
  "POSTMASTER=postmaster@kuma.test",
  `API_KEY=${KEY}`,
].join("\n");

const refusal = (text: string, toml = TOML) => {
  try {
    deployPlan(text, toml);
  } catch (e) {
    return (e as Error).message;
  }
  return "accepted";
};

describe("worker.env's lines", () => {
  test("comments, blanks, export, quotes and a trailing comment are read as dotenv reads them", () => {
    const values = parseEnvFile(
      ["# a comment", "", "export A=1", "B = two words # note", 'C="x # not a comment"', "D='y=z'", "E=", "F=a#b"].join("\r\n"),
      "worker.env",
    );
    expect(Object.fromEntries(values)).toEqual({ A: "1", B: "two words", C: "x # not a comment", D: "y=z", E: "", F: "a#b" });
  });

  test("a line that is not NAME=value is refused with its number", () => {
    expect(() => parseEnvFile("A=1\nDELL_API_ENDPOINT https://x\n", "worker.env")).toThrow("worker.env line 2: not NAME=value");
  });
});

describe("what a deploy sends", () => {
  test("settings become variables, the key a secret, the login wrangler's, EDGE_URL nothing", () => {
    const plan = deployPlan(
      [GOOD, "ALLOWED_RECIPIENTS=user@kuma.test,b@kuma.test", "CLOUDFLARE_API_TOKEN=tok", "CLOUDFLARE_ACCOUNT_ID=acc", "EDGE_URL=https://w.test"].join("\n"),
      TOML,
    );
    expect(plan).toEqual({
      vars: { DELL_API_ENDPOINT: "https://mail-api.kuma.test/api/v1/inbound-mail", POSTMASTER: "postmaster@kuma.test", ALLOWED_RECIPIENTS: "user@kuma.test,b@kuma.test" },
      secrets: { API_KEY: KEY },
      wranglerEnv: { CLOUDFLARE_API_TOKEN: "tok", CLOUDFLARE_ACCOUNT_ID: "acc" },
    });
  });

  test("wrangler gets each variable as --var NAME:VALUE (a URL's colons kept) and the secrets as a file, never on the command line", () => {
    const args = wranglerArgs(deployPlan(GOOD, TOML), "/tmp/s.json", ["--dry-run"]);
    expect(args).toEqual([
      "deploy",
      "--var", "DELL_API_ENDPOINT:https://mail-api.kuma.test/api/v1/inbound-mail",
      "--var", "POSTMASTER:postmaster@kuma.test",
      "--secrets-file", "/tmp/s.json",
      "--dry-run",
    ]);
    expect(args.join(" ")).not.toContain(KEY);
  });

  test("the Access service token goes up as two secrets, never as a plain variable", () => {
    const plan = deployPlan(`${GOOD}\nCF_ACCESS_CLIENT_ID=id.access\nCF_ACCESS_CLIENT_SECRET=s3cret`, TOML);
    expect(plan.secrets).toEqual({ API_KEY: KEY, CF_ACCESS_CLIENT_ID: "id.access", CF_ACCESS_CLIENT_SECRET: "s3cret" });
    expect(Object.keys(plan.vars)).not.toContain("CF_ACCESS_CLIENT_ID");
  });

  test("a name the Worker does not know is refused (a typo must not deploy quietly)", () => {
    expect(refusal(`${GOOD}\nDELL_API_ENDPIONT=https://x.test/api/v1/inbound-mail`)).toBe(
      "worker.env: DELL_API_ENDPIONT is not a setting of the Worker (docs/configuration.md) nor one of CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID, EDGE_URL",
    );
  });

  test("a variable added to wrangler.toml's [vars] may be set in worker.env too", () => {
    const toml = TOML.replace("[vars]\n", '[vars]\nNEW_SETTING = "a"\n');
    expect(deployPlan(`${GOOD}\nNEW_SETTING=b`, toml).vars.NEW_SETTING).toBe("b");
  });

  test("without API_KEY nothing is deployed: the Worker would run without its key until a secret put", () => {
    expect(refusal(GOOD.replace(`API_KEY=${KEY}`, ""))).toBe("worker.env: API_KEY is not set (the same value as MAILSERVER_API_KEY in the stack's .env)");
    expect(refusal(GOOD.replace(`API_KEY=${KEY}`, "API_KEY="))).toStartWith("worker.env: API_KEY is not set");
  });

  test("wrangler.toml's placeholders are refused, whether left unset or copied", () => {
    expect(refusal(GOOD.replace(/^DELL_API_ENDPOINT=.*$/m, ""))).toBe(
      "worker.env: DELL_API_ENDPOINT is wrangler.toml's placeholder (https://mail-api.example.com/api/v1/inbound-mail): set your own DELL_API_ENDPOINT in worker.env",
    );
    expect(refusal(GOOD.replace("postmaster@kuma.test", "postmaster@example.com"))).toBe(
      "worker.env: POSTMASTER is a placeholder (postmaster@example.com): set your own POSTMASTER in worker.env",
    );
    expect(refusal(`${GOOD}\nALLOWED_RECIPIENTS=user@kuma.test,user@example.com`)).toStartWith("worker.env: ALLOWED_RECIPIENTS is a placeholder");
  });

  test("a bad value is refused with the Worker's own words", () => {
    expect(refusal(GOOD.replace("https://mail-api", "http://mail-api"))).toBe("worker.env: DELL_API_ENDPOINT must be https:// (plain http only for localhost, or through the HOST binding)");
    expect(refusal(`${GOOD}\nHOST_TIMEOUT_MS=40000`)).toBe("worker.env: HOST_TIMEOUT_MS must be below the 30 s Worker limit");
    // Through a Workers VPC binding the endpoint only names the path: plain http:// is fine there.
    const vpc = `${TOML}\n[[vpc_services]]\nbinding = "HOST"\nservice_id = "0199b1f2-0000-7000-8000-000000000000"\n`;
    expect(() => deployPlan(GOOD.replace("https://mail-api", "http://mail-api"), vpc)).not.toThrow();
    expect(refusal(GOOD.replace(`API_KEY=${KEY}`, "API_KEY=short"))).toBe("worker.env: API_KEY is shorter than 32 characters");
  });

  test("POSTMASTER is required while wrangler.toml binds the edge spool, not without it", () => {
    const noPostmaster = GOOD.replace(/^POSTMASTER=.*$/m, "");
    const toml = TOML.replace(/^POSTMASTER = .*$/m, "");
    expect(refusal(noPostmaster, toml)).toBe("worker.env: POSTMASTER is not set (required with the EDGE_SPOOL bucket)");
    const withoutSpool = toml.replace(/^\[\[r2_buckets\]\]\n(?:(?!\[).*(?:\n|$))*/m, "");
    expect(refusal(noPostmaster, withoutSpool)).toBe("accepted");
  });

  test("a refusal never shows the key", () => {
    const text = GOOD.replace("https://mail-api", "http://mail-api");
    expect(refusal(text)).not.toContain(KEY.slice(0, 8));
  });
});
