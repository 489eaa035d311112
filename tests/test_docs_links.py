"""Every relative link of README.md and docs/*.md resolves: the file exists and an `#anchor` names a heading.

Anchors follow GitHub's slug rule: lowercase, drop every character but letters, digits, `_`, `-` and
spaces, spaces become hyphens; a repeated heading gets `-1`, `-2`, ... Links and headings inside code
(fenced blocks, inline spans) are ignored; http(s) and mailto links are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

EXTERNAL = re.compile(r"^(https?|mailto):", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else INLINE_CODE.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """`FILE:LINE: [text](target): why` for every relative link of `path` that does not resolve."""
    problems = []
    text = path.read_text(encoding="utf-8")
    # Join the prose so a link whose text wraps onto the next line is found; keep line numbers by offset.
    prose = "\n".join(_prose_lines(text))
    for match in LINK.finditer(prose):
        target = match.group(2)
        line = prose.count("\n", 0, match.start()) + 1
        where = f"{path.relative_to(REPO)}:{line}: [{' '.join(match.group(1).split())}]({target})"
        if not target:
            problems.append(f"{where}: empty target")
            continue
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{where}: no such file {resolved}")
            continue
        if anchor:
            if resolved.suffix != ".md" or resolved.is_dir():
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(resolved):
                problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name}" in readme, page.name


def test_the_checker_catches_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Weights & Biases\n\n## Results\n\n## Results\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n## What's here?\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#weights--biases) [ok](docs/a.md#results-1) [ok](#whats-here)\n"
        "[ok](https://example.org/x) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n\n"
        "[bad file](docs/b.md) [bad anchor](docs/a.md#weights-biases)\n[bad same-file\nanchor](#title-1)\n"
    )
    problems = broken_links(tmp_path / "README.md")
    assert len(problems) == 3, problems
    assert "[bad file](docs/b.md): no such file" in problems[0]
    assert "[bad anchor](docs/a.md#weights-biases): no heading #weights-biases" in problems[1]
    assert problems[2].startswith("README.md:13: [bad same-file anchor](#title-1): no heading #title-1")
    assert slug("Differences from ProAssist's evaluator") == "differences-from-proassists-evaluator"
    assert slug("GPU machines, air-gapped nodes and models") == "gpu-machines-air-gapped-nodes-and-models"
