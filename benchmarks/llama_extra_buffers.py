"""What llama.cpp's extra buffer types (weight repacking, and AMX on Intel) are worth on
this host: generation and prompt tokens/s with `use_extra_bufts` on and off, per GGUF
type (the served Q8_0, the f16, and Q4_0/Q4_K_M quantized from it, the types repacking
serves). `engines.llamacpp.extra_buffer_types: auto` turns them off only on AMX hosts;
this measures what that choice would cost elsewhere.
Writes benchmarks/results/llama_extra_buffers.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import alternating_rounds, write_result  # before the project imports: it puts the repo root on sys.path

from tests.support.servers import DATA_DIR, MODEL
from tuneserve.gguf.llama_loader import ExtraBufferTypes, llama_runtime, load_llama
from tuneserve.gguf.quantize import quantize_gguf
from tuneserve.models.chat_template import ChatTemplate

MESSAGES = [{"role": "user", "content": "Write a long essay about the history of the sea."}]


class Runner:
    """One loaded model; each call generates `max_tokens` greedily from a fresh cache."""

    def __init__(self, gguf: Path, mode: ExtraBufferTypes, prompt: str, threads: int) -> None:
        self.llama = load_llama(gguf, extra_buffer_types=mode, n_ctx=1024, n_threads=threads, n_threads_batch=threads)
        self.tokens = self.llama.tokenize(prompt.encode(), add_bos=False, special=True)

    def __call__(self, max_tokens: int) -> dict[str, float]:
        self.llama.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for _ in self.llama.generate(self.tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
            first = first or time.perf_counter()
            n += 1
            if n >= max_tokens:
                break
        end = time.perf_counter()
        return {"prompt_tokens_per_s": round(len(self.tokens) / (first - start), 1),
                "generation_tokens_per_s": round((n - 1) / (end - first), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    model_dir = DATA_DIR / "models" / MODEL
    prompt = ChatTemplate.from_hf_dir(model_dir / "hf").render(MESSAGES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-bufts-") as work:
        ggufs = {"Q8_0": model_dir / "model.gguf", "F16": model_dir / "model.f16.gguf"}
        for ftype in ("Q4_0", "Q4_K_M"):
            ggufs[ftype] = Path(work) / f"{ftype}.gguf"
            quantize_gguf(model_dir / "model.f16.gguf", ggufs[ftype], ftype)
        for ftype, gguf in ggufs.items():
            on, off = (Runner(gguf, mode, prompt, args.threads) for mode in ("on", "off"))
            on(8), off(8)  # warm caches
            rounds, ratio = alternating_rounds(
                {"on": lambda on=on: on(args.max_tokens), "off": lambda off=off: off(args.max_tokens)},
                args.rounds,
                rate=lambda r: r["generation_tokens_per_s"],
            )
            results[ftype] = {
                "rounds": rounds,
                "generation_on_median": statistics.median(r["on"]["generation_tokens_per_s"] for r in rounds),
                "generation_off_median": statistics.median(r["off"]["generation_tokens_per_s"] for r in rounds),
                "prompt_on_median": statistics.median(r["on"]["prompt_tokens_per_s"] for r in rounds),
                "prompt_off_median": statistics.median(r["off"]["prompt_tokens_per_s"] for r in rounds),
                "generation_off_over_on": round(ratio, 4),
            }
            on.llama.close(), off.llama.close()
    write_result("llama_extra_buffers", {
        "setup": f"llama-cpp-python 0.3.36, {MODEL}, greedy, {args.max_tokens} tokens from a "
                 f"{len(prompt)}-character chat prompt, {args.threads} threads; rounds of an 'on' and an 'off' "
                 "run in alternating order",
        "runtime": llama_runtime().model_dump(),
        "types": results,
    })


if __name__ == "__main__":
    main()
