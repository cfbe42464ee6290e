"""Adapter uploads through a real gateway (`tuneserve serve`, real archives, the real
registry): a tenant's catastrophic regex never stalls the gateway, and a broken upload
is a 4xx that names what is wrong, reveals no server path and stores nothing."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from tuneserve.adapters.tenant_regex import CPU_BUDGET_S

# The bound: /health answers within this while an upload is being validated.
HEALTH_BOUND_S = 0.1
# Catastrophic backtracking on every module name it does not match (minutes per name in
# `re`), quick on those it does: q_proj and v_proj, what the adapter really adapts.
CATASTROPHIC_TARGETS = r"(.|.?)+(q|v)_proj"
PICKLE_70KB = pickle.dumps(["x" * 70_000, {"lr": 1e-4}])


class Gateway:
    def __init__(self, server: ServerProcess, data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir

    def upload(self, name: str, archive: bytes) -> httpx.Response:
        return httpx.post(
            self.server.base_url + "/v1/adapters",
            data={"name": name},
            files={"file": ("adapter.tar.gz", archive, "application/gzip")},
            timeout=120,
        )

    def stored(self) -> list[str]:
        listed = httpx.get(self.server.base_url + "/v1/adapters", timeout=30).json()["data"]
        on_disk = sorted(p.name for p in (self.data_dir / "adapters").glob("*/*") if p.is_dir())
        return sorted({a["id"] for a in listed} | set(on_disk))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Auth off: every request is the admin acting for tenant "default".
    data_dir = tmp_path_factory.mktemp("upload-data")
    model_dir = DATA_DIR / "models" / MODEL
    server = gateway(
        "gw-uploads",
        {"data_dir": data_dir, "model.hf_path": model_dir / "hf", "model.gguf_path": model_dir / "model.gguf"},
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    ).start()
    try:
        yield Gateway(server, data_dir)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    make_adapter(out, target_modules=["q_proj", "v_proj"])
    return out


def edited(adapter: Path, tmp: Path, **changes: Any) -> Path:
    copy = tmp / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


def _health_latency(client: httpx.Client) -> float:
    started = time.perf_counter()
    assert client.get("/health").status_code == 200
    return time.perf_counter() - started


def test_health_stays_fast_while_a_catastrophic_regex_is_refused(gw: Gateway, adapter: Path, tmp_path: Path) -> None:
    archive = tar_gz_bytes(edited(adapter, tmp_path, target_modules=CATASTROPHIC_TARGETS))
    answers: list[httpx.Response] = []
    # A daemon: if the gateway froze, the test fails on a /health timeout, not at exit.
    upload = threading.Thread(target=lambda: answers.append(gw.upload("slow-regex", archive)), daemon=True)
    with httpx.Client(base_url=gw.server.base_url, timeout=10) as client:
        # This machine's own latency, now and under the same load: the bound is on top of it.
        baseline = max(_health_latency(client) for _ in range(20))
        started = time.monotonic()
        upload.start()
        during = []
        while upload.is_alive():
            during.append(_health_latency(client))
            time.sleep(0.01)
        took = time.monotonic() - started
    upload.join()

    assert answers and answers[0].status_code == 400, answers[0].text if answers else "no answer"
    error = answers[0].json()["error"]
    assert error["code"] == "invalid_config"
    assert "target_modules regex" in error["message"] and "takes too long to match" in error["message"]
    # The pattern ran for its whole budget (a CPU second) while /health was polled.
    assert took >= CPU_BUDGET_S and len(during) >= 10
    assert max(during) < HEALTH_BOUND_S + baseline, (max(during), baseline, sorted(during)[-5:])
    assert "slow-regex" not in gw.stored()


def _tar(adapter: Path, member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(adapter, arcname="adapter")
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def replacing(filename: str, data: bytes) -> Callable[[Path, Path], bytes]:
    def build(adapter: Path, tmp: Path) -> bytes:
        copy = edited(adapter, tmp)
        (copy / filename).write_bytes(data)
        return tar_gz_bytes(copy)

    return build


def _deep_config(adapter: Path, tmp: Path) -> bytes:
    copy = edited(adapter, tmp)
    path = copy / "adapter_config.json"
    path.write_text(path.read_text()[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return tar_gz_bytes(copy)


# (id, archive from the good adapter dir and a tmp dir, status, code, what the message names)
BAD_UPLOADS: list[tuple[str, Callable[[Path, Path], bytes], int, str, str]] = [
    ("nested-archive", lambda a, t: tar_gz_bytes(a, {"weights.tar.gz": tar_gz_bytes(a)}), 400, "unexpected_file", "adapter/weights.tar.gz"),
    ("pickle-opening-with-a-70kB-string", lambda a, t: tar_gz_bytes(a, {"optimizer.state": PICKLE_70KB}), 400, "unexpected_file", "optimizer.state"),
    ("pickle-as-readme", replacing("README.md", PICKLE_70KB), 400, "unexpected_file", "README.md"),
    ("fake-safetensors", replacing("adapter_model.safetensors", struct.pack("<Q", 1 << 40) + b"{}"), 400, "invalid_weights", "adapter_model.safetensors"),
    ("deep-config", _deep_config, 400, "invalid_config", "levels deep"),
    ("alpha-key-not-a-regex", lambda a, t: tar_gz_bytes(edited(a, t, alpha_pattern={"q_proj(": 32})), 400, "invalid_config", "alpha_pattern key"),
    ("base-home-of-unknown-user", lambda a, t: tar_gz_bytes(edited(a, t, base_model_name_or_path="~unknown-user-7f3a/m")), 400, "base_mismatch", "base_model_name_or_path"),
    ("base-with-nul-byte", lambda a, t: tar_gz_bytes(edited(a, t, base_model_name_or_path="/models/m\x00")), 400, "base_mismatch", "base_model_name_or_path"),
    ("300-byte-name", lambda a, t: _tar(a, "adapter/" + "x" * 300, b"x"), 400, "invalid_archive", "xxxxxxxxxxxxxxxxxxxx"),
    ("5000-byte-path", lambda a, t: _tar(a, "a/" * 2500 + "README.md", b"x"), 400, "unexpected_file", "a/a/a/a/a/"),
    ("300-byte-top-dir", lambda a, t: _tar(a, "x" * 300 + "/README.md", b"x"), 400, "invalid_archive", "xxxxxxxxxxxxxxxxxxxx"),
]


@pytest.mark.parametrize(("build", "status", "code", "names"), [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_4xx_that_name_the_problem_and_store_nothing(
    gw: Gateway, adapter: Path, tmp_path: Path, build: Callable[[Path, Path], bytes], status: int, code: str, names: str
) -> None:
    r = gw.upload("broken", build(adapter, tmp_path))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and names in error["message"], error
    for server_detail in (str(gw.data_dir), str(DATA_DIR), "/tmp", ".adapter-upload-", "/upload-", "Errno"):
        assert server_detail not in error["message"], error
    assert "broken" not in gw.stored()
    assert not list(gw.data_dir.glob(".adapter-upload-*"))


def test_a_good_upload_is_stored(gw: Gateway, adapter: Path) -> None:
    """The same gateway, archive and tenant take a good adapter: the refusals above are
    the files' doing."""
    r = gw.upload("good", tar_gz_bytes(adapter, {"tokenizer_config.json": b"{}"}))
    assert r.status_code == 201, r.text
    assert "good" in gw.stored()
