"""A real S3-compatible server for tests: moto's server on loopback, in its own venv.

moto implements S3's HTTP API (buckets, multipart uploads, checksums, DeleteObjects),
is maintained and installs from PyPI; MinIO is neither on PyPI nor in Debian. It lives
in .venv-s3 (requirements/s3-test-server.txt, made by `make service-tools`) so its Flask
stack stays out of the product's lock. State is in memory: a restart comes back empty.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.support.servers import ROOT, free_port

S3_PYTHON = ROOT / ".venv-s3" / "bin" / "python"
# moto accepts any credentials; boto3 only needs some to sign with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tuneserve-test", "AWS_SECRET_ACCESS_KEY": "tuneserve-test-secret"}
REGION = "us-east-1"


class S3Server:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "moto.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> "S3Server":
        if not S3_PYTHON.exists():
            raise RuntimeError(f"{S3_PYTHON} is missing: run `make service-tools` (moto, the tests' S3 server)")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(S3_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.process.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"moto.server not answering on {self.port} after {timeout_s}s: {self._log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
