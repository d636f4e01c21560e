"""MkDocs hooks: what GitHub and MkDocs read differently in the pages of docs/.

- A page shows a benchmark chart as `../bench/results/...png`, the path GitHub resolves from
  docs/. MkDocs resolves the link to the same `../` path: `on_files` adds each chart a page
  links to the site's files under that path (copied to `bench/results/...` in the site), so
  the link works in both, and a link to a chart that does not exist still fails
  `mkdocs build --strict`. Only charts a page links are published, and only regular files
  inside bench/results: a symbolic link (which could point anywhere) is left out, and so
  fails the build as a missing chart.
- A pipe inside a code span in a table is written `\\|` (GitHub's tables need it);
  Python-Markdown's tables already leave pipes inside code spans alone and would show the
  backslash: `on_page_markdown` drops it there.
"""

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

CHARTS = "bench/results"  # from the repository's root, the directory above docs/
TABLE_ROW = re.compile(r"^\|.*$", re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`]*`")
LINKED_CHART = re.compile(r"\.\./(" + re.escape(CHARTS) + r"/[^)\s\"'<>]+\.png)")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs = Path(config.docs_dir)
    root = docs.parent
    charts = (root / CHARTS).resolve()
    linked: set[str] = set()
    for page in docs.rglob("*.md"):
        linked.update(LINKED_CHART.findall(page.read_text(encoding="utf-8")))
    for uri in sorted(linked):
        chart = root / uri
        if chart.is_symlink() or not chart.is_file() or not chart.resolve().is_relative_to(charts):
            continue  # a missing page link: --strict fails on it
        files.append(
            File(
                f"../{uri}",
                src_dir=str(docs),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
                dest_uri=uri,
                inclusion=InclusionLevel.INCLUDED,
            )
        )
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def row(m: re.Match[str]) -> str:
        return CODE_SPAN.sub(lambda c: c.group(0).replace("\\|", "|"), m.group(0))

    return TABLE_ROW.sub(row, markdown)
