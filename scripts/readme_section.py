"""README sections generated from code, between `<!-- NAME:start -->` and `<!-- NAME:end -->`
(the config reference, the metric table); tests/test_docs.py checks they are current."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def render(readme: str, name: str, body: str) -> str:
    """`readme` with the section `name` replaced by `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update(name: str, body: str) -> None:
    README.write_text(render(README.read_text(), name, body))
