"""Every link from the README or docs/ to a section of a docs page names a heading that exists
(GitHub's anchors), so a renamed section cannot leave a README number pointing nowhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(((?:docs/)?[\w./-]*\.md)#([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings: lower case, punctuation dropped, spaces to hyphens,
    ``-1``, ``-2``, ... on repeats (code blocks skipped)."""
    out, seen, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not (m := re.match(r"#{1,6} (.+)", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_section_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        for target, frag in LINK.findall(page.read_text()):
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif frag not in anchors(path):
                broken.append(f"{page.name}: {target}#{frag}")
            checked += 1
    assert checked > 10 and not broken, "\n".join(broken)
