// ALIASES_FILE: the operator's aliases for an LMTP target (Dovecot alone), in Postfix's virtual(5)
// form, expanded before delivery. Postfix's own rules, so that a file can move between the two:
//
//   # a comment (a whole line)
//   info@example.com        alice@example.com
//   sales@example.com       alice@example.com, bob@example.com
//   postmaster@example.com  admin@example.org
//   @example.com            catchall@example.com     (every address of the domain without a line of its own)
//
// A line starting with blanks continues the one before. Keys and targets are whole addresses
// (case does not matter); a target may be an alias itself, and a target equal to the address
// being expanded is delivered there (Postfix's "user@x user@x, copy@y"). A loop, or more than
// MAX_ADDRESSES addresses from one recipient, is refused when the file is loaded, with its line.
//
// The step (expandAliases) turns the envelope's recipients into the addresses they reach, each
// once, delivers to those, and answers for the addresses the sender used.

import { readFileSync, watch, type FSWatcher } from "node:fs";
import { readFile } from "node:fs/promises";
import { basename, dirname } from "node:path";
import type { Deliverer, InboundMessage } from "../shared/app.ts";
import { addressProblem, mailboxKey, type RecipientResult } from "../shared/contract.ts";
import type { LogWriter } from "../shared/log.ts";
import { isAccepted, isPermanent, isTemporary } from "../shared/replies.ts";

/** Postfix's virtual_alias_expansion_limit. */
export const MAX_ADDRESSES = 1000;

export class AliasError extends Error {
  override name = "AliasError";
}

type Entry = { targets: string[]; line: number };

/** A parsed file: look-ups and expansion. Immutable; a reload makes a new one. */
export class AliasMap {
  private readonly memo = new Map<string, string[]>();

  private constructor(private readonly entries: ReadonlyMap<string, Entry>) {}

  static readonly empty = new AliasMap(new Map());

  get size(): number {
    return this.entries.size;
  }

  /** Parses virtual(5) text; throws AliasError naming the line of the first problem. */
  static parse(text: string): AliasMap {
    const entries = new Map<string, Entry>();
    for (const { line, content } of logicalLines(text)) {
      const [key = "", ...rest] = content.split(/[\s,]+/).filter(Boolean);
      const pattern = key.toLowerCase();
      if (rest.length === 0) throw new AliasError(`line ${line}: ${key} has no target address`);
      const keyProblem = pattern.startsWith("@") ? (/^@[^\s@]+\.[^\s@]+$/.test(pattern) ? null : "is not @domain") : addressProblem(pattern);
      if (keyProblem) throw new AliasError(`line ${line}: ${key} ${keyProblem} (a key is user@domain or @domain)`);
      for (const target of rest) {
        const problem = addressProblem(target);
        if (problem) throw new AliasError(`line ${line}: target ${target} ${problem}`);
      }
      const earlier = entries.get(pattern);
      if (earlier) throw new AliasError(`line ${line}: ${key} is listed again (first on line ${earlier.line})`);
      entries.set(pattern, { targets: rest, line });
    }
    const map = new AliasMap(entries);
    // Every key expanded once now: a loop or an expansion too large is refused here, not at delivery.
    for (const pattern of entries.keys()) map.expand(pattern);
    return map;
  }

  /**
   * The addresses `address` reaches, each once (one per mailbox), in the order first reached, as
   * the file writes them; [address] when it is no alias. Exact lines first, then the domain's
   * catch-all. A key matches in any case; which mailbox a target is stays Dovecot's to say.
   */
  expand(address: string): string[] {
    const a = address.toLowerCase();
    if (!this.entryFor(a)) return [address];
    const known = this.memo.get(a);
    if (known) return known;
    const out = new Map<string, string>();
    this.walk(a, [], out, new Set());
    if (out.size > MAX_ADDRESSES) throw new AliasError(`line ${this.entryFor(a)!.line}: ${a} reaches more than ${MAX_ADDRESSES} addresses`);
    const list = [...out.values()];
    // Kept for the file's own keys only: the addresses that reach a catch-all are as many as
    // senders make up (a dictionary attack on the domain), and each kept would stay until a reload.
    if (this.entries.has(a)) this.memo.set(a, list);
    return list;
  }

  private entryFor(address: string): Entry | undefined {
    return this.entries.get(address) ?? (address.startsWith("@") ? undefined : this.entries.get(address.slice(address.lastIndexOf("@"))));
  }

  /**
   * Depth first from an alias (`key`, in lower case); `path` is the chain of aliases that led here
   * (a target on it is a loop), `done` the aliases already expanded into `out` (reached again
   * through another, they add nothing). `out`: each mailbox reached, with the address as written.
   */
  private walk(key: string, path: string[], out: Map<string, string>, done: Set<string>): void {
    const entry = this.entryFor(key)!;
    if (done.has(key)) return;
    for (const target of entry.targets) {
      if (out.size > MAX_ADDRESSES) return;
      const t = target.toLowerCase();
      // "user@x user@x, copy@y": delivered here too. A target that is no alias is delivered.
      if (t === key || !this.entryFor(t)) reach(out, target);
      else if (path.includes(t)) {
        throw new AliasError(`line ${entry.line}: ${[...path, key, t].filter((a) => !a.startsWith("@")).join(" -> ")} is a loop`);
      } else this.walk(t, [...path, key], out, done);
    }
    done.add(key);
  }
}

/** An address reached, once per mailbox (mailboxKey: Dovecot folds ASCII letters, nothing else), in the first form reached. */
function reach(out: Map<string, string>, address: string): void {
  const mailbox = mailboxKey(address);
  if (!out.has(mailbox)) out.set(mailbox, address);
}

/** Lines without comments and blank lines, continuation lines joined, each with its first line number. */
function logicalLines(text: string): { line: number; content: string }[] {
  const out: { line: number; content: string }[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    if (/^\s*(#|$)/.test(raw)) return;
    if (/^\s/.test(raw) && out.length) out[out.length - 1]!.content += " " + raw.trim();
    else out.push({ line: i + 1, content: raw.trim() });
  });
  return out;
}

/**
 * The file on disk, loaded at start-up (a bad file stops it: AliasError) and again when it changes
 * or on reload() (SIGHUP): a file that does not load then keeps the previous map, and says why.
 */
export class AliasesFile {
  private map: AliasMap = AliasMap.empty;
  private text: string | null = null;
  private watcher: FSWatcher | null = null;
  private reloading: Promise<void> = Promise.resolve();

  private constructor(
    readonly path: string,
    private readonly log: LogWriter,
  ) {}

  /** Loads the file (at start-up: synchronously) and watches it; throws AliasError if it does not load. */
  static open(path: string, log: LogWriter): AliasesFile {
    const file = new AliasesFile(path, log);
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (e) {
      throw new AliasError(`cannot be read: ${(e as Error).message}`);
    }
    file.map = AliasMap.parse(text);
    file.text = text;
    log({ event: "aliases_loaded", file: path, entries: file.map.size });
    // The folder, not the file: editors and config tools replace a file by renaming another onto it.
    file.watcher = watch(dirname(path), (_event, name) => {
      if (name === null || name === basename(path)) void file.reload();
    });
    return file;
  }

  get current(): AliasMap {
    return this.map;
  }

  /** Reads the file again; one reload at a time. Resolves once it is done, whatever came of it. */
  reload(): Promise<void> {
    this.reloading = this.reloading.then(async () => {
      let text: string;
      try {
        text = await readFile(this.path, "utf8");
      } catch (e) {
        this.log({ event: "aliases_not_reloaded", file: this.path, error: `cannot be read: ${(e as Error).message}`, kept: this.map.size });
        return;
      }
      if (text === this.text) return;
      const unfinished = unfinishedFile(text);
      if (unfinished) {
        this.log({ event: "aliases_not_reloaded", file: this.path, error: unfinished, kept: this.map.size });
        return;
      }
      try {
        this.map = AliasMap.parse(text);
        this.text = text;
        this.log({ event: "aliases_loaded", file: this.path, entries: this.map.size });
      } catch (e) {
        this.log({ event: "aliases_not_reloaded", file: this.path, error: (e as Error).message, kept: this.map.size });
      }
    });
    return this.reloading;
  }

  close(): void {
    this.watcher?.close();
  }
}

/**
 * Why a changed file looks like one still being written, or null. An editor that writes in place
 * (nano, vim, `cat > aliases`) empties the file, then writes it a piece at a time, and each step is
 * a change the folder watch reports: read then, the file is empty (every alias gone: mail to info@
 * went to Dovecot as it is and bounced), or it ends inside a line, whose cut address is an address
 * too. A whole file ends with a line end, as editors write it; one without (or empty) is not used
 * until a later change makes it whole. At start-up any file that parses is taken.
 */
function unfinishedFile(text: string): string | null {
  if (text === "") return "is empty, as a file still being written: kept the previous map (for no aliases at all, leave a comment line in it)";
  if (!text.endsWith("\n")) return "does not end with a line end, as a file still being written: kept the previous map until it does";
  return null;
}

/** The envelope's recipients expanded: the addresses to deliver to, and where each came from. */
export interface Expansion {
  /** Each address reached, once, in order. */
  to: string[];
  /** Each recipient the sender used, with the addresses it reached. */
  reached: Map<string, string[]>;
  /** Each delivered address that is not one the sender used, with the first that reached it (ORCPT). */
  original: Map<string, string>;
}

export function expandRecipients(map: AliasMap, recipients: readonly string[]): Expansion {
  /** Mailbox -> the form delivered to: one reached twice, in any case of its ASCII letters, is delivered once. */
  const to = new Map<string, string>();
  const reached = new Map<string, string[]>();
  const original = new Map<string, string>();
  const asSent = new Set(recipients.map(mailboxKey));
  for (const recipient of recipients) {
    // Not an alias: the address goes on as the sender wrote it.
    const addresses = map.expand(recipient);
    reached.set(
      recipient,
      addresses.map((a) => {
        const key = mailboxKey(a);
        if (!to.has(key)) to.set(key, a);
        if (!asSent.has(key) && !original.has(a)) original.set(a, recipient);
        return to.get(key)!;
      }),
    );
  }
  return { to: [...to.values()], reached, original };
}

/**
 * One result per address the sender used, from the results for the addresses it reached: any
 * temporary one makes it temporary (offered again; what was delivered is recorded, and a repeat
 * of those is not delivered twice); all refused for good makes it refused; otherwise it is
 * accepted (queued if any is), and a target refused among delivered ones is named in its reply.
 */
export function foldResults(expansion: Expansion, results: readonly RecipientResult[]): RecipientResult[] {
  const byAddress = new Map(results.map((r) => [r.address, r]));
  return [...expansion.reached].map(([recipient, addresses]) => {
    const rs = addresses.map((a) => byAddress.get(a)).filter((r): r is RecipientResult => r !== undefined);
    // No alias (or its own mailbox in another case): its result as it is, under the sender's address.
    if (addresses.length === 1 && mailboxKey(addresses[0]!) === mailboxKey(recipient) && rs.length === 1) return { ...rs[0]!, address: recipient };
    const via = ` (alias of ${addresses.join(", ")})`;
    const temporary = rs.find(isTemporary) ?? (rs.length < addresses.length ? undefined : null);
    if (temporary !== null) {
      const t = temporary ?? { code: 451, enhanced: "4.3.0", reply: "451 4.3.0 no reply for an address of this alias" };
      return { address: recipient, code: t.code, enhanced: t.enhanced, reply: t.reply + via };
    }
    const refused = rs.filter(isPermanent);
    if (refused.length === rs.length) return { address: recipient, code: refused[0]!.code, enhanced: refused[0]!.enhanced, reply: refused.map((r) => r.reply).join("; ") + via };
    const taken = rs.filter(isAccepted);
    const { duplicate: _, ...first } = taken.find((r) => r.queued) ?? taken[0]!;
    const notes = refused.length ? `; refused: ${refused.map((r) => r.reply).join("; ")}` : "";
    // A duplicate only when every address it reached had it already.
    return { ...first, address: recipient, reply: first.reply + via + notes, ...(taken.every((r) => r.duplicate) ? { duplicate: true } : {}) };
  });
}

/** The step before delivery: the recipients expanded, the delivery, the results folded back. */
export function expandAliases(aliases: { current: AliasMap }, deliver: Deliverer): Deliverer {
  return async (message: InboundMessage) => {
    const expansion = expandRecipients(aliases.current, message.envelope.to);
    if (expansion.to.length === message.envelope.to.length && expansion.to.every((a, i) => a === message.envelope.to[i])) return deliver(message);
    const results = await deliver({ ...message, envelope: { ...message.envelope, to: expansion.to }, originalRecipients: expansion.original });
    return foldResults(expansion, results);
  };
}
