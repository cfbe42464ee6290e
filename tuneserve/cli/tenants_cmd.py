"""`tuneserve tenants`: create, list and delete tenants; rotate their API keys.

A new key is printed once, alone on stdout, so `KEY=$(tuneserve tenants create acme)`
captures it; the database keeps only its hash. Changes are recorded in the audit log
with actor "cli:<os user>".
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from typing import Iterator

from tuneserve.audit import AuditLog, audit_path
from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.names import NAME_RULES
from tuneserve.store import Store, db_path
from tuneserve.tenants.store import IssuedKey, TenantStore


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tenants", help="manage tenants and their API keys")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    name_help = f"tenant name: {NAME_RULES}"
    for action, help_text, handler in (
        ("create", "create a tenant and print its API key (shown once)", run_create),
        ("delete", "delete a tenant; its key stops working at once", run_delete),
        ("rotate-key", "issue a new API key (shown once); the old one stops working", run_rotate),
    ):
        command = actions.add_parser(action, help=help_text)
        command.add_argument("name", help=name_help)
        add_settings_arguments(command)
        command.set_defaults(handler=handler)
    listing = actions.add_parser("list", help="list tenants as JSON (never their keys)")
    add_settings_arguments(listing)
    listing.set_defaults(handler=run_list)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (containers)
        user = f"uid-{os.getuid()}"
    return f"cli:{user}"


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[tuple[TenantStore, AuditLog]]:
    settings = settings_from_args(args)
    with Store(db_path(settings.data_dir)) as store:
        yield TenantStore(store), AuditLog(audit_path(settings.data_dir))


def _show_key(issued: IssuedKey, what: str) -> None:
    print(issued.api_key.get_secret_value())
    print(
        f"{what}. The new API key (id {issued.tenant.key_id}) is printed only this once: "
        "store it now.",
        file=sys.stderr,
    )


def run_create(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(_actor(), "tenant.create", args.name) as details:
            issued = tenants.create(args.name)
            details["key_id"] = issued.tenant.key_id
    _show_key(issued, f"created tenant '{args.name}'")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(_actor(), "tenant.rotate_key", args.name) as details:
            issued = tenants.rotate(args.name)
            details["key_id"] = issued.tenant.key_id
    _show_key(issued, f"rotated the key of tenant '{args.name}'; the old key no longer works")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(_actor(), "tenant.delete", args.name):
            tenants.delete(args.name)
    print(f"deleted tenant '{args.name}'")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, _):
        rows = [tenant.model_dump(mode="json") for tenant in tenants.list()]
    print(json.dumps(rows, indent=2))
    return 0
