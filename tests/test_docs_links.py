"""Every relative link and image in the repository's Markdown points at a file that exists.

Covers README.md, docs/**/*.md (the results pages and their plots included) and any other tracked ``.md`` outside
hidden folders and virtual environments. A link is ``[text](target)`` or ``![alt](target)``; web, mail and
same-page (``#anchor``) targets are not checked, and a ``#anchor`` after a file name is dropped before the check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def markdown_files() -> list[Path]:
    """The Markdown files a reader of this checkout sees (not under hidden folders, virtual envs or run outputs)."""
    skip = {"venv", "runs", "node_modules", "build", "dist"}
    files = []
    for folder, subfolders, names in os.walk(ROOT):  # pruned as it goes: a virtual env holds thousands of files
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skip]
        files += [Path(folder) / name for name in names if name.endswith(".md")]
    return sorted(files)


def broken_links(path: Path) -> list[str]:
    """The relative link targets of ``path`` with no file or folder behind them."""
    bad = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            bad.append(target)
    return bad


def test_every_relative_link_in_the_docs_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files and any(p.parent.name == "results" for p in files)
    broken = {str(p.relative_to(ROOT)): bad for p in files if (bad := broken_links(p))}
    assert not broken, f"links to files that do not exist (add the file or fix the link): {broken}"


def test_the_link_check_finds_a_missing_target(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.png").write_bytes(b"")
    page.write_text("![plot](there.png) [ok](there.png#top) [web](https://x.org) [gone](missing.md) "
                    "![gone too](sub/plot.png) [anchor](#section)\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md", "sub/plot.png"]
