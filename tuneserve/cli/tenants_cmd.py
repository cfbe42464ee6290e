"""`tuneserve tenants`: create, list and delete tenants; rotate their API keys.

A new key is printed once, alone on stdout, so `KEY=$(tuneserve tenants create acme)`
captures it; the database keeps only its hash. Changes are recorded in the audit log
with actor "cli:<os user>".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Iterator

from tuneserve.audit import AuditLog, audit_path
from tuneserve.cli.actor import cli_actor
from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.db import open_store
from tuneserve.names import NAME_RULES
from tuneserve.tenants.store import IssuedKey, TenantStore

if TYPE_CHECKING:
    from tuneserve.adapters.registry import AdapterRegistry


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tenants", help="manage tenants and their API keys")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    name_help = f"tenant name: {NAME_RULES}"
    for action, help_text, handler in (
        ("create", "create a tenant and print its API key (shown once)", run_create),
        ("delete", "delete a tenant and its adapters; its key stops working at once", run_delete),
        ("rotate-key", "issue a new API key (shown once); the old one stops working", run_rotate),
    ):
        command = actions.add_parser(action, help=help_text)
        command.add_argument("name", help=name_help)
        add_settings_arguments(command)
        command.set_defaults(handler=handler)
    listing = actions.add_parser("list", help="list tenants as JSON (never their keys)")
    add_settings_arguments(listing)
    listing.set_defaults(handler=run_list)


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[tuple[TenantStore, AuditLog]]:
    settings = settings_from_args(args)
    with open_store(settings) as store:
        yield TenantStore(store), AuditLog(audit_path(settings.data_dir))


def _registry(args: argparse.Namespace) -> "AdapterRegistry":
    # Imported here: the registry pulls in gguf and numpy, which `tenants list` skips.
    from tuneserve.adapters.registry import AdapterRegistry

    return AdapterRegistry(settings_from_args(args))


def _show_key(issued: IssuedKey, what: str) -> None:
    print(issued.api_key.get_secret_value())
    print(
        f"{what}. The new API key (id {issued.tenant.key_id}) is printed only this once: "
        "store it now.",
        file=sys.stderr,
    )


def run_create(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(cli_actor(), "tenant.create", args.name) as details:
            created: list[IssuedKey] = []
            leftovers = _registry(args).remove_tenant(args.name, lambda: created.append(tenants.create(args.name)))
            issued = created[0]
            details["key_id"] = issued.tenant.key_id
            if leftovers.adapters:
                details["removed_leftover_adapters"] = [r.name for r in leftovers.adapters]
    _show_key(issued, f"created tenant '{args.name}'")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(cli_actor(), "tenant.rotate_key", args.name) as details:
            issued = tenants.rotate(args.name)
            details["key_id"] = issued.tenant.key_id
    _show_key(issued, f"rotated the key of tenant '{args.name}'; the old key no longer works")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, audit):
        with audit.recording(cli_actor(), "tenant.delete", args.name) as details:
            removed = _registry(args).remove_tenant(args.name, lambda: tenants.delete(args.name))
            details["removed_adapters"] = [r.name for r in removed.adapters]
    # Running gateways unload them within adapters.reconcile_interval_s.
    print(f"deleted tenant '{args.name}' and {len(removed.adapters)} adapter(s)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _open(args) as (tenants, _):
        rows = [tenant.model_dump(mode="json") for tenant in tenants.list()]
    print(json.dumps(rows, indent=2))
    return 0
