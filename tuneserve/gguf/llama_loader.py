"""The one way a GGUF is loaded into llama.cpp here: serving, the quality gate,
agreement checks, export, tests and benchmarks all call `load_llama`.

Why one loader: on Intel Xeons with AMX (Sapphire Rapids and later: `amx_int8` in
/proc/cpuinfo) llama.cpp puts Q8_0 weights in its AMX "extra buffer type" and segfaults
in that matmul on the first decode (upstream llama.cpp #20824). The model parameter
`use_extra_bufts = false` keeps weights in plain CPU buffers and avoids it. It also turns
off weight repacking (the CPU_REPACK buffer, which speeds Q4_0/Q4_K/IQ4_NL on AVX2), so
it is applied only where the AMX path can be taken: mode "auto" (the default) turns
extra buffer types off when the CPU reports AMX or llama.cpp was built with it, and
keeps them elsewhere. `benchmarks/llama_extra_buffers.py` measures what it costs.

llama-cpp-python's `Llama` builds its `llama_model_params` inside `__init__` from
`llama_model_default_params()` and exposes no `use_extra_bufts` argument, so that one
function is wrapped (once, per thread) to apply the choice made here.
"""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from llama_cpp import Llama

ExtraBufferTypes = Literal["auto", "on", "off"]

AMX_CPU_FLAGS = ("amx_int8", "amx_tile", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


class LlamaRuntime(BaseModel):
    """What llama.cpp runs on this host, for `/ready`, `models show` and the gate's logs."""

    system_info: str  # llama.cpp's own line: the CPU features its kernels use
    amx_cpu: bool  # the CPU reports AMX
    amx_build: bool  # llama.cpp was compiled with its AMX path
    extra_buffer_types: bool  # what loads use now
    mode: ExtraBufferTypes
    why: str

    def summary(self) -> dict[str, Any]:
        """What /ready, `models show` and the prepared model's record show."""
        return {"system_info": self.system_info, "extra_buffer_types": self.extra_buffer_types, "why": self.why}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first `flags` line of /proc/cpuinfo (empty off Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=1)
def llama_system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def decide_extra_buffer_types(
    mode: ExtraBufferTypes, flags: frozenset[str], system_info: str
) -> tuple[bool, str]:
    """Whether loads use extra buffer types, and the reason in words."""
    if mode == "on":
        return True, "engines.llamacpp.extra_buffer_types: on"
    if mode == "off":
        return False, "engines.llamacpp.extra_buffer_types: off"
    amx_cpu, amx_build = _amx_cpu(flags), _amx_build(system_info)
    if amx_cpu or amx_build:
        where = "the CPU reports AMX" if amx_cpu else "llama.cpp was built with AMX"
        return False, f"auto: off, {where} (llama.cpp's AMX matmul segfaults on Q8_0, llama.cpp #20824)"
    return True, "auto: on, no AMX on this host"


def _amx_cpu(flags: frozenset[str]) -> bool:
    return any(flag in flags for flag in AMX_CPU_FLAGS)


def _amx_build(system_info: str) -> bool:
    return "AMX_INT8 = 1" in system_info


def llama_runtime(mode: ExtraBufferTypes = "auto") -> LlamaRuntime:
    flags, info = cpu_flags(), llama_system_info()
    enabled, why = decide_extra_buffer_types(mode, flags, info)
    return LlamaRuntime(
        system_info=info,
        amx_cpu=_amx_cpu(flags),
        amx_build=_amx_build(info),
        extra_buffer_types=enabled,
        mode=mode,
        why=why,
    )


_choice = threading.local()
_install_lock = threading.Lock()
_installed = False


def _install_params_hook() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        import llama_cpp.llama_cpp as bindings

        upstream = bindings.llama_model_default_params

        def default_params() -> Any:
            params = upstream()
            chosen = getattr(_choice, "use_extra_bufts", None)
            if chosen is not None:
                params.use_extra_bufts = chosen
            return params

        bindings.llama_model_default_params = default_params
        _installed = True


@contextlib.contextmanager
def _extra_buffer_types(enabled: bool) -> Iterator[None]:
    _install_params_hook()
    previous = getattr(_choice, "use_extra_bufts", None)
    _choice.use_extra_bufts = enabled
    try:
        yield
    finally:
        _choice.use_extra_bufts = previous


def load_llama(model_path: Path | str, *, extra_buffer_types: ExtraBufferTypes = "auto", **kwargs: Any) -> "Llama":
    """`llama_cpp.Llama(model_path, **kwargs)` with this host's extra-buffer choice."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    if kwargs.get("vocab_only"):  # no weights, no buffers: nothing to choose
        return Llama(model_path=str(model_path), **kwargs)
    with _extra_buffer_types(llama_runtime(extra_buffer_types).extra_buffer_types):
        return Llama(model_path=str(model_path), **kwargs)


def gguf_file_type(path: Path) -> str:
    """The GGUF's `general.file_type` as llama.cpp names it (Q8_0, F16, ...), from its
    header alone."""
    from gguf import GGUFReader

    field = GGUFReader(str(path), "r").get_field("general.file_type")
    if field is None:
        return "unknown"
    return file_type_name(int(field.contents()))


def file_type_name(value: int) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {value}"
