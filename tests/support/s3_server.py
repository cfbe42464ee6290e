"""A real S3-compatible server for tests: moto's server on loopback, in its own venv.

moto implements S3's HTTP API (buckets, multipart uploads, checksums, DeleteObjects),
is maintained and installs from PyPI; MinIO is neither on PyPI nor in Debian. It lives
in .venv-s3 (requirements/s3-test-server.txt, made by `make service-tools`) so its Flask
stack stays out of the product's lock. State is in memory: a restart comes back empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.support.local_process import LocalProcess
from tests.support.servers import ROOT, free_port

S3_PYTHON = ROOT / ".venv-s3" / "bin" / "python"
# moto accepts any credentials; boto3 only needs some to sign with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tuneserve-test", "AWS_SECRET_ACCESS_KEY": "tuneserve-test-secret"}
REGION = "us-east-1"


class S3Server(LocalProcess):
    name = "moto.server"
    poll_s = 0.1

    def __init__(self, directory: Path) -> None:
        super().__init__(directory / "moto.log")
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not S3_PYTHON.exists():
            raise RuntimeError(f"{S3_PYTHON} is missing: run `make service-tools` (moto, the tests' S3 server)")
        return [str(S3_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
