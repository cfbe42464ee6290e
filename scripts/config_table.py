"""Regenerate README's config reference table from the Settings model.

Usage: .venv/bin/python scripts/config_table.py   (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import readme_section  # noqa: E402
from tuneserve.config import env_name, iter_fields  # noqa: E402


def table() -> str:
    rows = ["| key | default | env | meaning |", "|---|---|---|---|"]
    for key, info in iter_fields():
        default = info.default
        if default is PydanticUndefined and info.default_factory is not None:
            default = info.default_factory()
        if default is None:
            shown = "null"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{key}` | {shown} | `{env_name(key)}` | {info.description} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    return readme_section.render(readme, "config-table", table())


if __name__ == "__main__":
    readme_section.update("config-table", table())
