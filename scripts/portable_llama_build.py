"""Build llama-cpp-python as the Docker image does (the Dockerfile's CMAKE_ARGS default) in
a scratch venv, and check that what it built runs anywhere x86-64-v3 runs: no AVX-512
(zmm registers) or AMX (tile) instructions in llama.cpp's CPU kernels, llama.cpp's own
system info agrees, and it decodes the prepared GGUF through tuneserve's loader.

Dev-only (no Docker engine runs here); ~10 min on 2 cores. Writes
benchmarks/results/portable_llama_build.json.
Usage: .venv/bin/python scripts/portable_llama_build.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_result  # noqa: E402

# Runs on the new build: tuneserve's loader on the prepared model, decode included.
CHECK = """
import json, sys
import llama_cpp
assert llama_cpp.__file__.startswith(sys.argv[2]), llama_cpp.__file__
from tuneserve.gguf.agreement import DecodeCheckRequest, decode_check
from tuneserve.gguf.llama_loader import llama_runtime
result = decode_check(DecodeCheckRequest(gguf=sys.argv[1]))
print(json.dumps({"decode": result.model_dump(), "runtime": llama_runtime().model_dump()}))
"""


def dockerfile_cmake_args() -> str:
    match = re.search(r'^ARG CMAKE_ARGS="([^"]*)"', (ROOT / "Dockerfile").read_text(), re.M)
    if not match:
        raise SystemExit("Dockerfile: no ARG CMAKE_ARGS default")
    return match.group(1)


def llama_version() -> str:
    match = re.search(r"^llama_cpp_python==(\S+)", (ROOT / "requirements" / "cpu.lock").read_text(), re.M | re.I)
    if not match:
        raise SystemExit("requirements/cpu.lock pins no llama_cpp_python")
    return match.group(1)


def instruction_counts(library: Path) -> dict[str, int]:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True).stdout
    return {
        "instructions": text.count("\n"),
        "zmm (AVX-512)": len(re.findall(r"%zmm\d", text)),
        "tile (AMX)": len(re.findall(r"\b(tdpb\w+|tileloadd\w*|ldtilecfg)\b", text)),
    }


def main() -> None:
    cmake_args = dockerfile_cmake_args()
    with tempfile.TemporaryDirectory(prefix="portable-llama-") as work:
        target = Path(work) / "site"
        start = time.monotonic()
        # --no-cache-dir: pip's wheel cache would hand back this host's native build.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", "--target", str(target),
             f"llama-cpp-python=={llama_version()}"],
            check=True, env={**os.environ, "CMAKE_ARGS": cmake_args},
        )
        build_s = time.monotonic() - start
        libs = {lib.name: instruction_counts(lib) for lib in sorted((target / "llama_cpp" / "lib").glob("libggml-cpu.so"))}
        gguf = ROOT / "data" / "models" / "smollm2-135m-instruct" / "model.gguf"
        # The project's interpreter with the new build first on the path.
        check = subprocess.run(
            [sys.executable, "-c", CHECK, str(gguf), str(target)], capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{target}:{ROOT}"},
        )
        if check.returncode != 0:
            raise SystemExit(f"the portable build failed to decode:\n{check.stderr[-3000:]}")
    write_result("portable_llama_build", {
        "cmake_args": cmake_args,
        "build_s": round(build_s),
        "kernels": libs,
        **json.loads(check.stdout.strip().splitlines()[-1]),
        "portable": all(c["zmm (AVX-512)"] == 0 and c["tile (AMX)"] == 0 for c in libs.values()),
    })


if __name__ == "__main__":
    main()
