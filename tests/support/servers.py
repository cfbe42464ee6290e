"""Real servers for tests: the gateway (`tuneserve serve`) and vLLM, as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tuneserve.config import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parents[2]
MODEL = DEFAULT_MODEL_ID
DATA_DIR = Path(os.environ.get("TUNESERVE_DATA_DIR", ROOT / "data")).resolve()
LOG_DIR = ROOT / ".pytest_cache" / "server-logs"
# The tiny model answers well only in float32; eager mode skips minutes of torch.compile.
TEST_VLLM_LAUNCH = {"dtype": "float32", "extra_args": ["--enforce-eager", "--compilation-config", '{"mode": 0}']}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.base_url = f"http://127.0.0.1:{port}"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, ready_path: str = "/health", timeout_s: float = 120) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            start_new_session=True,
        )
        wait_http(self.base_url + ready_path, timeout_s, self.process, self.log_path)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # The whole process group: a gateway's launched vLLM goes too.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def gateway(name: str, settings: dict[str, Any], env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "tuneserve.cli.main", "serve", "--server.port", str(port)]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    return ServerProcess(name, command, port, {"TUNESERVE_DATA_DIR": str(DATA_DIR), **(env or {})})


def vllm_server(port: int | None = None, **vllm_settings: Any) -> ServerProcess:
    from serving.engines.vllm_launcher import vllm_command, vllm_env
    from tuneserve.config import VLLMConfig, VLLMLaunchConfig, load_settings

    settings = load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)})
    port = port or free_port()
    vllm = VLLMConfig(launch=VLLMLaunchConfig(port=port, **TEST_VLLM_LAUNCH), **vllm_settings)
    command = vllm_command(vllm, settings.resolved_hf_path(), settings.model.name, settings.model.max_model_len)
    return ServerProcess("vllm", command, port, vllm_env(vllm.launch))
