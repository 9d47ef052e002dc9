"""Attention backends for decode steps: torch (reference), Triton and FlashInfer, cascade or flat.

The torch path (:func:`.attention.paged_attention`: SDPA over each lane's gathered slots) runs
every step and stays the reference. A backend may take over *decode* steps (one new token per
lane): once per step, :meth:`AttentionBackend.plan_decode` turns the lanes' KV views into a plan
and returns the callable that every layer then runs on its query and KV tensors. Prefill and
multi-token steps, sliding-window layers and a scale other than the planned one use the torch
path.

Cascade levels (see :mod:`kernels.attention`) come from the lanes' KV views: lanes are grouped
by request (an RL group of n samples shares the prompt's pages), then by sample (the branches of
a block share the reasoning prefix up to the fork), then, where blocks nest (Multiverse), by the
enclosing branch at each depth (a nested block's branches share that branch up to their fork),
then each lane alone (its own tail). A
level's KV for a group is the slot prefix all its lanes share beyond the previous level, so fork
and join need nothing special: a join lane lists its prefix and every branch's pages, and shares
with nobody until it forks again. KV lists are slot lists (page size 1 over the cache viewed as
``[slots, 1, Hkv, D]``): a join view starts branches mid-page, which a page table of whole pages
cannot express, and slot-level tables cost decode kernels nothing measurable.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

from kernels.attention import DecodeLevel, cascade_decode_attention

from ..models import head_dim, text_config
from .graphs import GraphDecoder
from .kv import SlotViews
from .transfer import copy_into, to_device

BACKENDS = ("auto", "torch", "triton", "flashinfer")
# what FlashInfer 0.6's attention kernels are built for (its dtype maps have no float32)
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)

# query [B, Hq, D], keys / values [slots, Hkv, D] of one layer, scale -> output [B, Hq, D]
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


# -- planning -------------------------------------------------------------------------------------
def flat_level(views: SlotViews) -> DecodeLevel:
    """One level, one group per lane over its whole view: plain paged batch decode."""
    batch = len(views.lengths)
    return DecodeLevel(
        torch.arange(batch + 1, dtype=torch.int32),
        views.indptr,
        views.indices,
        torch.ones(batch, dtype=torch.int32),
        max(views.lengths, default=0),
        1,
    )


def cascade_levels(
    views: SlotViews, group_keys: Sequence[Sequence[Hashable]], fixed: bool = False
) -> list[DecodeLevel]:
    """Cascade levels for lanes (queries) in view order.

    ``group_keys[l][i]``: lane i's group at level l (e.g. its request, then its sample); each
    maximal run of equal consecutive keys is a candidate group. A group attends at its level to
    the slot prefix its lanes share beyond the previous level; a candidate whose lanes share
    nothing more splits into single lanes that take one token of their own there (no level may
    hold an empty KV list: kernels disagree on empty segments). A level where no group holds two
    lanes is dropped. The last level gives every lane the rest of its view.

    ``fixed``: ``len(group_keys) + 1`` levels whatever the step (for CUDA graphs), and a single
    lane's KV list at a shared level is empty, which only kernels that take empty lists (the
    Triton ones) may be given.
    """
    rows, lengths = views.rows, views.lengths
    num_lanes = len(lengths)
    cuts = [0] * num_lanes  # view tokens already covered by earlier levels
    levels = []
    for depth, keys in enumerate(group_keys):
        later = len(group_keys) - depth  # levels after this one, each needs >= 1 token
        groups, new_cuts, shared_any = [], list(cuts), False
        for lo, hi in _runs(keys):
            prev = cuts[lo]
            cap = min(lengths[lo:hi]) - (1 if fixed else later)
            shared = _common_prefix(rows[lo:hi], cap) if hi - lo > 1 else 0
            if hi - lo > 1 and shared > prev and all(c == prev for c in cuts[lo:hi]):
                groups.append((lo, hi, prev, shared))
                new_cuts[lo:hi] = [shared] * (hi - lo)
                shared_any = True
            elif fixed:
                groups += [(i, i + 1, cuts[i], cuts[i]) for i in range(lo, hi)]
            else:
                for i in range(lo, hi):
                    if lengths[i] - cuts[i] <= later:
                        raise ValueError(f"lane {i} is too short for {len(group_keys) + 1} levels")
                    groups.append((i, i + 1, cuts[i], cuts[i] + 1))
                    new_cuts[i] = cuts[i] + 1
        if shared_any or fixed:
            levels.append(_level(rows, groups))
            cuts = new_cuts
    levels.append(_level(rows, [(i, i + 1, cuts[i], lengths[i]) for i in range(num_lanes)]))
    return levels


def _runs(keys: Sequence[Hashable]) -> list[tuple[int, int]]:
    runs, lo = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[lo]:
            runs.append((lo, i))
            lo = i
    return runs


def _common_prefix(rows: Sequence[np.ndarray], cap: int) -> int:
    """How many leading slots all rows share (at most ``cap``)."""
    if cap <= 0:
        return 0
    first = rows[0][:cap]
    shared = cap
    for row in rows[1:]:
        differ = np.flatnonzero(row[:shared] != first[:shared])
        if len(differ):
            shared = int(differ[0])
    return shared


def _level(rows: Sequence[np.ndarray], groups: list[tuple[int, int, int, int]]) -> DecodeLevel:
    """``groups``: (first lane, end lane, first view token, end view token) in lane order."""
    qo = torch.tensor([0] + [hi for _, hi, _, _ in groups], dtype=torch.int32)
    sizes = [end - start for _, _, start, end in groups]
    kv = np.zeros(len(groups) + 1, dtype=np.int32)
    kv[1:] = np.cumsum(sizes)
    indices = np.concatenate([rows[lo][start:end] for lo, _, start, end in groups])
    return DecodeLevel(
        qo,
        torch.from_numpy(kv),
        torch.from_numpy(indices.astype(np.int32)),
        torch.ones(len(groups), dtype=torch.int32),
        max(sizes),
        max(hi - lo for lo, hi, _, _ in groups),
    )


def lane_group_keys(lanes: Sequence, nested: bool = True) -> list[list[Hashable]]:
    """Level keys of engine lanes: their request, then their sample (a lane without a sample,
    i.e. a prompt being prefilled, is its own group), then, with ``nested``, a level per depth
    of nesting below the first: the branch of the enclosing block at that depth, whose tokens
    up to a nested fork all that fork's branches share."""
    requests = [id(lane.sample.request) if lane.sample else id(lane) for lane in lanes]
    samples = [id(lane.sample) if lane.sample else id(lane) for lane in lanes]
    keys = [requests, samples]
    if nested:
        chains = [enclosing_branches(lane) for lane in lanes]
        for depth in range(max(map(len, chains), default=0) - 1):
            keys.append(
                [
                    c[depth] if len(c) > depth + 1 else id(lane)
                    for c, lane in zip(chains, lanes, strict=True)
                ]
            )
    return keys


def enclosing_branches(lane) -> list[tuple[int, int]]:
    """``(id of the lane that forked the block, branch index)`` of each block ``lane`` is in,
    outermost first (empty for a lane outside every block)."""
    chain = []
    while lane.owner is not None:
        chain.append((id(lane.owner), lane.branch))
        lane = lane.owner
    return chain[::-1]


# -- backends -------------------------------------------------------------------------------------
class AttentionBackend:
    """Base class; as it is, the torch reference: plans nothing, every layer runs SDPA over
    the lanes' gathered slots."""

    name = "torch"

    def attach(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called once by the model runner."""
        config = text_config(model)
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim(config)
        self.dtype = next(model.parameters()).dtype
        self.device = device
        scales = {
            float(m.scaling)
            for m in model.modules()
            if isinstance(getattr(m, "scaling", None), (int, float))
        }  # the attention layers' softmax scale, planned before their forward
        self.scale = scales.pop() if len(scales) == 1 else None

    def plan_decode(self, lanes: Sequence, views: SlotViews) -> DecodeFn | None:
        """Once per decode step, from the lanes' KV views (on the host). None: use the torch
        path this step."""
        return None

    def can_graph(self) -> bool:
        """Whether :meth:`graph_decoder` works (after :meth:`attach`)."""
        return False

    def graph_decoder(self, batch: int, capacity: int, nested_levels: int = 0) -> GraphDecoder:
        """A decode of exactly ``batch`` lanes over fixed page-table buffers of ``capacity``
        indices, for a CUDA graph to record (:mod:`.graphs`); ``nested_levels``: cascade levels
        it keeps for branches of nested blocks (a graph's number of levels is fixed)."""
        raise NotImplementedError(f"the {self.name} backend has no CUDA-graph decode")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TorchBackend(AttentionBackend):
    name = "torch"


class _LevelsBackend(AttentionBackend):
    """``cascade``: levels by request, sample and (``nested``) enclosing branch; else flat."""

    def __init__(self, cascade: bool = True, nested: bool = True) -> None:
        self.cascade = cascade
        self.nested = nested

    def levels(self, lanes: Sequence, views: SlotViews) -> list[DecodeLevel]:
        if self.cascade:
            try:
                return cascade_levels(views, lane_group_keys(lanes, self.nested))
            except ValueError:  # a view too short to split (one-token prompts)
                pass
        return [flat_level(views)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cascade={self.cascade}, nested={self.nested})"


class TritonBackend(_LevelsBackend):
    """Cascade (or flat) decode with the Triton kernels of :mod:`kernels.attention`.

    ``kernels="torch"`` runs the same plan through the kernels' torch references (CPU tests of
    the planning at sizes the Triton interpreter is too slow for). ``tiles``: ``(block_q,
    block_t, warps, stages)`` instead of the kernels' defaults (``attention_triton.plan_launch``).
    """

    name = "triton"

    def __init__(
        self,
        cascade: bool = True,
        kernels: str = "triton",
        tiles: tuple[int, int, int, int] | None = None,
        nested: bool = True,
    ) -> None:
        super().__init__(cascade, nested)
        self.kernels = kernels
        self.tiles = tiles

    def plan_decode(self, lanes: Sequence, views: SlotViews) -> DecodeFn | None:
        levels = [lv.map(lambda t: to_device(t, self.device)) for lv in self.levels(lanes, views)]
        planned, kernel_backend, launch = self.scale, self.kernels, None
        if kernel_backend == "triton":  # grids and splits once per step, not per layer
            from kernels import attention_triton

            launch = attention_triton.plan_launch(
                levels, self.num_heads, self.kv_heads, self.device, tiles=self.tiles,
                dtype=self.dtype,
            )  # fmt: skip

        def decode(query, keys, values, scale):
            if planned is not None and scale != planned:
                return None
            return cascade_decode_attention(
                query, keys, values, levels, scale=scale, backend=kernel_backend, launch=launch
            )

        return decode

    def can_graph(self) -> bool:
        # The kernels read every length from the device; the torch references read the host.
        return self.kernels == "triton" and self.scale is not None

    def graph_decoder(self, batch: int, capacity: int, nested_levels: int = 0) -> GraphDecoder:
        """Cascade (or flat) decode over fixed buffers (:class:`_TritonGraphDecoder`)."""
        return _TritonGraphDecoder(self, batch, capacity, nested_levels)


class FlashInferBackend(_LevelsBackend):
    """FlashInfer: ``MultiLevelCascadeAttentionWrapper`` over the cascade levels (``cascade``),
    else ``BatchDecodeWithPagedKVCacheWrapper`` over each lane's whole view. Planned once per
    step, run by every layer; the cache is viewed as pages of one slot (``[slots, 1, Hkv, D]``)."""

    name = "flashinfer"

    def __init__(
        self, cascade: bool = True, workspace_bytes: int = 128 * 2**20, nested: bool = True
    ) -> None:
        super().__init__(cascade, nested)
        self.workspace_bytes = workspace_bytes
        self._wrappers: dict[int, object] = {}
        self._last_plan: torch.cuda.Event | None = None
        self._graph_workspace: torch.Tensor | None = None  # when a bucket needs more room

    def attach(self, model: torch.nn.Module, device: torch.device) -> None:
        super().attach(model, device)
        # On the CPU only the tests' stand-in runs, which takes float32 to compare at 1e-4.
        if device.type == "cuda" and self.dtype not in FLASHINFER_DTYPES:
            raise ValueError(
                f"FlashInfer has no {str(self.dtype).removeprefix('torch.')} attention kernels: "
                "load the model in bfloat16 or float16, or use the triton or torch backend"
            )
        import flashinfer

        self._flashinfer = flashinfer
        self._workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device)

    def _wrapper(self, num_levels: int):
        if num_levels not in self._wrappers:
            fi = self._flashinfer
            if num_levels == 0:
                self._wrappers[0] = fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD", use_tensor_cores=True
                )
            else:
                self._wrappers[num_levels] = fi.MultiLevelCascadeAttentionWrapper(
                    num_levels, self._workspace, "NHD"
                )
        return self._wrappers[num_levels]

    def plan_decode(self, lanes: Sequence, views: SlotViews) -> DecodeFn | None:
        if self.scale is None:
            return None
        return self.plan_levels(self.levels(lanes, views), page_size=1)

    def plan_levels(self, levels: list[DecodeLevel], page_size: int) -> DecodeFn:
        """Plan ``levels`` (page tables of ``page_size``-slot pages); the engine uses pages of
        one slot, other sizes are for benchmarks. The tables stay on the host: FlashInfer plans
        from host copies of them and moves them to the device itself, so a table on the device
        would cost a copy back and a wait for the GPU per array and level."""
        shape = (self.num_heads, self.kv_heads, self.head_dim, page_size)
        dtypes = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if self.cascade:
            wrapper = self._wrapper(len(levels))
            self._wait_for_last_plan()
            wrapper.plan(
                [lv.qo_indptr for lv in levels],
                [lv.kv_indptr for lv in levels],
                [lv.kv_indices for lv in levels],
                [lv.kv_last_page_len for lv in levels],
                *shape,
                causal=False,
                sm_scale=self.scale,
                **dtypes,
            )
            self._mark_plan()
        else:
            (level,) = levels
            wrapper = self._wrapper(0)
            self.plan_flat(
                wrapper, level.kv_indptr, level.kv_indices, level.kv_last_page_len, page_size
            )
        planned = self.scale

        def decode(query, keys, values, scale):
            if scale != planned:
                return None
            return wrapper.run(query.contiguous(), _pages(keys, values, page_size))

        return decode

    def plan_flat(self, wrapper, indptr, indices, last_page_len, page_size: int = 1) -> None:
        """Plan a ``BatchDecodeWithPagedKVCacheWrapper`` (eager or in CUDA-graph mode) from a
        page table on the host (see :meth:`plan_levels`)."""
        self._wait_for_last_plan()
        wrapper.plan(
            indptr,
            indices,
            last_page_len,
            self.num_heads,
            self.kv_heads,
            self.head_dim,
            page_size,
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )
        self._mark_plan()

    def _wait_for_last_plan(self) -> None:
        """A plan writes its schedule into a pinned host buffer of the wrapper and copies it to
        the device without waiting. An overlapped engine plans step n + 1 while step n may still
        be queued, copy included: wait for that copy before the buffer is written again."""
        if self._last_plan is not None:
            self._last_plan.synchronize()
            self._last_plan = None

    def _mark_plan(self) -> None:
        if self.device.type == "cuda":
            self._last_plan = torch.cuda.Event()
            self._last_plan.record()

    def can_graph(self) -> bool:
        return self.scale is not None  # one softmax scale for all layers, planned ahead

    def graph_decoder(self, batch: int, capacity: int, nested_levels: int = 0) -> GraphDecoder:
        """Flat decode (cascade levels change shape from step to step, a graph cannot)."""
        # A new decoder replaces the bucket's old one (a re-capture), whose wrapper then frees
        # its pinned plan buffer into torch's pinned-memory cache, which knows nothing of
        # FlashInfer's copy out of it: let that copy finish before the buffer can be reused.
        self._wait_for_last_plan()
        return _FlashInferGraphDecoder(self, batch, capacity)

    def graph_workspace(self, batch: int) -> torch.Tensor:
        """A float workspace large enough for a CUDA-graph decode of ``batch`` rows: the
        shared one, or, past it, a larger one shared by the buckets that need it (a graph's
        replays run one after another, as eager steps do)."""
        need = graph_workspace_bytes(
            batch, self.num_heads, self.kv_heads, self.head_dim, _sm_count(self.device)
        )
        if need <= self._workspace.numel():
            return self._workspace
        if self._graph_workspace is None or self._graph_workspace.numel() < need:
            self._graph_workspace = torch.empty(need, dtype=torch.uint8, device=self.device)
        return self._graph_workspace


def graph_workspace_bytes(batch: int, heads: int, kv_heads: int, head_dim: int, sms: int) -> int:
    """An upper bound on the float workspace FlashInfer (0.6.18) plans for a tensor-core
    decode of ``batch`` rows in CUDA-graph mode. Its scheduler (``PrefillSplitQOKVIndptr``
    with ``enable_cuda_graph``) always splits KV and pads the work to
    ``max(2 * SMs / kv_heads, ceil(batch * group / tile) + batch - 1)`` tiles of ``tile``
    (query, head) rows, and keeps float32 partial outputs and log-sum-exps of every padded
    tile: about 1.25 * batch tiles, so at Qwen3-4B's heads a 128 MiB workspace holds at most
    407 rows. Eager plans split only as far as the SMs fill, which the default size covers."""
    group = heads // kv_heads
    tile = 16 if group <= 16 else 64 if group <= 64 else 128  # FA2DetermineCtaTileQ, at most
    padded = max(2 * sms // kv_heads, -(-batch * group // tile) + batch - 1)
    return heads * padded * tile * (head_dim + 1) * 4 + 4096  # + alignment


def _sm_count(device: torch.device) -> int:
    """The device's multiprocessors (on the CPU, where only FlashInfer's stand-in runs: an
    H100's or H200's 132)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


class _FlashInferGraphDecoder(GraphDecoder):
    """Flat FlashInfer decode in CUDA-graph mode: the wrapper keeps the page table in the
    buffers given at construction, so a recorded ``run`` replays over whatever ``plan`` last
    wrote there."""

    def __init__(self, backend: FlashInferBackend, batch: int, capacity: int) -> None:
        device = backend.device
        self.backend = backend
        self.batch = batch
        self.capacity = capacity
        self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(batch, dtype=torch.int32, device=device)
        self.wrapper = backend._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            backend.graph_workspace(batch),
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=True,
            paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len,
        )

    def plan(self, lanes: Sequence, views: SlotViews) -> None:
        _, indptr, indices = _padded_groups(flat_level(views), len(lanes), self.batch, last=True)
        last_page_len = torch.ones(self.batch, dtype=torch.int32)
        # In CUDA-graph mode FlashInfer copies host indices with a blocking copy (a wait for all
        # the device has queued); from the device its copy is queued like the rest.
        indices = to_device(indices, self.backend.device)
        self.backend.plan_flat(self.wrapper, indptr, indices, last_page_len)

    def decode(self, query, keys, values, scale) -> torch.Tensor:
        return self.wrapper.run(query.contiguous(), _pages(keys, values, 1))


class _TritonGraphDecoder(GraphDecoder):
    """Triton decode over page tables in fixed buffers, flat or cascade. The kernels take every
    group's queries and KV length from the tables on the device, so one recorded launch serves
    any step that fits: each level has room for ``batch`` groups (unused ones empty), a lane's
    KV splits over a number of programs fixed at capture (splits past its length add nothing),
    and cascade keeps the same levels every step (request, sample, ``nested_levels`` levels of
    enclosing branches, tail: branches nested deeper read what they share in their tails;
    :func:`cascade_levels` with ``fixed``: a lane that shares nothing at a level has an empty
    list there, which these kernels take)."""

    def __init__(
        self, backend: TritonBackend, batch: int, capacity: int, nested_levels: int = 0
    ) -> None:
        from kernels import attention_triton

        device = backend.device
        self.batch = batch
        self.capacity = capacity
        self.cascade = backend.cascade
        self.nested_levels = nested_levels if backend.cascade and backend.nested else 0
        # cascade: a level per key of group_keys (request, sample, nested), then each lane's tail
        self.num_keys = len(lane_group_keys((), nested=False)) + self.nested_levels
        num_levels = self.num_keys + 1 if self.cascade else 1

        def buffer(size: int, fill: int = 0) -> torch.Tensor:
            return torch.full((size,), fill, dtype=torch.int32, device=device)

        self.levels = [
            DecodeLevel(
                buffer(batch + 1),
                buffer(batch + 1),
                buffer(capacity),
                buffer(batch, 1),
                max(1, capacity // batch),
                1 if depth == num_levels - 1 else batch,  # the last level: one lane per group
            )
            for depth in range(num_levels)
        ]
        self.launch = attention_triton.plan_launch(
            self.levels, backend.num_heads, backend.kv_heads, device, tiles=backend.tiles,
            dtype=backend.dtype,
        )  # fmt: skip

    def group_keys(self, lanes: Sequence) -> list[list[Hashable]]:
        """:func:`lane_group_keys` cut or padded to this graph's nested levels (a padded level
        keys each lane alone: it shares nothing there)."""
        keys = lane_group_keys(lanes, nested=self.nested_levels > 0)[: self.num_keys]
        alone = [id(lane) for lane in lanes]
        return keys + [alone] * (self.num_keys - len(keys))

    def plan(self, lanes: Sequence, views: SlotViews) -> None:
        if self.cascade:
            levels = cascade_levels(views, self.group_keys(lanes), fixed=True)
        else:
            levels = [flat_level(views)]
        for fixed, level in zip(self.levels, levels, strict=True):
            qo, kv, indices = _padded_groups(
                level, len(lanes), self.batch, last=fixed is self.levels[-1]
            )
            copy_into(fixed.qo_indptr, qo)
            copy_into(fixed.kv_indptr, kv)
            copy_into(fixed.kv_indices[: len(indices)], indices)

    def decode(self, query, keys, values, scale) -> torch.Tensor:
        return cascade_decode_attention(
            query, keys, values, self.levels, scale=scale, backend="triton", launch=self.launch
        )


def _padded_groups(
    level: DecodeLevel, lanes: int, batch: int, last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A level's ``(qo_indptr, kv_indptr, kv_indices)`` (one-slot pages, on the host) for
    ``batch`` queries in ``batch`` groups: each padding query a group of its own (over the
    scratch slot 0 at the ``last`` level, over nothing at the others), then empty groups up to
    ``batch``. A flat level padded so is the flat page table of a graphed step."""
    pad, groups = batch - lanes, level.num_groups
    qo = torch.full((batch + 1,), batch, dtype=torch.int32)
    qo[: groups + 1] = level.qo_indptr
    qo[groups + 1 : groups + 1 + pad] = torch.arange(lanes + 1, batch + 1, dtype=torch.int32)
    sizes = torch.zeros(batch, dtype=torch.int32)
    sizes[:groups] = level.kv_indptr[1:] - level.kv_indptr[:-1]
    if last:
        sizes[groups : groups + pad] = 1
    kv = torch.zeros(batch + 1, dtype=torch.int32)
    torch.cumsum(sizes, 0, out=kv[1:])
    indices = torch.cat([level.kv_indices, torch.zeros(pad if last else 0, dtype=torch.int32)])
    return qo, kv, indices


def _pages(keys: torch.Tensor, values: torch.Tensor, page_size: int) -> tuple[torch.Tensor, ...]:
    """A layer's ``[slots, Hkv, D]`` cache as FlashInfer's NHD pages ``[pages, page_size, Hkv, D]``."""
    return tuple(t.view(-1, page_size, *t.shape[1:]) for t in (keys, values))


def flashinfer_installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def flashinfer_takes(model: torch.nn.Module) -> bool:
    """Whether FlashInfer's kernels take ``model``'s attention: float16 or bfloat16 (it has no
    float32 kernels) and a head dim its kernels are instantiated for."""
    dtype = next(model.parameters()).dtype
    return dtype in FLASHINFER_DTYPES and head_dim(text_config(model)) in FLASHINFER_HEAD_DIMS


def make_backend(
    spec: str | AttentionBackend = "auto",
    device: torch.device | str = "cpu",
    model: torch.nn.Module | None = None,
) -> AttentionBackend:
    """A backend instance from its name: ``auto`` picks flashinfer when CUDA and flashinfer are
    present (and it takes ``model``, if given: :func:`flashinfer_takes`), else triton on CUDA,
    else torch; an instance is returned as it is."""
    if isinstance(spec, AttentionBackend):
        return spec
    if spec not in BACKENDS:
        raise ValueError(f"unknown attention backend {spec!r}; choose one of {', '.join(BACKENDS)}")
    cuda = torch.device(device).type == "cuda"
    if spec == "auto":
        if cuda and flashinfer_installed() and (model is None or flashinfer_takes(model)):
            spec = "flashinfer"
        elif cuda and triton_installed():
            spec = "triton"
        else:
            spec = "torch"
    if spec in ("triton", "flashinfer") and not cuda:
        from kernels import _triton

        if spec == "flashinfer" or not _triton.available("cpu"):
            raise ValueError(
                f"the {spec} attention backend needs a CUDA device"
                + (" (or TRITON_INTERPRET=1 for triton)" if spec == "triton" else "")
            )
    if spec == "flashinfer" and not flashinfer_installed():
        raise ValueError("the flashinfer backend needs flashinfer (pip install -e '.[gpu]')")
    if spec == "triton" and not triton_installed():
        raise ValueError("the triton backend needs triton (pip install -e '.[gpu]')")
    return {"torch": TorchBackend, "triton": TritonBackend, "flashinfer": FlashInferBackend}[spec]()
