"""GGUF quantization through llama.cpp's own `llama_model_quantize`."""

from __future__ import annotations

import ctypes
from pathlib import Path

from tuneserve.errors import TuneserveError


class QuantizationError(TuneserveError):
    pass


# llama.cpp ftype names users pick from, mapped to llama_cpp constants.
FTYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def quantize_gguf(
    source: Path, dest: Path, ftype: str, allow_requantize: bool = False, threads: int = 0
) -> None:
    import llama_cpp

    if ftype not in FTYPES:
        raise QuantizationError(f"unknown quantization {ftype!r}; choose one of {sorted(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.allow_requantize = allow_requantize
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(dest).encode(), ctypes.byref(params)
    )
    if rc != 0 or not dest.is_file():
        raise QuantizationError(f"llama_model_quantize {source} -> {ftype} failed (rc={rc})")
