"""The vLLM plugin's CPU LoRA ops: same results as a per-token reference, including
batches that mix adapters and base requests, and the plugin is live in the vLLM the
tests run (its adapter requests are checked against llama.cpp in test_vllm_adapters)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.support.servers import ServerProcess
from vllm_plugin import cpu_lora as ops

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


SLICES = (40, 16, 16)  # q, k and v side by side, as vLLM's merged QKV layer has them


def punica_wrapper(indices: list[int]):  # type: ignore[no-untyped-def]
    """vLLM's own CPU punica wrapper, its token indices set as a step's metadata would."""
    pytest.importorskip("vllm")
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max_num_batched_tokens=256, max_batches=8, device="cpu")
    wrapper._token_lora_indices[: len(indices)] = torch.tensor(indices)
    wrapper.indices_len[0] = len(indices)
    return wrapper


def layer_weights(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    lora_a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen) for _ in SLICES)
    lora_b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=gen) for size in SLICES)
    return lora_a, lora_b


def layer_reference(x: torch.Tensor, lora_a, lora_b, indices: list[int], scale: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    index = torch.tensor(indices)
    return torch.cat(
        [scale * reference(reference(x, a, index), b, index) for a, b in zip(lora_a, lora_b)], dim=1
    )


@pytest.mark.parametrize(
    "indices",
    [
        [2, 2, 2, 2, 2], [0, 3, 3, 1, 0, 2], [1, -1, 1, -1, 3], [-1, -1, -1], [1] * 80,
        [3] * 40 + [-1] * 30 + [0, 2, 0] + [2] * 20, [3, -1, 0, 0, 2] * 14,
    ],
    # Few rows: every slot at once; many: sequence by sequence, or slot by slot when the
    # rows alternate too often.
    ids=["one-adapter", "four-adapters", "adapters-and-base", "base-only", "one-adapter-prefill",
         "prefills-and-decodes", "many-rows-alternating"],
)
def test_a_whole_layer_matches_the_per_token_reference(indices: list[int]) -> None:
    lora_a, lora_b = layer_weights(seed=2)
    wrapper = punica_wrapper(indices)
    x = torch.randn(len(indices), HIDDEN)
    y = torch.ones(len(indices), sum(SLICES))
    ops.register()
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 0.5, SLICES)
    torch.testing.assert_close(y, 1 + layer_reference(x, lora_a, lora_b, indices, 0.5), rtol=1e-4, atol=1e-4)


def test_an_adapter_loaded_into_a_slot_is_used_from_the_next_step() -> None:
    """The whole-layer path multiplies by a copy of the slot weights: activating an
    adapter (vLLM writes its weights into a slot) must make that copy stale."""
    pytest.importorskip("vllm")
    from vllm.lora.model_manager import LoRAModelManager

    ops.register()
    lora_a, lora_b = layer_weights(seed=3)
    indices = [0, 2, -1, 2]
    x = torch.randn(len(indices), HIDDEN)

    def step() -> torch.Tensor:
        y = torch.zeros(len(indices), sum(SLICES))
        punica_wrapper(indices).add_lora_linear(y, x, lora_a, lora_b, 1.0, SLICES)
        return y

    step()  # the copy now exists
    # vLLM calls activate_adapter for every adapter of every step; only a call that
    # wrote weights (returns True) may make the copies stale, or each step rebuilds them.
    generation = ops._generation
    assert not ops._note_slot_writes(lambda manager, lora_id: False)(None, 7)
    assert ops._generation == generation
    fresh_a, fresh_b = layer_weights(seed=4)

    def load_into_slot_2(manager: SimpleNamespace, lora_id: int) -> bool:  # what activation does
        for stacked, fresh in zip(lora_a + lora_b, fresh_a + fresh_b):
            stacked[2].copy_(fresh[2])
        manager.lora_index_to_id[2] = lora_id
        return True

    # register() wrapped vLLM's activate_adapter the same way.
    assert hasattr(LoRAModelManager.activate_adapter, "__wrapped__")
    assert ops._note_slot_writes(load_into_slot_2)(SimpleNamespace(lora_index_to_id=[None] * SLOTS), 7)
    torch.testing.assert_close(step(), layer_reference(x, lora_a, lora_b, indices, 1.0), rtol=1e-4, atol=1e-4)
