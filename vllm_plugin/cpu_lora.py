"""A vLLM plugin that makes multi-LoRA on CPU cost about what the adapters compute.

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`) gather each token's adapter weights
into a fresh `(tokens, out, rank)` tensor, `weights[indices]`, before an einsum. The
copy is padded to `--max-lora-rank` and repeated for every token, layer and projection:
on SmolLM2-135M a 40-token prefill moves ~3 GB, which made an adapter request ~10x
slower than a base one. The GPU kernels do no such copy; these ops do what they do:
one matmul per adapter present in the batch, on the rows that use it.

A linear layer's whole LoRA (every slice: q, k and v, or gate and up) is one call,
`add_lora_linear`. It runs as two to four matmuls against a copy of the layer's slot
weights laid out for it, instead of a shrink and an expand per slice: at decode sizes
the count of ops, not the arithmetic, is the cost. A decode step that mixes adapters
multiplies by every slot at once; a step with prefills goes sequence by sequence.

Semantics follow vLLM's ops, with one fix: a token with index -1 (no adapter, a base
request batched with adapter requests) gets no LoRA term, as on GPU, where the torch
ops read `weights[-1]`, the last adapter slot.

Registered as the `tuneserve_cpu_lora` entry point of `vllm.general_plugins`, so every
vLLM process in the environment tuneserve is installed in loads it; it does nothing on
other platforms. `VLLM_PLUGINS` (a list of plugin names to load) turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

# A child of "vllm", so the line lands in vLLM's own log format and level.
log = logging.getLogger("vllm.plugins.tuneserve_cpu_lora")

PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")

# A batch that mixes adapters is computed against every slot in one matmul, each row
# keeping its slot's result, while that stays small: few rows (decode, not prefill) and
# stacked weights small enough to read whole (projections, not the vocabulary-wide
# logits LoRA). Otherwise slot by slot.
_ALL_SLOTS_MAX_ROWS = 64
_ALL_SLOTS_MAX_BYTES = 1 << 20
# A forward pass calls these ops ~400 times with the same indices and the same stacked
# weights; at decode sizes what the ops cost is mostly their bookkeeping. Both caches
# stay small: a few index patterns per step, one view per (weights, slot).
_MAX_PLANS = 64
# The fused layer path keeps a copy of each layer's slot weights; past this size per
# layer the copy is not worth its memory and the per-slice ops run instead.
_FUSED_MAX_BYTES = 8 << 20
# Many rows that switch adapters more often than this go slot by slot (the ops above).
_MAX_RUNS = 16


@dataclass(frozen=True)
class _Plan:
    """Which rows use which adapter slot (-1: none), worked out once per index pattern."""

    groups: list[tuple[int, torch.Tensor | None]]  # (slot, its rows); rows None: all rows
    rows: int
    picked: torch.Tensor | None = None  # per row: its slot, with -1 clamped to 0
    row_numbers: torch.Tensor | None = None
    no_lora_rows: torch.Tensor | None = None
    # Contiguous rows sharing a slot, as (slot, start, end): a prefilled sequence is one.
    runs: tuple[tuple[int, int, int], ...] = ()
    slot_masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict, compare=False)


_plans: dict[tuple, _Plan] = {}
_views: dict[tuple[int, tuple[int, ...], int], torch.Tensor] = {}


def _make_plan(indices: torch.Tensor) -> _Plan:
    values = indices.tolist()
    slots = sorted(set(values))
    rows = len(values)
    if len(slots) == 1:
        return _Plan([(slots[0], None)], rows)
    groups = [(slot, (indices == slot).nonzero().squeeze(1)) for slot in slots]
    no_lora = groups[0][1] if slots[0] < 0 else None
    runs, start = [], 0
    for row in range(1, rows + 1):
        if row == rows or values[row] != values[start]:
            runs.append((values[start], start, row))
            start = row
    return _Plan(groups, rows, indices.clamp(min=0).long(), torch.arange(rows), no_lora, tuple(runs))


def _plan(key: tuple, indices: Callable[[], torch.Tensor]) -> _Plan:
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = _make_plan(indices())
    return plan


def _token_plan(indices: torch.Tensor) -> _Plan:
    return _plan((indices.dtype, indices.numpy().tobytes()), lambda: indices)


def _sequence_plan(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> _Plan:
    """Prefill: one index per sequence, expanded to its tokens only on a cache miss."""
    key = ("seq", lora_indices.numpy().tobytes(), seq_lens.numpy().tobytes())
    return _plan(key, lambda: torch.repeat_interleave(lora_indices, seq_lens))


ALL_SLOTS = -1


def _transposed(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """weights[slot].T as (in, out), or every slot's side by side as (in, slots * out)
    for slot ALL_SLOTS; weights are (slots, 1, out, in) or (slots, out, in)."""
    out_dim, in_dim = weights.shape[-2], weights.shape[-1]

    def view() -> torch.Tensor:
        chosen = weights.reshape(-1, in_dim) if slot == ALL_SLOTS else weights[slot].reshape(out_dim, in_dim)
        return chosen.to(dtype).T

    if weights.dtype != dtype:  # a converted copy would go stale: never cached
        return view()
    key = (weights.data_ptr(), tuple(weights.shape), slot)
    cached = _views.get(key)
    if cached is None:
        # The view keeps the stacked tensor alive, so its address cannot be reused by
        # another tensor while the key exists. Adapters load into the same storage.
        cached = _views[key] = view()
    return cached


def _apply(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    plan: _Plan,
    target: torch.Tensor,
    scale: float,
    accumulate: bool,
) -> None:
    """target[t] (+)= scale * inputs[t] @ weights[slot of t].T, for each row t.

    Rows without an adapter (slot -1) get no LoRA term (zeros when not accumulating).
    Only the first target.shape[1] outputs of the weights are used.
    """
    inputs = inputs.to(target.dtype)
    width = target.shape[1]
    if (
        plan.picked is not None
        and plan.rows <= _ALL_SLOTS_MAX_ROWS
        and weights.numel() * weights.element_size() <= _ALL_SLOTS_MAX_BYTES
    ):
        _apply_all_slots(inputs, weights, plan, target, scale, accumulate)
        return
    beta = 1.0 if accumulate else 0.0
    for slot, rows in plan.groups:
        if slot < 0:
            if not accumulate:
                if rows is None:
                    target.zero_()
                else:
                    target.index_fill_(0, rows, 0.0)
            continue
        w_t = _transposed(weights, slot, target.dtype)[:, :width]
        if rows is None:
            target.addmm_(inputs, w_t, beta=beta, alpha=scale)
        elif accumulate:
            target.index_add_(0, rows, inputs.index_select(0, rows) @ w_t, alpha=scale)
        else:
            target.index_copy_(0, rows, torch.mm(inputs.index_select(0, rows), w_t).mul_(scale))


def _apply_all_slots(
    inputs: torch.Tensor, weights: torch.Tensor, plan: _Plan, target: torch.Tensor, scale: float, accumulate: bool
) -> None:
    """A few rows over several slots: one matmul against every slot's weights side by
    side, then each row keeps its own slot's part. Reading every slot costs less at
    decode sizes than a few ops per slot."""
    slots, out_dim = weights.shape[0], weights.shape[-2]
    every = inputs @ _transposed(weights, ALL_SLOTS, target.dtype)  # (rows, slots * out)
    assert plan.picked is not None and plan.row_numbers is not None
    result = every.view(plan.rows, slots, out_dim)[plan.row_numbers, plan.picked, : target.shape[1]]
    if plan.no_lora_rows is not None:
        result.index_fill_(0, plan.no_lora_rows, 0.0)
    if accumulate:
        target.add_(result, alpha=scale)
    else:
        target.copy_(result.mul_(scale))


def _shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: _Plan, scaling: float) -> None:
    rank = weights.shape[-2]
    if inputs.shape[0] == output.shape[0] == plan.rows:
        _apply(inputs, weights, plan, output[:, :rank], scaling, accumulate=False)
        return
    output[:, :rank] = scaling * _product(inputs, weights, plan, output.dtype)


def _expand(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: _Plan, add_inputs: bool) -> None:
    # An adapter and the model may pad their output dimensions differently.
    common_len = min(weights.shape[-2], output.shape[1])
    if inputs.shape[0] == output.shape[0] == plan.rows:
        _apply(inputs, weights, plan, output[:, :common_len], 1.0, add_inputs)
        return
    # vLLM's semantics for a single input row against a taller output: row 0 broadcasts.
    outputs = _product(inputs, weights, plan, output.dtype)
    limit = 1 if outputs.shape[0] == 1 and output.shape[0] != 1 else output.shape[0]
    if add_inputs:
        output[:, :common_len] += outputs[:limit, :common_len]
    else:
        output[:, :common_len] = outputs[:limit, :common_len]


def _expand_slice(
    inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: _Plan, offset: int, size: int, add_inputs: bool
) -> None:
    target = output[:, offset : offset + size]
    if inputs.shape[0] == output.shape[0] == plan.rows:
        _apply(inputs, weights, plan, target, 1.0, add_inputs)
        return
    outputs = _product(inputs, weights, plan, output.dtype)
    if add_inputs:
        target += outputs
    else:
        target[:] = outputs


def _product(inputs: torch.Tensor, weights: torch.Tensor, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """The whole (rows, out) product, for shapes the in-place path does not cover."""
    out = torch.empty((inputs.shape[0], weights.shape[-2]), dtype=dtype)
    _apply(inputs, weights, plan, out, 1.0, accumulate=False)
    return out


# vLLM's signatures (vllm/lora/ops/torch_ops/lora_ops.py), decode then prefill.


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0) -> None:
    _shrink(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True) -> None:
    _expand(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
) -> None:
    plan = _token_plan(lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, scaling,
) -> None:
    _shrink(inputs, lora_a_weights, output_tensor, _sequence_plan(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, add_inputs=False,
) -> None:
    _expand(inputs, lora_b_weights, output_tensor, _sequence_plan(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False,
) -> None:
    plan = _sequence_plan(lora_indices_tensor, seq_len_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


# --- whole-layer LoRA for decode-sized batches --------------------------------------

# vLLM writes adapter weights into its slots only in LoRAModelManager.activate_adapter;
# register() wraps it to count writes and note the slot, and a layer's copy refreshes
# the slots written since it was last brought up to date (all of them after a failure).
_generation = 0
_slot_written_at: dict[int, int] = {}
_all_written_at = 0


@dataclass
class _FusedLayer:
    """One layer's slot weights, copied into the layout the fused path multiplies by."""

    generation: int
    source: torch.Tensor  # lora_a[0], whose address keys the cache: held, so never reused
    slots: int
    rank: int
    slices: int
    shrink: torch.Tensor  # (slots * slices * rank, in): rows ordered slot, slice, rank
    expand: tuple[torch.Tensor, ...]  # per slice (slots * rank, out): rows ordered slot, rank

    def copy_slot(self, slot: int, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]) -> None:
        in_dim = self.shrink.shape[1]
        block = self.shrink[slot * self.slices * self.rank : (slot + 1) * self.slices * self.rank]
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            block[i * self.rank : (i + 1) * self.rank].copy_(a[slot].reshape(self.rank, in_dim))
            self.expand[i][slot * self.rank : (slot + 1) * self.rank].copy_(b[slot].reshape(-1, self.rank).T)


# None: the layer's slots are too large to copy, decided once (the sizes never change).
_fused: dict[tuple[int, torch.dtype], _FusedLayer | None] = {}


def _fused_layer(lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], dtype: torch.dtype) -> _FusedLayer | None:
    key = (lora_a[0].data_ptr(), dtype)
    if key in _fused:
        layer = _fused[key]
        if layer is None or layer.generation == _generation:
            return layer
        if _all_written_at <= layer.generation:
            # Only what activations wrote since: one slot each, not every slot's weights.
            for slot, written_at in _slot_written_at.items():
                if written_at > layer.generation:
                    layer.copy_slot(slot, lora_a, lora_b)
            layer.generation = _generation
            return layer
    slots, rank, in_dim = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
    size = sum(a.numel() for a in lora_a) + sum(b.numel() for b in lora_b)
    if size * torch.empty(0, dtype=dtype).element_size() > _FUSED_MAX_BYTES:
        _fused[key] = None
        return None
    shrink = torch.stack([a.reshape(slots, rank, in_dim) for a in lora_a], dim=1)
    expand = tuple(b.reshape(slots, b.shape[-2], rank).transpose(1, 2).reshape(slots * rank, b.shape[-2]) for b in lora_b)
    layer = _FusedLayer(
        _generation, lora_a[0], slots, rank, len(lora_a),
        shrink.reshape(-1, in_dim).to(dtype).contiguous(),
        tuple(e.to(dtype).contiguous() for e in expand),
    )
    _fused[key] = layer
    return layer


def _slot_mask(plan: _Plan, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, slots, 1, 1): 1 where a row uses a slot; all 0 for rows without adapter."""
    mask = plan.slot_masks.get((slots, dtype))
    if mask is None:
        mask = torch.zeros(plan.rows, slots, dtype=dtype)
        for slot, rows in plan.groups:
            if slot >= 0:
                mask[rows, slot] = 1.0
        mask = plan.slot_masks[(slots, dtype)] = mask.view(plan.rows, slots, 1, 1)
    return mask


def add_lora_linear(
    wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs
) -> None:
    """PunicaWrapperCPU.add_lora_linear: y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T
    for each row's slot, every slice at once."""
    x2 = x.view(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    indices = wrapper.token_lora_indices
    plan = _token_plan(indices) if indices.shape[0] == x2.shape[0] else None
    if plan is not None and len(plan.groups) == 1 and plan.groups[0][0] < 0:
        return  # no row uses an adapter
    layer = None
    # A mix of adapters is multiplied by every slot, which few rows make cheap; many rows
    # (prefill) go sequence by sequence, while those are few.
    mixed_rows = plan is not None and plan.picked is not None and plan.rows > _ALL_SLOTS_MAX_ROWS
    if plan is not None and x2.dtype == y2.dtype and not (mixed_rows and len(plan.runs) > _MAX_RUNS):
        layer = _fused_layer(lora_a_stacked, lora_b_stacked, x2.dtype)
    if layer is None or plan is None:  # a layer is only built with a plan
        _original_add_lora_linear(wrapper, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        return
    if plan.picked is None:
        _add_one_slot(layer, plan.groups[0][0], x2, y2, scale, output_slices)
    elif mixed_rows:
        for slot, start, end in plan.runs:
            if slot >= 0:
                _add_one_slot(layer, slot, x2[start:end], y2[start:end], scale, output_slices)
    else:  # every slot at once, each row keeping its own slot's share
        mask = _slot_mask(plan, layer.slots, x2.dtype)
        hidden = (x2 @ layer.shrink.T).view(plan.rows, layer.slots, layer.slices, layer.rank).mul_(mask)
        parts = [hidden[:, :, i].reshape(plan.rows, -1) for i in range(layer.slices)]
        _add_expanded(layer, parts, slice(None), y2, scale, output_slices)


def _add_one_slot(
    layer: _FusedLayer, slot: int, x: torch.Tensor, y: torch.Tensor, scale: float, output_slices: tuple[int, ...]
) -> None:
    """Rows that all use one slot: its own rows of the copies, nothing else."""
    per_slot = layer.slices * layer.rank
    hidden = x @ layer.shrink[slot * per_slot : (slot + 1) * per_slot].T  # (rows, slices * rank)
    parts = [hidden[:, i * layer.rank : (i + 1) * layer.rank] for i in range(layer.slices)]
    _add_expanded(layer, parts, slice(slot * layer.rank, (slot + 1) * layer.rank), y, scale, output_slices)


def _add_expanded(
    layer: _FusedLayer,
    parts: list[torch.Tensor],
    expand_rows: slice,
    y: torch.Tensor,
    scale: float,
    output_slices: tuple[int, ...],
) -> None:
    offset = 0
    for part, weights, size in zip(parts, layer.expand, output_slices):
        width = min(size, weights.shape[1])
        y[:, offset : offset + width].addmm_(part, weights[expand_rows, :width], alpha=scale)
        offset += size


_original_add_lora_linear: Callable[..., None]


def _note_slot_writes(activate: Callable[..., bool]) -> Callable[..., bool]:
    def activate_adapter(self, lora_id: int) -> bool:
        # vLLM calls it for every adapter of every step; it returns True only when it
        # wrote an adapter's weights into a free slot. A failure may have written some.
        global _generation, _all_written_at
        try:
            wrote = activate(self, lora_id)
        except BaseException:
            _generation += 1
            _all_written_at = _generation
            raise
        if wrote:
            _generation += 1
            try:
                _slot_written_at[self.lora_index_to_id.index(lora_id)] = _generation
            except (AttributeError, ValueError):  # no record of the slot: refresh all
                _all_written_at = _generation
        return wrote

    activate_adapter.__wrapped__ = activate  # type: ignore[attr-defined]
    return activate_adapter


def register() -> None:
    """vLLM's `vllm.general_plugins` hook; may run more than once per process."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    global _original_add_lora_linear
    # punica_cpu imported the names from torch_ops, which imported them from lora_ops.
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in PATCHED:
            setattr(module, name, globals()[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is not add_lora_linear:
        _original_add_lora_linear = wrapper.add_lora_linear
        wrapper.add_lora_linear = add_lora_linear  # type: ignore[method-assign, assignment]  # replacing it is the plugin's job
    if not hasattr(LoRAModelManager.activate_adapter, "__wrapped__"):
        LoRAModelManager.activate_adapter = _note_slot_writes(LoRAModelManager.activate_adapter)  # type: ignore[method-assign]
    log.info("tuneserve: grouped CPU LoRA ops in place of vLLM's gather-per-token ones")
