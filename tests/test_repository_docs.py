"""The repository's own docs and comments are self-contained: they cite papers by title, never a
design note or a numbered source file that a user of the repository does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "runtime", "training", "docs", "benchmarks", "experiments", "deploy", "tests")
SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ".html", ".txt", ".cfg"}
OUTSIDE = re.compile(r"design\.md|design card|\bseeds? 0\d\d\b", re.IGNORECASE)


def text_files():
    yield from (p for p in ROOT.iterdir() if p.is_file() and (p.suffix in SUFFIXES or p.name == "Dockerfile"))
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts and p != Path(__file__).resolve():
                yield p


def test_no_reference_to_files_outside_the_repository():
    files = list(text_files())
    assert any(p.name == "README.md" for p in files) and any(p.name == "training.md" for p in files)
    found = []
    for p in files:
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
