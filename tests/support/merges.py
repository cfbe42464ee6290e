"""Shared inputs for merge/export/jobs tests: real adapters and two distinct full models
(each the base with a random adapter merged in), built once per session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.adapters import HF_DIR, make_adapter
from tests.support.servers import DATA_DIR, ROOT

GGUF = DATA_DIR / "models" / "smollm2-135m-instruct" / "model.gguf"


def cli(*argv: str, data_dir: Path, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    """`tuneserve ARGV` in a subprocess, on `data_dir`, with the prepared base model."""
    command = [sys.executable, "-m", "tuneserve.cli.main", *argv, "--data_dir", str(data_dir),
               "--model.hf_path", str(HF_DIR), "--model.gguf_path", str(GGUF)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def job_of(result: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def merge_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge-work")


@pytest.fixture(scope="session")
def adapters(merge_work: Path) -> list[Path]:
    paths = []
    for seed in (1, 2):
        path = merge_work / f"adapter{seed}"
        make_adapter(path, seed=seed)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def full_models(merge_work: Path, adapters: list[Path]) -> list[Path]:
    """Two full HF models: the base with adapter 1, and with adapter 2, merged in
    through `tuneserve merge` (operation merge_adapter)."""
    outs = []
    for i, adapter in enumerate(adapters, 1):
        config = write_yaml(merge_work / f"merge-adapter{i}.yaml",
                            {"operation": "merge_adapter", "base": str(HF_DIR), "adapter": str(adapter)})
        out = merge_work / f"full{i}"
        cli("merge", str(config), "--out", str(out), data_dir=merge_work / "data")
        outs.append(out)
    return outs
