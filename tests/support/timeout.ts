// Preloaded by bunfig.toml: a per-test limit that fits suites starting real Dovecot and workerd.
import { setDefaultTimeout } from "bun:test";

setDefaultTimeout(60_000);
