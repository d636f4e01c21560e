"""The documentation as the tests read it: README.md (the landing page) and the pages of docs/.

Tests that hold an example or a claim of the documentation to the code find it by its heading,
so they keep working when a section moves from one page to another.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^(#{1,6}) (.+)$")


def pages() -> list[Path]:
    """README.md and every page of docs/ (docs/index.md mirrors the README: left out)."""
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")
    return [ROOT / "README.md", *docs]


def section(title: str) -> str:
    """The text under the one heading called `title` (any level, in any page), up to the next
    heading of the same or a higher level. Lines inside code blocks are never headings."""
    found: list[str] = []
    for page in pages():
        fence = False
        level = 0  # of the heading found, while in its section
        for line in page.read_text().split("\n"):
            if line.lstrip().startswith("```"):
                fence = not fence
            m = None if fence else HEADING.match(line)
            if level and m and len(m.group(1)) <= level:
                level = 0
            if level:
                found.append(line)
            elif m and m.group(2) == title:
                assert not found, f"two headings called {title!r}"
                level = len(m.group(1))
    assert found, f"no heading called {title!r} in README.md or docs/"
    return "\n".join(found)
