"""vLLM replicas from DNS (engines.vllm.discovery: dns://HOST:PORT).

A Kubernetes headless Service answers with one A/AAAA record per ready pod, so
re-resolving it tracks replicas as they come, go and are rescheduled. The look-up goes
through the event loop's getaddrinfo (a thread), so a slow DNS never blocks serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^dns://(?P<host>[^/:]+):(?P<port>[0-9]+)$")


def parse_target(target: str) -> tuple[str, int]:
    match = _TARGET.match(target)
    if match is None:
        raise ValueError(f"not a dns://HOST:PORT discovery target: {target!r}")
    return match["host"], int(match["port"])


def replica_url(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}"


class DnsReplicas:
    """Resolves a discovery target to replica URLs, sorted (the same on every gateway)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.host, self.port = parse_target(target)

    async def __call__(self) -> list[str] | None:
        """The replicas now; None when DNS did not answer (keep the ones known: a DNS
        hiccup must not take every replica out of rotation)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("vLLM discovery: %s did not resolve: %s", self.host, exc)
            return None
        addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
        return sorted(replica_url(address, self.port) for address in addresses)
