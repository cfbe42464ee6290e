"""Is the process that wrote a record still the one running? Jobs and staging dirs record
their owner as (pid, start time): a recycled pid then does not count as the owner."""

from __future__ import annotations

import os
from pathlib import Path


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone.

    Off Linux (no /proc) a live pid gives "" so only its existence is compared."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    # Field 22 counted after the ")" that closes the command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int | None, start: str | None) -> bool:
    if pid is None:
        return False
    now = process_start_time(pid)
    return now is not None and (not start or not now or now == start)
