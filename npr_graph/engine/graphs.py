"""CUDA graphs for decode steps.

On a GPU a decode step of a few-billion-parameter model is bound by the host: transformers
launches a few dozen kernels per layer from Python, and at batch 1 a Qwen3-4B step took 47 ms on
an H200 against a ~2 ms memory floor (docs/GPU.md). A CUDA graph records the whole forward once
and replays it with one launch.

A graph replays fixed kernels on fixed memory, so decode steps are padded to a few batch sizes
(buckets) and each bucket owns static buffers: token ids, positions, the slots the new keys and
values go to, and the attention backend's page table (:meth:`GraphDecoder.plan` rewrites it in
place before each replay). Padding rows decode a dummy token at position 0 over the scratch slot
(slot 0, which no lane owns) and their logits are dropped. The attention backend must be able to
run with fixed buffers (:attr:`AttentionBackend.graph_decoder`): FlashInfer's flat decode in its
CUDA-graph mode, or the Triton kernels, which read every length from the device. Prefill, steps
too wide for the largest bucket and sliding-window models run eagerly as before.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import KVCache, StepPlan, attention_implementation
from .kv import SlotViews
from .transfer import copy_into

# Batch sizes a decode step is padded to (then multiples of 32 up to the engine's lane limit).
SMALL_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48)
INITIAL_SLOTS_PER_LANE = 2048  # page-table room per lane; a bucket is re-captured if outgrown


def buckets(max_batch: int) -> list[int]:
    """The padded batch sizes for at most ``max_batch`` lanes, ascending."""
    sizes = [b for b in SMALL_BUCKETS if b < max_batch]
    size = 64
    while size < max_batch:
        sizes.append(size)
        size += 32
    return sizes + [max_batch] if max_batch >= 1 else []


class GraphDecoder:
    """What a backend gives a captured decode of ``batch`` rows: ``plan(lanes, views)`` once per
    step, writing the step's page tables into buffers that stay put (rows past the lanes' are
    padding), and ``decode(query, keys, values, scale)`` per layer, the call recorded in the
    graph. ``capacity``: how many KV indices each table buffer holds; a step needs at most
    :func:`indices_needed`."""

    batch: int
    capacity: int

    def plan(self, lanes: Sequence, views: SlotViews) -> None:
        raise NotImplementedError

    def decode(self, query, keys, values, scale) -> torch.Tensor:
        raise NotImplementedError


def indices_needed(views: SlotViews, batch: int) -> int:
    """An upper bound on the KV indices of any one page table (level) of the step, padding
    included: each lane's view slots at most once, and one scratch slot per padding row."""
    return sum(views.lengths) + batch - len(views.lengths)


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind two calls: ``capture(fn)`` (warm-up runs on a side stream,
    then the recording; returns ``fn``'s output, the tensor every replay overwrites) and
    ``replay()``."""

    def __init__(self, pool=None) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, autotuning) stays out
                fn()
        torch.cuda.current_stream().wait_stream(side)
        # Python's cycle collector stays off while recording: destroying another CUDA graph
        # (or unloading a Triton kernel) during a capture invalidates it, and since torch 2.9
        # ``torch.cuda.graph`` no longer collects before it starts (pytorch#161037), so garbage
        # holding a graph could be collected by an allocation in the middle of the forward.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=self.pool):
                output = fn()
        finally:
            if collecting:
                gc.enable()
        return output

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    graph: CudaGraph
    decoder: GraphDecoder
    input_ids: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, 1]
    write_slots: torch.Tensor  # [B]
    logits: torch.Tensor  # [B, V], overwritten by every replay
    filled: int = 0  # rows the last step wrote; the rest hold padding (zeros)


class DecodeGraphs:
    """Captured decode steps of one model runner, one per bucket, captured on first use."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        make_decoder: Callable[[int, int], GraphDecoder],
        max_batch: int,
        device: torch.device,
        graph_factory: Callable[[], CudaGraph] | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.make_decoder = make_decoder
        self.buckets = buckets(max_batch)
        self.device = device
        # The buckets' graphs share one memory pool (they replay one at a time). The factory
        # holds the pool, not ``self``: a cycle through ``self`` would keep the KV cache and the
        # graphs' memory alive after the engine is dropped, until Python's cycle collector ran.
        pool = torch.cuda.graph_pool_handle() if graph_factory is None else None
        self.graph_factory = graph_factory or functools.partial(CudaGraph, pool)
        self.captured: dict[int, _Captured] = {}
        # page-table room per lane of a bucket recorded from now on: a caller that knows how long
        # its lanes' views grow sets it before the first steps, so that none is recorded again
        self.slots_per_lane = INITIAL_SLOTS_PER_LANE
        self.captures = 0  # how many graphs were recorded (re-captures included)
        self.replays = 0

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        write_slots: torch.Tensor,
        lanes: Sequence,
        views: SlotViews,
    ) -> torch.Tensor | None:
        """One decode step of ``B`` lanes (``input_ids``/``positions`` ``[B, 1]``, ``write_slots``
        ``[B]`` on the CPU, the lanes and their KV views) by replaying its bucket's graph;
        ``logits [B, V]`` float32 on the device, or None when no bucket fits ``B`` (the caller
        runs the step eagerly)."""
        batch = input_ids.shape[0]
        size = self.bucket(batch)
        if size is None:
            return None
        needed = indices_needed(views, size)
        entry = self.captured.get(size)
        if entry is None or needed > entry.decoder.capacity:
            capacity = max(size * self.slots_per_lane, 2 * needed)
            entry = self._prepare(size, capacity)
        # Padding rows: token 0 at position 0, written to the scratch slot 0. Token ids picked
        # by an overlapped step come from the device.
        buffers = (entry.input_ids, entry.positions, entry.write_slots)
        for buffer, rows in zip(buffers, (input_ids, positions, write_slots), strict=True):
            copy_into(buffer[:batch], rows)
            if entry.filled > batch:  # rows a wider step wrote are padding again
                buffer[batch : entry.filled].zero_()
        entry.filled = batch
        entry.decoder.plan(lanes, views)
        if size not in self.captured:
            entry.logits = entry.graph.capture(self._forward(entry))
            self.captured[size] = entry
            self.captures += 1
        entry.graph.replay()
        self.replays += 1
        # A copy: the next replay overwrites the captured output, and lanes keep their rows.
        return entry.logits[:batch].to(torch.float32, copy=True)

    def _prepare(self, size: int, capacity: int) -> _Captured:
        self.captured.pop(size, None)
        zeros = dict(dtype=torch.long, device=self.device)
        return _Captured(
            graph=self.graph_factory(),
            decoder=self.make_decoder(size, capacity),
            input_ids=torch.zeros(size, 1, **zeros),
            positions=torch.zeros(size, 1, **zeros),
            write_slots=torch.zeros(size, **zeros),
            logits=torch.empty(0),
        )

    def _forward(self, entry: _Captured) -> Callable[[], torch.Tensor]:
        plan = StepPlan(entry.write_slots, None, None, self.kv, decode=entry.decoder.decode)

        def forward() -> torch.Tensor:
            with torch.inference_mode(), attention_implementation(self.model):
                out = self.model(
                    input_ids=entry.input_ids,
                    position_ids=entry.positions,
                    use_cache=False,
                    logits_to_keep=1,
                    npr_plan=plan,
                )
            return out.logits[:, -1]

        return forward
