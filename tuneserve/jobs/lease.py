"""Who owns a job, and for how long: an owner id and a lease, so that jobs can run on
any machine sharing the database.

The owner is "host:pid:start:nonce". On the owner's own host its liveness is read
from the kernel at once (pid + start time, so a recycled pid does not count); any
other host cannot see that process and waits for the lease to expire instead: a job
whose owner stopped renewing its lease for LEASE_S is failed by whoever looks next.
The nonce tells apart two runners of one process (threads). Hosts' clocks are
compared through the lease times, so they must agree to well within LEASE_S (NTP).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import NamedTuple

from tuneserve.processes import process_alive, process_start_time

# Renewed by every heartbeat (runner.HEARTBEAT_S): many beats may fail (a database
# restart, a long pause) before a live job is given up.
LEASE_S = 30.0


class Owner(NamedTuple):
    host: str
    pid: int
    start: str
    nonce: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}:{self.nonce}"

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def alive_here(self) -> bool:
        return process_alive(self.pid, self.start)


def new_owner() -> Owner:
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, process_start_time(pid) or "", secrets.token_hex(4))


def parse_owner(text: str | None) -> Owner | None:
    """None for rows from before owners were recorded (one host: read their pid)."""
    if not text:
        return None
    host, pid, start, nonce = text.rsplit(":", 3)
    return Owner(host, int(pid), start, nonce)


def lease_until(now: float | None = None) -> float:
    return (time.time() if now is None else now) + LEASE_S
