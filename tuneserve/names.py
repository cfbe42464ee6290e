"""Names of tenants and adapters: one rule for both, since both become path components
and parts of engine-side adapter names."""

from __future__ import annotations

import re

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
MAX_NAME_LENGTH = 64
NAME_RULES = (
    "use lowercase letters, digits, '.', '_' and '-' (never '--'), starting with a letter "
    f"or digit, at most {MAX_NAME_LENGTH} characters"
)


def is_valid_name(value: str) -> bool:
    # Engine names join tenant, adapter and version with '--'; allowing it inside a name
    # would let tenant 'a--b' adapter 'c' and tenant 'a' adapter 'b--c' share an engine
    # name, i.e. one tenant could be served the other's weights.
    # fullmatch, not `$`: `$` also matches before a trailing newline.
    return len(value) <= MAX_NAME_LENGTH and bool(re.fullmatch(NAME_PATTERN, value)) and "--" not in value
