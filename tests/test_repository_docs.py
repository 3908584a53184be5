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


# ---------------------------------------------------------------------------------------
# Links between the repository's Markdown files resolve

LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)[^`].*?\1", re.DOTALL)


def markdown_files() -> list[Path]:
    return [p for p in text_files() if p.suffix == ".md"]


def prose(text: str) -> str:
    """The text links are read from: fenced blocks and code spans hold examples, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return broken


def test_relative_links_in_markdown_resolve():
    files = markdown_files()
    assert any(p == ROOT / "docs" / "results.md" for p in files)
    found = [b for p in files for b in broken_links(p)]
    assert not found, "\n".join(found)


def test_link_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n[ok](a.md#title-here) [gone](b.md) [bad](a.md#nowhere)\n"
                                   "`[in code](c.md)` ![img](a.md) [web](https://example.org/x)\n")
    assert broken_links(tmp_path / "a.md", tmp_path) == ["a.md: b.md (no such file)",
                                                          "a.md: a.md#nowhere (no such heading)"]


# ---------------------------------------------------------------------------------------
# The text names runs by what they are and dates them, never by how the work was organised

SESSION = re.compile(r"\bsessions?[ -]\d", re.IGNORECASE)
HISTORY = ROOT / "docs" / "history.md"


def test_no_session_numbers_outside_the_history_pages_note_on_dates():
    found, in_history = [], []
    for p in text_files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if SESSION.search(line):
                (in_history if p == HISTORY else found).append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    assert len(in_history) <= 1, "docs/history.md explains the old numbering once:\n" + "\n".join(in_history)


# ---------------------------------------------------------------------------------------
# The README's "library in brief" runs as written


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The library in brief", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m, "README.md's 'The library in brief' has no python block"
    return m.group(1)


def test_readme_library_example_runs_as_written(monkeypatch):
    import torch

    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (The library in brief)", "exec"), namespace)
    image = namespace["image"]
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert image.std() > 0.05, "the example's image is flat"
