"""`tuneserve adapters`: add, list and remove tenants' LoRA adapters.

Each command prints JSON on stdout (a record, or a list of them); a rejected adapter
is a TuneserveError, which main() prints as one line and exits 2. Adding and removing
are audited (actor "cli:<os user>"). With auth enabled, adding needs the tenant to
exist, checked under the registry's lock as the gateway does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tuneserve.audit import open_audit_log
from tuneserve.cli.actor import cli_actor
from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.config import Settings
from tuneserve.db import Store, is_shared, open_store
from tuneserve.tenants.store import TenantStore

if TYPE_CHECKING:
    from tuneserve.adapters.registry import AdapterRegistry


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("adapters", help="manage tenants' LoRA adapters")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="validate a PEFT LoRA adapter, convert it to GGUF and store it as the next version",
        description="Validate a PEFT LoRA adapter (a directory, or a .tar.gz/.zip of one), "
        "convert it to a GGUF LoRA for llama.cpp and store it as the tenant's next version "
        "of NAME, which becomes current.",
    )
    add.add_argument("tenant", metavar="TENANT")
    add.add_argument("name", metavar="NAME")
    add.add_argument("path", metavar="PATH", type=Path, help="adapter dir, .tar.gz or .zip")
    add_settings_arguments(add)
    add.set_defaults(handler=run_add)

    list_ = actions.add_parser("list", help="list current adapter versions (of one tenant)")
    list_.add_argument("tenant", metavar="TENANT", nargs="?")
    add_settings_arguments(list_)
    list_.set_defaults(handler=run_list)

    remove = actions.add_parser("remove", help="delete every version of a tenant's adapter")
    remove.add_argument("tenant", metavar="TENANT")
    remove.add_argument("name", metavar="NAME")
    add_settings_arguments(remove)
    remove.set_defaults(handler=run_remove)


def _registry(settings: Settings, store: Store | None) -> AdapterRegistry:
    # Imported here: the registry pulls in gguf and numpy, which other commands skip.
    from tuneserve.adapters.registry import AdapterRegistry

    return AdapterRegistry(settings, store)


@contextlib.contextmanager
def _database(settings: Settings, for_tenant_check: bool = False) -> Iterator[Store | None]:
    """The database when the command needs it: always when it is shared (it holds the
    registry's index and the audit trail), else only to check the tenant exists. The
    embedded default's registry commands touch nothing but the adapter files."""
    if not (is_shared(settings) or for_tenant_check):
        yield None
        return
    with open_store(settings) as store:
        yield store


def run_add(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    target = f"{args.tenant}/{args.name}"
    with _database(settings, for_tenant_check=settings.auth.enabled) as store:
        with open_audit_log(settings, store).recording(cli_actor(), "adapter.add", target, source="cli") as details:
            owner_exists = None
            if store is not None and settings.auth.enabled:
                tenants = TenantStore(store)
                owner_exists = lambda: tenants.get(args.tenant)  # noqa: E731 - one use, under the lock
            record = _registry(settings, store).add_version(args.tenant, args.name, args.path, owner_exists).record
            details["version"] = record.version
    print(record.model_dump_json(indent=2))
    return 0


def run_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    with _database(settings) as store:
        records = _registry(settings, store).list(args.tenant)
    print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    target = f"{args.tenant}/{args.name}"
    with _database(settings) as store:
        with open_audit_log(settings, store).recording(cli_actor(), "adapter.delete", target) as details:
            record = _registry(settings, store).remove(args.tenant, args.name)
            details["version"] = record.version
    # Running gateways unload it within adapters.reconcile_interval_s.
    print(record.model_dump_json(indent=2))
    return 0
