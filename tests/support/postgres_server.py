"""A real PostgreSQL for tests (and benchmarks/scale_out_store.py), from Debian's packages.

One server per test session: initdb into a temp dir, started with pg_ctl on 127.0.0.1
(a free port) with its unix socket in the same dir, durability off (fsync,
synchronous_commit, full_page_writes: a crashed test server is thrown away anyway).
PostgreSQL refuses to run as root, so when the tests run as root (CI) every server
command runs as the `postgres` user through runuser, in a dir that user owns (not
under pytest's tmp dir, which is root's alone). Each test gets a database of its own
(`CREATE DATABASE` takes milliseconds), so tests never share state.

Missing binaries fail the test with how to install them, never skip it.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.support.servers import free_port

if TYPE_CHECKING:
    from tuneserve.config import StoreConfig
    from tuneserve.db.postgres import PostgresStore

RUN_AS = "postgres"  # Debian's package creates this user
INSTALL_HINT = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `make service-tools`"
_names = itertools.count()


class PostgresMissing(RuntimeError):
    pass


def postgres_bin() -> Path:
    """The newest installed major version's bin dir."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise PostgresMissing(INSTALL_HINT)
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self, root: Path, port: int, bin_dir: Path) -> None:
        self.root, self.port, self.bin_dir = root, port, bin_dir
        self.data, self.sockets, self.log = root / "data", root / "s", root / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [*_as_server_user(), str(self.bin_dir / args[0]), *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.is_file() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr or done.stdout}\n{log}")

    def start(self) -> "PostgresServer":
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        return self

    def stop_keeping_data(self) -> None:
        """An outage: the server goes away, its data stays for start(). A fast stop, so
        the writes that synchronous_commit=off still held reach the disk."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _as_server_user() -> list[str]:
    return ["runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []


def start_postgres() -> PostgresServer:
    """initdb and start a server in a new temp dir (the caller stops it)."""
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="tuneserve-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise PostgresMissing("runuser is missing: it runs PostgreSQL as a non-root user")
        shutil.chown(root, RUN_AS, RUN_AS)
    (root / "s").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root / "s", RUN_AS, RUN_AS)
    server = PostgresServer(root, free_port(), bin_dir)
    try:
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        for _ in range(3):  # the free port may be taken before the server binds it
            try:
                return server.start()
            except RuntimeError:
                server.port = free_port()
        return server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = start_postgres()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN to an empty database of this test's own."""
    return postgres_server.create_database()


def migrated_store(dsn: str, config: "StoreConfig | None" = None) -> "PostgresStore":
    """A PostgresStore on `dsn` after `tuneserve db migrate`'s migration."""
    from tuneserve.config import StoreConfig
    from tuneserve.db.postgres import PostgresStore, migrate

    config = config or StoreConfig()
    migrate(dsn, config)
    return PostgresStore(dsn, config)
