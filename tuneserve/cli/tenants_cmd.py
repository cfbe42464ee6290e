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
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterator

from tuneserve.audit import AuditLog, open_audit_log
from tuneserve.cli.actor import cli_actor
from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.config import Settings
from tuneserve.db import Store, open_store
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


@dataclass
class _Opened:
    """What a tenants command works on, all on one database connection pool."""

    settings: Settings
    store: Store

    @cached_property
    def tenants(self) -> TenantStore:
        return TenantStore(self.store)

    @cached_property
    def audit(self) -> AuditLog:
        return open_audit_log(self.settings, self.store)

    def registry(self) -> "AdapterRegistry":
        # Imported here: the registry pulls in gguf and numpy, which `tenants list` skips.
        from tuneserve.adapters.registry import AdapterRegistry

        return AdapterRegistry(self.settings, self.store)


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[_Opened]:
    settings = settings_from_args(args)
    with open_store(settings) as store:
        yield _Opened(settings, store)


def _show_key(issued: IssuedKey, what: str) -> None:
    print(issued.api_key.get_secret_value())
    print(
        f"{what}. The new API key (id {issued.tenant.key_id}) is printed only this once: "
        "store it now.",
        file=sys.stderr,
    )


def run_create(args: argparse.Namespace) -> int:
    with _open(args) as opened, opened.audit.recording(cli_actor(), "tenant.create", args.name) as details:
        created: list[IssuedKey] = []
        leftovers = opened.registry().remove_tenant(
            args.name, lambda: created.append(opened.tenants.create(args.name))
        )
        issued = created[0]
        details["key_id"] = issued.tenant.key_id
        if leftovers.adapters:
            details["removed_leftover_adapters"] = [r.name for r in leftovers.adapters]
    _show_key(issued, f"created tenant '{args.name}'")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    with _open(args) as opened, opened.audit.recording(cli_actor(), "tenant.rotate_key", args.name) as details:
        issued = opened.tenants.rotate(args.name)
        details["key_id"] = issued.tenant.key_id
    _show_key(issued, f"rotated the key of tenant '{args.name}'; the old key no longer works")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _open(args) as opened, opened.audit.recording(cli_actor(), "tenant.delete", args.name) as details:
        removed = opened.registry().remove_tenant(args.name, lambda: opened.tenants.delete(args.name))
        details["removed_adapters"] = [r.name for r in removed.adapters]
    # Running gateways unload them within adapters.reconcile_interval_s.
    print(f"deleted tenant '{args.name}' and {len(removed.adapters)} adapter(s)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _open(args) as opened:
        rows = [tenant.model_dump(mode="json") for tenant in opened.tenants.list()]
    print(json.dumps(rows, indent=2))
    return 0
