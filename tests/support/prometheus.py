"""A real Prometheus (Debian's package, `make deploy-tools`) for tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.servers import ROOT, ServerProcess, free_port

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


class Prometheus:
    """Scrapes `targets` ({job: ["host:port"]}) with the project's alert rules loaded.

    `jobs` adds to a job's scrape config, e.g. {"gateway": bearer_token_file(path)}.
    """

    def __init__(
        self,
        workdir: Path,
        targets: dict[str, list[str]],
        interval: str = "1s",
        jobs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `make deploy-tools` (Debian package prometheus)")
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}], **(jobs or {}).get(job, {})}
                for job, hosts in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = ServerProcess(
            "prometheus",
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            port,
        )

    def start(self) -> "Prometheus":
        self.server.start(ready_path="/-/ready", timeout_s=60)
        return self

    def stop(self) -> None:
        self.server.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": start, "end": end, "step": step}
        body = httpx.get(self.url + "/api/v1/query_range", params=params, timeout=60).json()
        assert body["status"] == "success", f"{expr}\n{body}"
        return body["data"]["result"]

    def get(self, path: str, **params: Any) -> Any:
        body = httpx.get(self.url + path, params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]


def host(server: ServerProcess) -> str:
    return server.base_url.removeprefix("http://")


def bearer_token_file(path: Path) -> dict[str, Any]:
    """How deploy/ scrapes the gateway's /metrics: the ServiceMonitor's `authorization`."""
    return {"authorization": {"type": "Bearer", "credentials_file": str(path)}}
