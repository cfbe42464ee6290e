"""Command-line flags generated from the Settings model, so `--help` covers every key."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic_core import PydanticUndefined

from tuneserve.config import Settings, env_name, iter_fields, load_settings, parse_scalar


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file (env: TUNESERVE_CONFIG). Flags override env, env overrides the file.",
    )
    group = parser.add_argument_group(
        "settings", "every key of the YAML file, as --dotted.key VALUE (values parse as YAML)"
    )
    _add_field_flags(group, Settings, with_env=True)


def settings_from_args(args: argparse.Namespace) -> Settings:
    keys = {key for key, _ in iter_fields()}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in keys}
    return load_settings(getattr(args, "config", None), overrides)


def add_model_arguments(group: argparse._ArgumentGroup, model: type[Any]) -> list[str]:
    """One --dotted.key flag per leaf field of a pydantic config model (no env vars);
    returns the keys, for collecting the given flags back into overrides."""
    return _add_field_flags(group, model, with_env=False)


def _add_field_flags(group: argparse._ArgumentGroup, model: type[Any], with_env: bool) -> list[str]:
    keys = []
    for key, info in iter_fields(model):
        default = info.default
        if default is PydanticUndefined and info.default_factory is not None:
            default = info.default_factory()
        type_name = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
        # A bare boolean flag (--resume) means true; --resume false also parses.
        boolean: dict[str, Any] = {"nargs": "?", "const": True} if info.annotation is bool else {}
        env = f"; env: {env_name(key)}" if with_env else ""
        group.add_argument(
            f"--{key}",
            dest=key,
            metavar=type_name.upper() if type_name else "VALUE",
            type=parse_scalar,
            default=argparse.SUPPRESS,
            help=f"{info.description or ''} [default: {default!r}{env}]".replace("%", "%%"),
            **boolean,
        )
        keys.append(key)
    return keys
