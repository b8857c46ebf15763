"""The links mkdocs cannot check: README.md's relative links (files, and headings of docs/ pages) and docs/ pages'
links to repository files outside docs/, written from the repository root (`/deploy/README.md`).

`make docs` runs it after `mkdocs build --strict`, which checks the links between docs/ pages. Prints each broken
link as `file:line: target` and exits 1 if there is one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def _prose(text: str) -> str:
    """The text with code blocks and code spans blanked (line numbers kept): links inside code are not links."""
    text = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    return CODE.sub("", text)


def _anchors(page: Path) -> set[str]:
    """The heading ids mkdocs (Python-Markdown's toc) gives a page: code spans count as their text."""
    headings = HEADING.findall(FENCE.sub("", page.read_text()))
    return {slugify(h.replace("`", ""), "-") for h in headings}


def _broken(source: Path, target: str) -> bool:
    path, _, anchor = target.partition("#")
    if not path:  # an anchor of the same page
        return bool(anchor) and anchor not in _anchors(source)
    file = ROOT / path.lstrip("/") if path.startswith("/") else source.parent / path
    if not file.exists():
        return True
    return bool(anchor) and file.suffix == ".md" and anchor not in _anchors(file)


def check(source: Path, only_absolute: bool) -> list[str]:
    """`file:line: target` of each broken link of `source` (only the root-relative ones if `only_absolute`)."""
    out = []
    for n, line in enumerate(_prose(source.read_text()).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or (only_absolute and not target.startswith("/")):
                continue  # a URL (https:, mailto:), or a docs link mkdocs checks
            if _broken(source, target):
                out.append(f"{source.relative_to(ROOT)}:{n}: {target}")
    return out


def main() -> int:
    broken = check(ROOT / "README.md", only_absolute=False)
    for page in sorted((ROOT / "docs").rglob("*.md")):
        broken += check(page, only_absolute=True)
    for b in broken:
        print(f"broken link: {b}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
