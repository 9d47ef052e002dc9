"""Attention over the engine's paged KV cache, plugged into unmodified transformers models.

The runner plans each forward step once (:class:`StepPlan`: where new keys and values go, which
slots each lane reads, and the mask over them) and hands the plan to the model as a keyword
argument; transformers passes it down to every attention layer, where :func:`paged_attention`
writes the step's keys and values in place and attends over the lane's slots. Nothing is
rebuilt per layer and no lane is handled in a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "npr_paged"


@dataclass
class StepPlan:
    """What every layer needs for one forward step of ``B`` lanes with ``Q`` new tokens each.

    ``write_slots[B*Q]``: flat cache slot of each new token (padding writes to the scratch page).
    ``read_slots[B, T]``: the slots each lane attends to, its new tokens included.
    ``mask[B, 1, Q, T]``: True where new token ``q`` of the lane may attend slot ``t``; None
    when every query sees every slot of its row (one token each, views of equal length).
    """

    write_slots: torch.Tensor
    read_slots: torch.Tensor | None  # None until ``gather`` builds it (see gather_inputs)
    mask: torch.Tensor | None
    kv: KVCache
    query_positions: torch.Tensor | None = None  # [B, Q], for sliding-window layers
    key_positions: torch.Tensor | None = None  # [B, T]
    # Decode steps only: the attention backend's planned kernel (backends.py), run by every
    # layer instead of the gather + SDPA below; it returns None to leave a layer to them.
    decode: Callable[..., torch.Tensor | None] | None = None
    # Builds (read_slots, mask) on first use: a decode step run by ``decode`` never needs them.
    gather: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # A lone lane whose view is the slot range [lo, hi) (its pages happen to be consecutive, as
    # in sequential decoding): layers read a view of the cache instead of gathering it.
    read_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._masks: dict[tuple[int | None, int], torch.Tensor] = {}

    def gather_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(read_slots, mask)``, built now if they were left to ``gather``."""
        if self.read_slots is None:
            if self.gather is None:
                raise RuntimeError("this step was planned without gather indices")
            self.read_slots, self.mask = self.gather()
        return self.read_slots, self.mask

    def mask_for(self, sliding_window: int | None, groups: int) -> torch.Tensor | None:
        """The mask for ``groups`` query heads per KV head, narrowed for sliding-window layers to
        keys less than ``sliding_window`` positions behind the query; built once per step."""
        key = (sliding_window, groups)
        if key not in self._masks:
            mask = self.gather_inputs()[1]
            if sliding_window is not None:
                distance = (
                    self.query_positions[:, None, :, None] - self.key_positions[:, None, None, :]
                )
                near = distance < sliding_window
                mask = near if mask is None else mask & near
            if mask is not None and groups > 1:
                mask = mask.repeat(1, 1, groups, 1)
            self._masks[key] = mask
        return self._masks[key]


class KVCache:
    """Per-layer key and value tensors of shape ``[num_pages * page_size, kv_heads, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_slots, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def copy_slots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy slot contents (copy-on-write of partly filled pages) in every layer."""
        for cache in self.keys + self.values:
            cache[target] = cache[source]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    npr_plan: StepPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, Q, D]``, ``key``/``value [B, Hkv, Q, D]`` of the new tokens only."""
    if npr_plan is None:
        raise RuntimeError("npr_paged attention runs only inside the engine (no StepPlan given)")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the engine")
    plan = npr_plan
    layer = module.layer_idx
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    keys, values = plan.kv.keys[layer], plan.kv.values[layer]
    keys[plan.write_slots] = key.transpose(1, 2).reshape(-1, kv_heads, dim)
    values[plan.write_slots] = value.transpose(1, 2).reshape(-1, kv_heads, dim)
    if plan.decode is not None and q_len == 1 and kwargs.get("sliding_window") is None:
        out = plan.decode(query[:, :, 0], keys, values, scaling)
        if out is not None:
            return out[:, None], None
    if plan.read_range is not None:
        lo, hi = plan.read_range
        lane_keys = keys[lo:hi][None].permute(0, 2, 1, 3)  # [1, Hkv, T, D]
        lane_values = values[lo:hi][None].permute(0, 2, 1, 3)
    else:
        read_slots, _ = plan.gather_inputs()
        # index_select of the flat slots: about half the cost of indexing with the [B, T] table
        flat, shape = read_slots.flatten(), (*read_slots.shape, kv_heads, dim)
        lane_keys = keys.index_select(0, flat).view(shape).permute(0, 2, 1, 3)  # [B, Hkv, T, D]
        lane_values = values.index_select(0, flat).view(shape).permute(0, 2, 1, 3)
    groups = heads // kv_heads
    # GQA without repeating K/V: the query heads of one KV head become extra query rows.
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    mask = plan.mask_for(kwargs.get("sliding_window"), groups)
    out = F.scaled_dot_product_attention(
        grouped, lane_keys, lane_values, attn_mask=mask, scale=scaling
    )
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str = ATTENTION_NAME) -> Iterator[None]:
    """Run ``model`` with attention ``name`` inside the block and restore it after, so the
    model the caller handed over is left as it was."""
    config = model.config
    previous = config._attn_implementation
    if previous == name:  # nested (a step inside Engine.generate): the setter is not free
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
