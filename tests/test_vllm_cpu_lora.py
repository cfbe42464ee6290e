"""The vLLM plugin's CPU LoRA ops: same results as a per-token reference, including
batches that mix adapters and base requests, and the plugin is live in the vLLM the
tests run (its adapter requests are checked against llama.cpp in test_vllm_adapters)."""

from __future__ import annotations

import pytest
import torch

from serving.engines import vllm_cpu_lora as ops
from tests.servers import ServerProcess

SLOTS, RANK, HIDDEN, OUT = 4, 8, 48, 40


def reference(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Row by row: x @ W[slot].T, no LoRA term where the slot is -1."""
    weights = weights.squeeze(1)
    rows = [
        torch.zeros(weights.shape[1]) if slot < 0 else inputs[t] @ weights[slot].T
        for t, slot in enumerate(indices.tolist())
    ]
    return torch.stack(rows)


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    return lora_a, lora_b


@pytest.mark.parametrize(
    "indices",
    [[2, 2, 2, 2, 2], [0, 3, 3, 1, 0, 2], [1, -1, 1, -1, 3], [-1, -1, -1], [3, -1, 0, 0, 2] * 14],
    # A few rows are computed against every slot at once, many (prefill) slot by slot.
    ids=["one-adapter", "four-adapters", "adapters-and-base", "base-only", "many-rows-mixed"],
)
def test_shrink_and_expand_match_the_per_token_reference(weights, indices: list[int]) -> None:
    lora_a, lora_b = weights
    index = torch.tensor(indices)
    x = torch.randn(len(indices), HIDDEN)

    shrunk = torch.zeros(len(indices), RANK)
    ops.bgmv_shrink(x, lora_a, shrunk, index, scaling=0.5)
    torch.testing.assert_close(shrunk, 0.5 * reference(x, lora_a, index))

    y = torch.ones(len(indices), OUT)
    ops.bgmv_expand(shrunk, lora_b, y, index, add_inputs=True)
    torch.testing.assert_close(y, 1 + reference(shrunk, lora_b, index))

    # A slice of a fused output (q, k, v side by side): only that slice changes.
    fused = torch.ones(len(indices), OUT * 3)
    ops.bgmv_expand_slice(shrunk, lora_b, fused, index, OUT, OUT, add_inputs=True)
    torch.testing.assert_close(fused[:, OUT : 2 * OUT], 1 + reference(shrunk, lora_b, index))
    torch.testing.assert_close(fused[:, :OUT], torch.ones(len(indices), OUT))
    torch.testing.assert_close(fused[:, 2 * OUT :], torch.ones(len(indices), OUT))


def test_expand_without_add_overwrites_and_pads_to_the_common_width(weights) -> None:
    _, lora_b = weights
    index = torch.tensor([3, 0])
    x = torch.randn(2, RANK)
    y = torch.full((2, OUT + 6), 7.0)  # the model's output padded wider than the adapter's
    ops.bgmv_expand(x, lora_b, y, index, add_inputs=False)
    torch.testing.assert_close(y[:, :OUT], reference(x, lora_b, index))
    torch.testing.assert_close(y[:, OUT:], torch.full((2, 6), 7.0))


def test_register_replaces_vllms_ops_where_punica_calls_them() -> None:
    pytest.importorskip("vllm")
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin only acts on vLLM's CPU platform")
    ops.register()
    for name in ops.PATCHED:
        assert getattr(punica_cpu, name) is getattr(ops, name)
        assert getattr(lora_ops, name) is getattr(ops, name)
    # vLLM's prefill ops expand per-sequence indices and call the (patched) module globals.
    gen = torch.Generator().manual_seed(1)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen)
    x = torch.randn(5, HIDDEN)
    y = torch.zeros(5, RANK)
    seq_lens, slots = torch.tensor([3, 2]), torch.tensor([1, -1])
    lora_ops.sgmv_shrink(x, lora_a, y, torch.tensor([0, 3]), seq_lens, slots, 2, 3, 5, 1.0)
    torch.testing.assert_close(y, reference(x, lora_a, torch.tensor([1, 1, 1, -1, -1])))


@pytest.mark.vllm
def test_the_tests_vllm_loads_the_plugin(vllm: ServerProcess) -> None:
    assert "tuneserve: grouped CPU LoRA ops" in vllm.log_path.read_text(errors="replace")


def test_one_input_row_against_a_taller_output_broadcasts_as_in_vllm(weights) -> None:
    _, lora_b = weights
    x = torch.randn(1, RANK)
    y = torch.zeros(3, OUT)
    ops.bgmv_expand(x, lora_b, y, torch.tensor([2]), add_inputs=True)
    torch.testing.assert_close(y, reference(x, lora_b, torch.tensor([2])).expand(3, OUT))
