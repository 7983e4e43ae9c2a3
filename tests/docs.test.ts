// The docs as a set of pages that point at each other: the README and every page under docs/.
// A relative link must reach a file (and, with #anchor, a heading of it); a Japanese twin
// (x.ja.md) must keep its English page's sections (the same number of `##` headings), so that a
// section added to one is not forgotten in the other; a `bun run NAME` the docs tell an operator
// to type must be a script of package.json or a file. Links to other sites are not followed (no
// network here).

import { describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const ROOT = resolve(import.meta.dir, "..");
const PAGES = ["README.md", ...readdirSync(join(ROOT, "docs")).filter((f) => f.endsWith(".md")).map((f) => `docs/${f}`)].sort();
const SCRIPTS = new Set(Object.keys(JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")).scripts));

/** The page without its fenced code blocks (kept as blank lines, so line numbers stay right). */
function prose(markdown: string): string[] {
  let fenced = false;
  return markdown.split("\n").map((line) => {
    if (/^\s*(```|~~~)/.test(line)) {
      fenced = !fenced;
      return "";
    }
    return fenced ? "" : line;
  });
}

/** GitHub's anchor for a heading: lower case, punctuation dropped (letters of any script kept), spaces to hyphens. */
export function slug(heading: string): string {
  return heading
    .replace(/`/g, "")
    .replace(/\[([^\]]*)\]\([^)]*\)/g, "$1")
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\s_-]/gu, "")
    .replace(/\s/g, "-");
}

/** Every anchor a page offers: its headings' slugs, a repeated one numbered as GitHub does. */
function anchorsOf(markdown: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const line of prose(markdown)) {
    const m = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (!m) continue;
    const base = slug(m[1]!);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  return anchors;
}

export interface Link {
  line: number;
  target: string;
}

/** The relative links of a page (`[text](target)`), outside code blocks and code spans. */
export function linksIn(markdown: string): Link[] {
  const links: Link[] = [];
  prose(markdown).forEach((text, i) => {
    const outsideCode = text.replace(/`[^`]*`/g, "");
    for (const m of outsideCode.matchAll(/\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)) {
      const target = m[1]!;
      if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto: ...
      links.push({ line: i + 1, target });
    }
  });
  return links;
}

/** What is wrong with the links of `page` (a path under ROOT, or any path for `readPage`). */
export function brokenLinks(page: string, markdown: string, readPage = (p: string) => readFileSync(p, "utf8")): string[] {
  const problems: string[] = [];
  for (const { line, target } of linksIn(markdown)) {
    const [path, anchor] = target.split("#", 2) as [string, string | undefined];
    const file = path === "" ? page : resolve(dirname(page), decodeURIComponent(path));
    const where = `${relative(ROOT, page) || page}:${line} -> ${target}`;
    if (path !== "" && !existsSync(file)) {
      problems.push(`${where}: no such file`);
      continue;
    }
    if (anchor === undefined) continue;
    if (!file.endsWith(".md") || (path !== "" && statSync(file).isDirectory())) {
      problems.push(`${where}: an anchor into something that is not a page`);
      continue;
    }
    const body = file === page ? markdown : readPage(file);
    if (!anchorsOf(body).has(decodeURIComponent(anchor).toLowerCase())) problems.push(`${where}: no heading with that anchor`);
  }
  return problems;
}

function sections(markdown: string): string[] {
  return prose(markdown).filter((l) => /^##\s/.test(l));
}

describe("the link checker", () => {
  const page = join(ROOT, "docs", "example.md");
  test("finds a link to a missing file, a missing anchor, and one into a file that is no page", () => {
    const text = "See [x](missing.md), [y](configuration.md#no-such-heading), [z](../package.json#scripts).\n";
    const problems = brokenLinks(page, text);
    expect(problems).toHaveLength(3);
    expect(problems[0]).toContain("missing.md: no such file");
    expect(problems[1]).toContain("no heading with that anchor");
    expect(problems[2]).toContain("not a page");
  });

  test("passes a link to a file, a folder, a heading of another page and one of its own", () => {
    const text = "# Title\n\n## A `code` heading (1.5)\n\n[a](configuration.md) [b](../examples/) [c](../README.md#a-tour) [d](#a-code-heading-15)\n";
    expect(brokenLinks(page, text)).toEqual([]);
  });

  test("skips other sites and whatever is in code", () => {
    const text = "[a](https://example.com/x) `[b](nowhere.md)`\n```\n[c](nowhere.md)\n```\n";
    expect(linksIn(text)).toEqual([]);
  });

  test("slugs as GitHub does, Japanese included", () => {
    expect(slug("ALIASES_FILE (LMTP targets)")).toBe("aliases_file-lmtp-targets");
    expect(slug("1.5 Exactly once (Dovecot's side, optional)")).toBe("15-exactly-once-dovecots-side-optional");
    expect(slug("4.5 エッジスプール（ホストの不在中、R2 に保管されるメール）")).toBe("45-エッジスプールホストの不在中r2-に保管されるメール");
  });
});

describe("the docs", () => {
  test.each(PAGES)("%s: every relative link reaches a file, and a heading when it names one", (page) => {
    const file = join(ROOT, page);
    expect(brokenLinks(file, readFileSync(file, "utf8"))).toEqual([]);
  });

  const twins = PAGES.filter((p) => p.endsWith(".ja.md") && existsSync(join(ROOT, p.replace(/\.ja\.md$/, ".md"))));
  test.each(twins)("%s has its English page's sections", (twin) => {
    const english = sections(readFileSync(join(ROOT, twin.replace(/\.ja\.md$/, ".md")), "utf8"));
    const japanese = sections(readFileSync(join(ROOT, twin), "utf8"));
    expect({ twin, sections: japanese.length }).toEqual({ twin, sections: english.length });
  });

  test("every English page in docs/ has its Japanese twin", () => {
    const english = PAGES.filter((p) => p.startsWith("docs/") && !p.endsWith(".ja.md"));
    expect(english.filter((p) => !existsSync(join(ROOT, p.replace(/\.md$/, ".ja.md"))))).toEqual([]);
  });

  test("every `bun run NAME` is a script of package.json or a file", () => {
    const unknown: string[] = [];
    for (const page of PAGES) {
      readFileSync(join(ROOT, page), "utf8").split("\n").forEach((line, i) => {
        for (const m of line.matchAll(/\bbun (?:--env-file[= ]\S+ )?run ([A-Za-z][A-Za-z0-9:._/-]*)/g)) {
          const name = m[1]!;
          if (!SCRIPTS.has(name) && !existsSync(join(ROOT, name))) unknown.push(`${page}:${i + 1}: bun run ${name}`);
        }
      });
    }
    expect(unknown).toEqual([]);
  });
});
