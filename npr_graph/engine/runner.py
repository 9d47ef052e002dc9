"""One batched forward step of an unmodified transformers model over the paged KV cache."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..models import head_dim, text_config
from .attention import KVCache, StepPlan, attention_implementation
from .backends import AttentionBackend, TorchBackend
from .graphs import CudaGraph, DecodeGraphs
from .kv import PagePool, SlotViews
from .lanes import PICKED, Lane, Picked
from .transfer import to_device


class StepLogits(NamedTuple):
    """Logits of one step: ``last [B, V]`` after each lane's last fed token; ``earlier[b]``
    ``[c - 1, V]`` after lane b's other fed tokens when it fed ``c > 1`` (they score the
    engine-written tokens fed behind a token), None otherwise and for prompts."""

    last: torch.Tensor
    earlier: list[torch.Tensor | None]


@dataclass
class ModelShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = text_config(model)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            config.num_hidden_layers,
            kv_heads,
            head_dim(config),
            model.get_output_embeddings().weight.shape[0],
        )


class ModelRunner:
    """Owns the KV tensors; feeds each lane's pending tokens and returns next-token logits.

    A step takes lanes with one or more pending tokens and writes their keys and values into the
    lanes' slots. Prompts are left-padded to the longest; a step whose lanes feed a few tokens
    each (a sampled token and the engine-written text after it) runs one decode row per token.
    """

    # Longer feeds (prompts) run padded: a row per token would gather [tokens, view] slots.
    max_rows_per_lane = 16

    def __init__(
        self,
        model: torch.nn.Module,
        pool: PagePool,
        device: torch.device | str = "cpu",
        backend: AttentionBackend | None = None,
    ):
        self.model = model
        self.pool = pool
        self.device = torch.device(device)
        self.shape = ModelShape.of(model)
        dtype = next(model.parameters()).dtype
        slots = pool.num_pages * pool.page_size
        self.kv = KVCache(
            self.shape.num_layers,
            slots,
            self.shape.kv_heads,
            self.shape.head_dim,
            dtype,
            self.device,
        )
        self.slot_positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.needs_positions = bool(getattr(text_config(model), "sliding_window", None))
        self.backend = backend or TorchBackend()
        self.backend.attach(model, self.device)
        self.graphs: DecodeGraphs | None = None

    def enable_graphs(
        self,
        max_batch: int,
        graph_factory: Callable[[], CudaGraph] | None = None,
        nested_levels: int = 0,
    ) -> None:
        """Run decode steps of up to ``max_batch`` lanes as CUDA graphs (:mod:`.graphs`).
        ``graph_factory`` replaces ``torch.cuda.CUDAGraph`` (tests on the CPU);
        ``nested_levels``: cascade levels the graphs keep for branches of nested blocks."""
        if graph_factory is None and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self.needs_positions:
            raise ValueError("CUDA graphs do not support sliding-window attention layers")
        if not self.backend.can_graph():
            raise ValueError(
                f"the {self.backend.name} attention backend cannot run in a CUDA graph "
                "(use flashinfer or triton)"
            )
        self.graphs = DecodeGraphs(
            self.model,
            self.kv,
            functools.partial(self.backend.graph_decoder, nested_levels=nested_levels),
            max_batch,
            self.device,
            graph_factory,
        )

    @staticmethod
    def bytes_per_slot(model: torch.nn.Module) -> int:
        """KV bytes one token takes over all layers (keys and values)."""
        shape = ModelShape.of(model)
        itemsize = next(model.parameters()).element_size()
        return 2 * shape.num_layers * shape.kv_heads * shape.head_dim * itemsize

    def step(
        self, lanes: Sequence[Lane], earlier: bool = True, picked: Picked | None = None
    ) -> StepLogits:
        """Feed every lane's pending tokens; return the logits (float32, on the model's device:
        sampling runs there) after each (after every fed token with ``earlier``; prompts need only
        the last). A pending :data:`PICKED` token is read from ``picked`` on the device."""
        counts = [len(lane.pending) for lane in lanes]
        width = max(counts)
        write = [lane.kv.append_slots(count) for lane, count in zip(lanes, counts, strict=True)]
        self._apply_copies()
        views = SlotViews.of([lane.kv for lane in lanes])  # on the CPU: masks and plans start here
        if earlier and 1 < width <= self.max_rows_per_lane:
            return self._step_as_rows(lanes, counts, write, views, picked)
        # Left padding: token 0 at position 0, written to the scratch slot 0.
        pads = [[0] * (width - count) for count in counts]
        input_ids = torch.tensor(
            [pad + lane.pending for pad, lane in zip(pads, lanes, strict=True)]
        )
        last = [row * width + width - 1 for row in range(len(lanes))]
        input_ids = self._place_picked(input_ids, lanes, last, picked)
        positions = torch.tensor(
            [pad + lane.pending_positions for pad, lane in zip(pads, lanes, strict=True)]
        )
        write_slots = torch.tensor([pad + slots for pad, slots in zip(pads, write, strict=True)])
        keep = width if earlier else 1
        logits = self._forward(lanes, views, input_ids, positions, write_slots, keep)
        for lane in lanes:
            lane.fed()
        before_last = [
            logits[row, width - count : width - 1] if count > 1 and earlier else None
            for row, count in enumerate(counts)
        ]
        return StepLogits(logits[:, -1], before_last)

    def _step_as_rows(
        self,
        lanes: Sequence[Lane],
        counts: list[int],
        write: list[list[int]],
        views: SlotViews,
        picked: Picked | None,
    ) -> StepLogits:
        """A lane feeding ``c`` tokens becomes ``c`` decode rows, row ``j`` seeing the lane's view
        up to its ``j``-th new token: no padding, and the step stays a decode step that the
        backend's plan (and a CUDA graph) can run. Every row's logits come back."""
        row_lane = [b for b, count in enumerate(counts) for _ in range(count)]
        row_length = [
            length - count + 1 + j
            for length, count in zip(views.lengths, counts, strict=True)
            for j in range(count)
        ]
        rows = [lanes[b] for b in row_lane]
        input_ids = torch.tensor([t for lane in lanes for t in lane.pending])[:, None]
        ends = list(itertools.accumulate(counts))
        input_ids = self._place_picked(input_ids, lanes, [end - 1 for end in ends], picked)
        positions = torch.tensor([p for lane in lanes for p in lane.pending_positions])[:, None]
        write_slots = torch.tensor([s for slots in write for s in slots])[:, None]
        logits = self._forward(
            rows, views.prefixes(row_lane, row_length), input_ids, positions, write_slots
        )[:, 0]
        for lane in lanes:
            lane.fed()
        earlier = [
            logits[end - count : end - 1] if count > 1 else None
            for end, count in zip(ends, counts, strict=True)
        ]
        last = to_device(torch.tensor([end - 1 for end in ends]), logits.device)
        return StepLogits(logits[last], earlier)

    def _place_picked(
        self,
        input_ids: torch.Tensor,
        lanes: Sequence[Lane],
        last: list[int],
        picked: Picked | None,
    ) -> torch.Tensor:
        """``input_ids`` with each lane's pending :data:`PICKED` token (at flat index ``last[b]``,
        its last) taken from ``picked.tokens``, on the device: the host has not read them."""
        if picked is None:
            return input_ids
        where = {id(lane): index for index, lane in enumerate(picked.lanes)}
        flat, source = [], []
        for lane, at in zip(lanes, last, strict=True):
            if lane.pending[-1] == PICKED:
                flat.append(at)
                source.append(where[id(lane)])
        if not flat:
            return input_ids
        shape = input_ids.shape
        input_ids = to_device(input_ids, self.device).flatten()
        input_ids[to_device(torch.tensor(flat), self.device)] = picked.tokens[
            to_device(torch.tensor(source), self.device)
        ]
        return input_ids.view(shape)

    def _forward(
        self,
        lanes: Sequence[Lane],
        views: SlotViews,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        write_slots: torch.Tensor,
        keep: int = 1,
    ) -> torch.Tensor:
        """One forward of ``[B, W]`` tokens (left-padded); logits ``[B, keep, V]`` after each
        row's last ``keep`` tokens."""
        width = input_ids.shape[1]
        if width == 1 and self.graphs is not None:
            logits = self.graphs.step(input_ids, positions, write_slots[:, 0], lanes, views)
            if logits is not None:
                return logits[:, None]
        positions = to_device(positions, self.device)
        write_slots = to_device(write_slots.flatten(), self.device)

        def gather() -> tuple[torch.Tensor, torch.Tensor | None]:
            table = views.table
            if width == 1 and bool(table.mask.all()):  # every row sees its whole view
                return to_device(table.slots, self.device), None
            # Query j of a row is view token (length - width + j); it sees view tokens up to
            # itself. Padding rows (query index < 0) see anything real.
            query_index = table.lengths[:, None] - width + torch.arange(width)
            visible = table.mask[:, None, :] & (
                torch.arange(table.slots.shape[1])[None, None, :] <= query_index[:, :, None]
            )
            visible |= (query_index < 0)[:, :, None] & table.mask[:, None, :]
            return to_device(table.slots, self.device), to_device(visible[:, None], self.device)

        plan = StepPlan(write_slots, None, None, self.kv, gather=gather)
        if width == 1:
            plan.decode = self.backend.plan_decode(lanes, views)
        if plan.decode is None or self.needs_positions:
            plan.gather_inputs()  # every layer gathers: build the indices before the forward
            if len(lanes) == 1 and not self.needs_positions:
                plan.read_range = _slot_range(views.rows[0])
        if self.needs_positions:
            self.slot_positions[write_slots] = positions.flatten()
            plan.query_positions = positions
            plan.key_positions = self.slot_positions[plan.read_slots]
        with torch.inference_mode(), attention_implementation(self.model):
            out = self.model(
                input_ids=to_device(input_ids, self.device),
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
                npr_plan=plan,
            )
        return out.logits.float()

    def _apply_copies(self) -> None:
        copies = self.pool.drain_copies()
        if not copies:
            return
        size = self.pool.page_size
        source = torch.cat([torch.arange(c.src * size, c.src * size + c.num_slots) for c in copies])
        target = torch.cat([torch.arange(c.dst * size, c.dst * size + c.num_slots) for c in copies])
        source, target = to_device(source, self.device), to_device(target, self.device)
        self.kv.copy_slots(source, target)
        self.slot_positions[target] = self.slot_positions[source]


def _slot_range(slots: np.ndarray) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``slots`` is exactly ``lo, lo + 1, ..., hi - 1``."""
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    if hi - lo != len(slots) or not bool((np.diff(slots) == 1).all()):
        return None
    return lo, hi
