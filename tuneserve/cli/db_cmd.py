"""`tuneserve db`: the database's schema. `migrate` applies what this version adds;
`status` says where the database stands. Both print JSON.

On PostgreSQL this is the only thing that changes the schema (the gateway and other
commands refuse one that is not current), so run it once per upgrade, before the new
gateways start (the Kubernetes migration Job does). Concurrent runs are safe: they
take an advisory lock. On the embedded SQLite default the schema is migrated on open
anyway; `migrate` there only makes it happen now.
"""

from __future__ import annotations

import argparse
import json

from tuneserve.cli.options import add_settings_arguments, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("db", help="migrate the database's schema, or show its version")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text, handler in (
        ("migrate", "apply the schema migrations this version adds (safe to run concurrently)", run_migrate),
        ("status", "the schema version of the database against this version's", run_status),
    ):
        command = actions.add_parser(action, help=help_text)
        add_settings_arguments(command)
        command.set_defaults(handler=handler)


def run_migrate(args: argparse.Namespace) -> int:
    from tuneserve.db.factory import migrate

    print(json.dumps(migrate(settings_from_args(args)), indent=2))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Exits 0 when the schema is this version's, 1 otherwise (a readiness check)."""
    from tuneserve.db.factory import status

    state = status(settings_from_args(args))
    print(json.dumps(state, indent=2))
    return 0 if state["state"] == "current" else 1
