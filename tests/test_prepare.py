"""The prepared default model: the GGUF llama.cpp serves is the type the marker records,
a Q8_0 only when it passed the quality gate, and an older layout is rebuilt, not reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.servers import DATA_DIR, MODEL
from tuneserve.errors import ModelPreparationError
from tuneserve.gguf.llama_loader import gguf_file_type
from tuneserve.models import prepare
from tuneserve.models.prepare import F16_GGUF_NAME, GGUF_NAME, MARKER

MODEL_DIR = DATA_DIR / "models" / MODEL
def test_the_served_gguf_is_the_recorded_type_and_q8_0_only_past_the_gate() -> None:
    marker = json.loads((MODEL_DIR / MARKER).read_text())
    assert marker["gguf_type"] in ("Q8_0", "F16")
    assert gguf_file_type(MODEL_DIR / GGUF_NAME) == marker["gguf_type"]
    assert gguf_file_type(MODEL_DIR / F16_GGUF_NAME) == "F16"
    gate = marker["q8_0_gate"]
    assert gate["passed"] == (marker["gguf_type"] == "Q8_0")
    assert gate["passed"] == (not gate["failures"])


def test_a_dir_prepared_with_an_older_layout_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(MODEL_DIR / "hf", model_dir / "hf")
    (model_dir / GGUF_NAME).write_bytes(b"GGUF")
    (model_dir / MARKER).write_text(json.dumps({"hf": "hf", "gguf": GGUF_NAME}))  # layout 1: no f16

    def no_source() -> Path:
        raise ModelPreparationError("rebuild attempted")

    monkeypatch.setattr(prepare, "find_source_gguf", no_source)
    with pytest.raises(ModelPreparationError, match="rebuild attempted"):
        prepare.prepare_default_model(model_dir)
    assert (model_dir / GGUF_NAME).read_bytes() == b"GGUF"  # the failed rebuild left it as it was

    (model_dir / MARKER).write_text(json.dumps({"layout": prepare.LAYOUT, "hf": "hf", "gguf": GGUF_NAME}))
    with pytest.raises(ModelPreparationError, match="rebuild attempted"):  # the f16 is missing
        prepare.prepare_default_model(model_dir)
    (model_dir / F16_GGUF_NAME).write_bytes(b"GGUF")
    assert prepare.prepare_default_model(model_dir).reused
