"""A real Redis for tests: Debian's /usr/bin/redis-server on loopback, in a tmp dir.

Nothing is persisted (`--save '' --appendonly no`), so a restart comes back empty, as a
Redis that lost its state would. Tests stop and restart it to see the gateways' policy
for an unreachable Redis.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.local_process import LocalProcess
from tests.support.servers import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer(LocalProcess):
    name = "redis-server"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory / "redis.log")
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "no",
        ]

    def restart(self) -> None:
        """On the same port: clients see the same URL come back (empty)."""
        self.stop()
        self.start()

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def start_redis(directory: Path) -> RedisServer:
    if shutil.which(REDIS_SERVER) is None:
        raise RuntimeError(f"{REDIS_SERVER} is missing: apt-get install redis-server")
    return RedisServer(directory).start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
