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
# What the gateway's metrics label requests without a tenant ("none"), an admin's
# ("admin") and the base model's ("base") with: a tenant or adapter of that name would
# share their series, telling whoever reads /metrics nothing reliable about either.
# Refused for new names only; what is already stored stays readable and removable.
RESERVED_NAMES = frozenset({"none", "admin", "base"})


def reserved_name_error(value: str) -> str | None:
    if value in RESERVED_NAMES:
        return f"{value!r} is reserved (a metrics label value: {', '.join(sorted(RESERVED_NAMES))}); choose another name"
    return None


def is_valid_name(value: str) -> bool:
    # Engine names join tenant, adapter and version with '--'; allowing it inside a name
    # would let tenant 'a--b' adapter 'c' and tenant 'a' adapter 'b--c' share an engine
    # name, i.e. one tenant could be served the other's weights.
    # fullmatch, not `$`: `$` also matches before a trailing newline.
    return len(value) <= MAX_NAME_LENGTH and bool(re.fullmatch(NAME_PATTERN, value)) and "--" not in value
