"""Who a CLI command acts as, in the audit log: "cli:<os user>"."""

from __future__ import annotations

import getpass
import os


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (containers)
        user = f"uid-{os.getuid()}"
    return f"cli:{user}"
