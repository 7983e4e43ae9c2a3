// Configuration from the environment: defaults, keys, and the one-line refusal at start-up.

import { describe, expect, test } from "bun:test";
import path from "node:path";
import { ServerEnv } from "../host/config.ts";
import { ConfigError, MIN_KEY_LENGTH, fromEnv } from "../shared/config-env.ts";
import { DEFAULT_MAX_MESSAGE_BYTES } from "../shared/contract.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const KEY_A = "cfgA0123456789-abcdefghijklmnopqrstuvwxyz";
const KEY_B = "cfgB9876543210_ZYXWVUTSRQPONMLKJIHGFEDCBA";

/** The ConfigError thrown for env; fails the test if there is none. */
function refusal(env: Record<string, string | undefined>): ConfigError {
  try {
    fromEnv(ServerEnv, env);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return e as ConfigError;
  }
  throw new Error(`expected a ConfigError for ${Object.keys(env).join(", ")}`);
}

describe("fromEnv(ServerEnv)", () => {
  test("defaults: LMTP dovecot:2525, port 8080 on 127.0.0.1, 25 MiB, no spool, 5 days, a body idle limit of 10 s", () => {
    const c = fromEnv(ServerEnv, { API_KEY: KEY_A });
    expect(c).toEqual({
      apiKeys: [KEY_A],
      lmtpHost: "dovecot",
      lmtpPort: 2525,
      port: 8080,
      host: "127.0.0.1",
      maxMessageBytes: 25 * 1024 * 1024,
      spoolDir: undefined,
      spoolMaxAgeMs: 5 * 24 * 3_600_000,
      exactlyOnce: false,
      bodyIdleMs: 10_000,
    });
    expect(DEFAULT_MAX_MESSAGE_BYTES).toBe(26_214_400);
  });

  test("EXACTLY_ONCE: true or false, and only with a spool", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, SPOOL_DIR: "/var/spool/x", EXACTLY_ONCE: "true" }).exactlyOnce).toBe(true);
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, EXACTLY_ONCE: "false" }).exactlyOnce).toBe(false);
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, EXACTLY_ONCE: "" }).exactlyOnce).toBe(false);
    for (const v of ["1", "yes", "TRUE", "on"]) expect(refusal({ API_KEY: KEY_A, SPOOL_DIR: "/s", EXACTLY_ONCE: v }).message).toBe("configuration: EXACTLY_ONCE must be true or false");
    expect(refusal({ API_KEY: KEY_A, EXACTLY_ONCE: "true" }).message).toMatch(/^configuration: EXACTLY_ONCE needs SPOOL_DIR/);
  });

  test("DELIVER_TO: parsed into the target; a bad URL, LMTP_HOST/LMTP_PORT beside it, or EXACTLY_ONCE or ALIASES_FILE with smtp:// stop start-up naming it", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, DELIVER_TO: "smtp://postfix:10025" }).deliverTo).toEqual({ kind: "tcp", host: "postfix", port: 10025, protocol: "smtp" });
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, DELIVER_TO: "lmtp:/run/dovecot/lmtp", ALIASES_FILE: "/etc/relay/aliases" })).toMatchObject({
      deliverTo: { kind: "unix", path: "/run/dovecot/lmtp" },
      aliasesFile: "/etc/relay/aliases",
    });
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "dovecot:24" }).message).toMatch(/^configuration: DELIVER_TO must start with lmtp:\/\//);
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "lmtp://dovecot" }).message).toBe('configuration: DELIVER_TO needs a port (lmtp://host:port) (got "lmtp://dovecot")');
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "lmtp://d:24", LMTP_HOST: "dovecot" }).message).toMatch(/^configuration: DELIVER_TO and LMTP_HOST\/LMTP_PORT are both set/);
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "lmtp://d:24", LMTP_PORT: "24" }).message).toMatch(/both set/);
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "smtp://mx", SPOOL_DIR: "/s", EXACTLY_ONCE: "true" }).message).toMatch(/^configuration: EXACTLY_ONCE works only with an LMTP target/);
    expect(refusal({ API_KEY: KEY_A, DELIVER_TO: "smtp://mx", ALIASES_FILE: "/a" }).message).toMatch(/^configuration: ALIASES_FILE is for an LMTP target only/);
    // Unset: LMTP_HOST/LMTP_PORT as before, no target of its own.
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, LMTP_HOST: "/run/lmtp" })).not.toHaveProperty("deliverTo");
  });

  test("BODY_IDLE_SECONDS in whole seconds, 1 to 60; 0, 61 or a fraction is refused with its name", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, BODY_IDLE_SECONDS: "3" }).bodyIdleMs).toBe(3_000);
    expect(refusal({ API_KEY: KEY_A, BODY_IDLE_SECONDS: "61" }).message).toContain("at most 60");
    expect(refusal({ API_KEY: KEY_A, BODY_IDLE_SECONDS: "0" }).message).toContain("BODY_IDLE_SECONDS");
    expect(refusal({ API_KEY: KEY_A, BODY_IDLE_SECONDS: "1.5" }).message).toContain("BODY_IDLE_SECONDS");
  });

  test("RSPAMD_URL: unset, no spam filter; set, rspamd's URL with a 10 s limit (RSPAMD_TIMEOUT_MS), and only with a spool", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A }).rspamd).toBeUndefined();
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, RSPAMD_URL: "" }).rspamd).toBeUndefined();
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, SPOOL_DIR: "/s", RSPAMD_URL: "http://rspamd:11333" }).rspamd).toEqual({ url: "http://rspamd:11333", timeoutMs: 10_000 });
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, SPOOL_DIR: "/s", RSPAMD_URL: "https://filter.example/rspamd/", RSPAMD_TIMEOUT_MS: "2500" }).rspamd).toEqual({
      url: "https://filter.example/rspamd/",
      timeoutMs: 2500,
    });
    expect(refusal({ API_KEY: KEY_A, RSPAMD_URL: "http://rspamd:11333" }).message).toMatch(/^configuration: RSPAMD_URL needs SPOOL_DIR/);
  });

  test("a bad RSPAMD_URL or RSPAMD_TIMEOUT_MS stops start-up with one line naming it, and never shows a password", () => {
    const bad = (v: Record<string, string>) => refusal({ API_KEY: KEY_A, SPOOL_DIR: "/s", RSPAMD_URL: "http://rspamd:11333", ...v }).message;
    expect(bad({ RSPAMD_URL: "rspamd:11333" })).toMatch(/^configuration: RSPAMD_URL must be (a URL|http)/);
    expect(bad({ RSPAMD_URL: "unix:/run/rspamd.sock" })).toMatch(/^configuration: RSPAMD_URL must be http:\/\/ or https:\/\//);
    expect(bad({ RSPAMD_URL: "http://user:s3cret-pw@rspamd:11333" })).toBe("configuration: RSPAMD_URL must not hold a user or password (rspamd's normal worker asks for none)");
    expect(bad({ RSPAMD_URL: "http://rspamd:11333/?x=1" })).toMatch(/^configuration: RSPAMD_URL must not have a query/);
    expect(bad({ RSPAMD_TIMEOUT_MS: "50" })).toMatch(/^configuration: RSPAMD_TIMEOUT_MS must be at least 100/);
    expect(bad({ RSPAMD_TIMEOUT_MS: "25000" })).toMatch(/^configuration: RSPAMD_TIMEOUT_MS must be at most 20000/);
    expect(bad({ RSPAMD_TIMEOUT_MS: "soon" })).toMatch(/^configuration: RSPAMD_TIMEOUT_MS must be a number/);
    for (const m of [bad({ RSPAMD_URL: "http://user:s3cret-pw@rspamd:11333" })]) expect(m).not.toContain("s3cret");
  });

  test("an empty variable means unset: the default applies", () => {
    const c = fromEnv(ServerEnv, { API_KEY: KEY_A, LMTP_HOST: "", LMTP_PORT: "", PORT: "" });
    expect([c.lmtpHost, c.lmtpPort, c.port]).toEqual(["dovecot", 2525, 8080]);
  });

  test("settings are read", () => {
    const c = fromEnv(ServerEnv, {
      API_KEY: KEY_A,
      LMTP_HOST: "/run/dovecot/lmtp",
      LMTP_PORT: "24",
      PORT: "9000",
      HOST: "0.0.0.0",
      MAX_MESSAGE_BYTES: "1048576",
    });
    expect(c).toMatchObject({ lmtpHost: "/run/dovecot/lmtp", lmtpPort: 24, port: 9000, host: "0.0.0.0", maxMessageBytes: 1048576 });
  });

  test("no key at all -> ConfigError naming API_KEY", () => {
    expect(refusal({}).message).toMatch(/^configuration: API_KEY is not set/);
    expect(refusal({ API_KEY: "", API_KEYS: " , " }).message).toMatch(/^configuration: API_KEY is not set/);
  });

  test(`a key of ${MIN_KEY_LENGTH - 1} characters is refused, ${MIN_KEY_LENGTH} accepted`, () => {
    const short = "s".repeat(MIN_KEY_LENGTH - 1);
    const e = refusal({ API_KEY: short });
    expect(e.message).toContain("API_KEY");
    expect(e.message).toContain(`shorter than ${MIN_KEY_LENGTH}`);
    expect(fromEnv(ServerEnv, { API_KEY: "s".repeat(MIN_KEY_LENGTH) }).apiKeys).toHaveLength(1);
  });

  test("a key with whitespace inside is refused", () => {
    expect(refusal({ API_KEY: `${KEY_A.slice(0, 20)} ${KEY_A.slice(20)}` }).message).toBe("configuration: API_KEY contains whitespace");
  });

  test("API_KEYS: a comma list, all accepted, merged with API_KEY without duplicates", () => {
    expect(fromEnv(ServerEnv, { API_KEYS: `${KEY_A}, ${KEY_B}` }).apiKeys).toEqual([KEY_A, KEY_B]);
    expect(fromEnv(ServerEnv, { API_KEYS: `${KEY_A},${KEY_B}`, API_KEY: KEY_A }).apiKeys).toEqual([KEY_A, KEY_B]);
  });

  test("a short key in API_KEYS is named by its place in that list", () => {
    expect(refusal({ API_KEYS: `${KEY_A},,tooshort` }).message).toMatch(/^configuration: API_KEYS \(key 3\) is shorter/);
  });

  test("a short API_KEY next to good API_KEYS names API_KEY, not a list position", () => {
    expect(refusal({ API_KEYS: `${KEY_A},${KEY_B}`, API_KEY: "tooshort" }).message).toMatch(/^configuration: API_KEY is shorter/);
  });

  test.each([
    ["LMTP_PORT", "abc"],
    ["LMTP_PORT", "0"],
    ["LMTP_PORT", "70000"],
    ["LMTP_PORT", "25.5"],
    ["PORT", "http"],
    ["MAX_MESSAGE_BYTES", "-1"],
    ["MAX_MESSAGE_BYTES", "lots"],
  ])("%s=%s -> ConfigError naming it", (name, value) => {
    const e = refusal({ API_KEY: KEY_A, [name]: value });
    expect(e.message).toStartWith(`configuration: ${name} `);
  });

  test("the error message never contains a key value", () => {
    const cases: Record<string, string>[] = [
      { API_KEY: "short-secret-value-1234" },
      { API_KEY: `${KEY_A} x` },
      { API_KEYS: `${KEY_A},short-secret-value-1234` },
      { API_KEY: KEY_A, LMTP_PORT: "abc" },
      { API_KEYS: KEY_B, PORT: "-3" },
    ];
    for (const env of cases) {
      const message = refusal(env).message;
      expect(message.split("\n")).toHaveLength(1);
      for (const secret of ["short-secret-value-1234", KEY_A, KEY_B]) {
        expect(message).not.toContain(secret);
        expect(message).not.toContain(secret.slice(0, 10));
      }
    }
  });
});

describe("Cloudflare Access on the host (ACCESS_TEAM_DOMAIN, ACCESS_AUD, ACCESS_CERTS_URL)", () => {
  const AUD_1 = "0f".repeat(32);
  const AUD_2 = "A1".repeat(32);

  test("unset: off (no access settings)", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A }).access).toBeUndefined();
  });

  test("both set: the issuer Access writes, the AUD tags, the certs at the team domain", () => {
    expect(fromEnv(ServerEnv, { API_KEY: KEY_A, ACCESS_TEAM_DOMAIN: "MyTeam.cloudflareaccess.com", ACCESS_AUD: ` ${AUD_1} , ${AUD_2},` }).access).toEqual({
      issuer: "https://myteam.cloudflareaccess.com",
      audiences: [AUD_1, AUD_2],
      certsUrl: "https://myteam.cloudflareaccess.com/cdn-cgi/access/certs",
    });
  });

  test("the team domain pasted as a URL is taken as the domain; ACCESS_CERTS_URL overrides where the keys come from", () => {
    const c = fromEnv(ServerEnv, { API_KEY: KEY_A, ACCESS_TEAM_DOMAIN: "https://myteam.cloudflareaccess.com/", ACCESS_AUD: AUD_1, ACCESS_CERTS_URL: "http://127.0.0.1:9/certs" });
    expect(c.access).toEqual({ issuer: "https://myteam.cloudflareaccess.com", audiences: [AUD_1], certsUrl: "http://127.0.0.1:9/certs" });
  });

  test.each([
    [{ ACCESS_TEAM_DOMAIN: "myteam.cloudflareaccess.com" }, "configuration: ACCESS_AUD is not set, but ACCESS_TEAM_DOMAIN is (set both, or neither)"],
    [{ ACCESS_AUD: AUD_1 }, "configuration: ACCESS_TEAM_DOMAIN is not set, but ACCESS_AUD is (set both, or neither)"],
    [{ ACCESS_CERTS_URL: "https://x.example/certs" }, "configuration: ACCESS_CERTS_URL needs ACCESS_TEAM_DOMAIN and ACCESS_AUD"],
    [{ ACCESS_TEAM_DOMAIN: "myteam", ACCESS_AUD: AUD_1 }, "configuration: ACCESS_TEAM_DOMAIN must be the team domain, e.g. myteam.cloudflareaccess.com"],
    [{ ACCESS_TEAM_DOMAIN: "myteam.cloudflareaccess.com", ACCESS_AUD: "myteam" }, "configuration: ACCESS_AUD must be the Access application's AUD tag (64 hex characters), or several, comma-separated"],
    [{ ACCESS_TEAM_DOMAIN: "myteam.cloudflareaccess.com", ACCESS_AUD: ` , ` }, "configuration: ACCESS_AUD must be the Access application's AUD tag (64 hex characters), or several, comma-separated"],
    [{ ACCESS_TEAM_DOMAIN: "myteam.cloudflareaccess.com", ACCESS_AUD: AUD_1, ACCESS_CERTS_URL: "not a url" }, "configuration: ACCESS_CERTS_URL must be a URL"],
  ])("%o -> one line naming it", (extra, line) => {
    expect(refusal({ API_KEY: KEY_A, ...(extra as Record<string, string>) }).message).toBe(line);
  });
});

describe("bun run server.ts", () => {
  test("a short key stops start-up: non-zero exit, one stderr line naming API_KEY, not the key", async () => {
    const key = "SHORTsecret-29-characters-xyz";
    const proc = Bun.spawn([process.execPath, "run", "server.ts"], {
      cwd: path.join(import.meta.dir, ".."),
      // A clean environment: nothing from the caller's own API_KEY/API_KEYS can leak in. HOST is
      // an address this machine does not have, so a server that wrongly starts fails at once
      // instead of listening forever.
      env: { PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", API_KEY: key, HOST: "192.0.2.1" },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [code, stderr, stdout] = await Promise.all([proc.exited, new Response(proc.stderr).text(), new Response(proc.stdout).text()]);
    expect(code).not.toBe(0);
    const lines = stderr.split("\n").filter((l) => l !== "");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain("API_KEY");
    expect(stderr + stdout).not.toContain(key.slice(0, 10));
    // It never got as far as listening.
    expect(stdout).not.toContain("listening");
  });
});
