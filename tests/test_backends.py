"""Attention backends: cascade planning from KV views, backend choice, and equivalence with the
torch backend through fork and join (on the CPU: Triton under its interpreter, FlashInfer's
wrappers through a stand-in with their documented semantics; on CUDA: the real thing, ``gpu``)."""

import contextlib
import gc
import importlib.util
import os
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_engine import dense_logprobs  # noqa: E402

from kernels import _triton  # noqa: E402
from kernels.attention import DecodeLevel, cascade_decode_attention, paged_decode_reference  # noqa: E402
from npr_graph.engine import backends  # noqa: E402
from npr_graph.engine.attention import KVCache  # noqa: E402
from npr_graph.engine.backends import (  # noqa: E402
    FlashInferBackend,
    TorchBackend,
    TritonBackend,
    cascade_levels,
    flat_level,
    make_backend,
)
from npr_graph.engine.engine import Engine  # noqa: E402
from npr_graph.engine.graphs import CudaGraph, DecodeGraphs, indices_needed  # noqa: E402
from npr_graph.engine.kv import LaneKV, PagePool, SlotViews, join  # noqa: E402
from npr_graph.engine.sampling import SamplingParams  # noqa: E402
from npr_graph.models import add_tag_tokens, tiny_model  # noqa: E402

SHORT = dict(max_plan_tokens=4, max_step_tokens=10, max_takeaway_tokens=6)
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"
    spec = importlib.util.spec_from_file_location("_bench_gpu_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_decode = _load_benchmark()
# The GPU tests' models: FlashInfer compiles kernels per head dim and dtype; these match the
# benchmark's Qwen3-4B shape (head dim 128, 4 query heads per KV head) so one compile serves both.
GPU_SHAPE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=128)


@pytest.fixture(scope="module")
def special_tokenizer():
    """A byte-level tokenizer built in memory, tags added as special tokens: nothing to download,
    so the same tests run on a bare GPU machine."""
    tok = gpu_decode.byte_tokenizer()
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


# -- cascade planning ---------------------------------------------------------------------------
def _rl_group_lanes():
    """Two requests: one with 3 samples (the first forked into 2 branches, one of which forked
    again), one with a single sample; plus a join lane. Returns (lanes, keys, pool)."""
    pool = PagePool(256, 4)
    prompt_a, prompt_b = LaneKV(pool), LaneKV(pool)
    prompt_a.append_slots(10)  # 2 full pages + a partial one, shared by the samples
    prompt_b.append_slots(7)
    samples = prompt_a.fork(3)
    for i, s in enumerate(samples):
        s.append_slots(3 + i)
    branches = samples[0].fork(2)
    for i, b in enumerate(branches):
        b.append_slots(5 + 2 * i)
    nested = branches[1].fork(2)
    for n in nested:
        n.append_slots(2)
    joined_src = samples[1].fork(2)
    for b in joined_src:
        b.append_slots(6)
    joined = join(joined_src)
    joined.append_slots(1)
    (b_sample,) = prompt_b.fork(1)
    b_sample.append_slots(4)
    lanes = [branches[0], *nested, joined, samples[2], b_sample]
    for lane in lanes:  # this step's token
        lane.append_slots(1)
    keys = [["a"] * 5 + ["b"], ["a0", "a0", "a0", "a1", "a2", "b0"]]
    return lanes, keys, pool


# A third level: the branch of sample a0's block that the nested fork's two lanes are in.
NESTED_KEYS = ["a0/0", "a0/1", "a0/1", "a1", "a2", "b0"]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("fixed", [False, True])
def test_cascade_levels_cover_every_view_exactly_once(fixed, nested):
    lanes, keys, pool = _rl_group_lanes()
    pool.check(lanes)
    if nested:
        keys = [*keys, NESTED_KEYS]
    levels = cascade_levels(SlotViews.of(lanes), keys, fixed=fixed)
    assert len(levels) == len(keys) + 1
    seen = [[] for _ in lanes]
    empty = 0
    for level in levels:
        qo, kv = level.qo_indptr.tolist(), level.kv_indptr.tolist()
        assert qo[-1] == len(lanes) and len(qo) == len(kv)
        assert (level.kv_last_page_len == 1).all()
        for g in range(level.num_groups):
            empty += kv[g + 1] == kv[g]
            for q in range(qo[g], qo[g + 1]):
                seen[q] += level.kv_indices[kv[g] : kv[g + 1]].tolist()
    # Only a fixed plan (for the Triton kernels) may give a lane an empty list at a level.
    assert (empty > 0) == fixed
    for lane, slots in zip(lanes, seen, strict=True):
        assert slots == lane.flat_slots(), "levels in order rebuild the lane's view"
    top, middle = levels[:2]
    # Request a's lanes share the prompt's two full pages (its partial page was copied on write).
    assert top.qo_indptr.tolist()[:2] == [0, 5] and top.kv_indptr.tolist()[1] == 8
    # Sample a0's three lanes (branch 0 and the nested fork under branch 1) share to the fork.
    assert middle.qo_indptr.tolist()[:2] == [0, 3]
    if nested:
        # The nested fork's lanes read branch 1's tokens before their fork once, together.
        inner = levels[2]
        assert inner.qo_indptr.tolist()[:3] == [0, 1, 3]
        start, end = inner.kv_indptr.tolist()[1:3]
        first, second = lanes[1].flat_slots(), lanes[2].flat_slots()
        common = next(i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
        above = top.kv_indptr.tolist()[1] + middle.kv_indptr.tolist()[1]
        assert 0 < end - start == common - above


def _unshared_views() -> SlotViews:
    """Three lanes of 5, 9 and 3 tokens that share no pages."""
    pool = PagePool(64, 4)
    lanes = []
    for n in (5, 9, 3):
        lane = LaneKV(pool)
        lane.append_slots(n)
        lanes.append(lane)
    return SlotViews.of(lanes)


def test_fixed_cascade_keeps_every_level_and_pads_groups():
    """CUDA graphs need the same number of levels and groups every step: with ``fixed`` lanes
    that share nothing still get all three levels (empty lists but the last), and the graph
    decoder pads each level to ``batch`` queries in ``batch`` groups."""
    views = _unshared_views()
    keys = [["x", "y", "z"], [1, 2, 3]]
    first, second, last = cascade_levels(views, keys, fixed=True)
    for level in (first, second):
        assert level.kv_indptr.tolist() == [0, 0, 0, 0]
    assert torch.equal(last.kv_indices, flat_level(views).kv_indices)
    qo, kv, indices = backends._padded_groups(last, 3, 6, last=True)
    assert qo.tolist() == [0, 1, 2, 3, 4, 5, 6] and kv.tolist() == [0, 5, 14, 17, 18, 19, 20]
    assert indices[17:].tolist() == [0, 0, 0], "padding queries read the scratch slot"
    qo, kv, indices = backends._padded_groups(first, 3, 6, last=False)
    assert kv.tolist() == [0] * 7 and len(indices) == 0
    # a group of two queries, then one padding query's group, then empty groups
    arrays = ([0, 2], [0, 4], [7, 8, 9, 10], [1])  # qo_indptr, kv_indptr, kv_indices, last
    pair = DecodeLevel(*(torch.tensor(a, dtype=torch.int32) for a in arrays), 4, 2)
    qo, kv, indices = backends._padded_groups(pair, 2, 4, last=False)
    assert qo.tolist() == [0, 2, 3, 4, 4] and kv.tolist() == [0, 4, 4, 4, 4]
    assert indices.tolist() == [7, 8, 9, 10]


def test_cascade_without_sharing_is_flat():
    views = _unshared_views()
    (level,) = cascade_levels(views, [["x", "y", "z"], [1, 2, 3]])
    flat = flat_level(views)
    for a, b in zip(vars(level).values(), vars(flat).values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_cascade_attention_equals_attention_over_each_view():
    lanes, keys, _ = _rl_group_lanes()
    views = SlotViews.of(lanes)
    table = views.table
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(256 * 4, 2, 16, generator=gen)
    v_cache = torch.randn(256 * 4, 2, 16, generator=gen)
    query = torch.randn(len(lanes), 4, 16, generator=gen)
    want = paged_decode_reference(query, k_cache, v_cache, flat_level(views))[0]
    levels = cascade_levels(views, keys)
    got = cascade_decode_attention(query, k_cache, v_cache, levels, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The same, as SDPA over gathered slots computes it (the torch backend).
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query.view(len(lanes), 2, 2, 16),
        k_cache[table.slots].permute(0, 2, 1, 3),
        v_cache[table.slots].permute(0, 2, 1, 3),
        attn_mask=table.mask[:, None, None, :],
    ).reshape(len(lanes), 4, 16)
    torch.testing.assert_close(got, sdpa, rtol=1e-5, atol=1e-5)


# -- choosing a backend -------------------------------------------------------------------------
def test_auto_picks_by_device_and_installed_packages(monkeypatch):
    assert isinstance(make_backend("auto", "cpu"), TorchBackend)
    assert isinstance(make_backend("torch", "cuda"), TorchBackend)
    custom = TritonBackend(cascade=False)
    assert make_backend(custom) is custom
    monkeypatch.setattr(backends, "flashinfer_installed", lambda: False)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert isinstance(make_backend("auto", "cuda"), TritonBackend)
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    assert isinstance(make_backend("auto", "cuda"), TorchBackend)
    monkeypatch.setattr(backends, "flashinfer_installed", lambda: True)
    assert isinstance(make_backend("auto", "cuda"), FlashInferBackend)


def test_auto_leaves_flashinfer_for_a_model_it_has_no_kernels_for(monkeypatch):
    """FlashInfer has no float32 kernels (the trainer's fp32 model on CUDA failed with a KeyError
    in its first decode step) and is built for head dims 64, 128 and 256: ``auto`` picks triton
    for other models, and a FlashInfer backend on CUDA refuses a float32 model."""
    monkeypatch.setattr(backends, "flashinfer_installed", lambda: True)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)

    def model(dtype, head_dim):
        return tiny_model("llama", head_dim=head_dim).to(dtype)

    assert isinstance(make_backend("auto", "cuda", model(torch.bfloat16, 64)), FlashInferBackend)
    assert isinstance(make_backend("auto", "cuda", model(torch.float16, 128)), FlashInferBackend)
    assert isinstance(make_backend("auto", "cuda", model(torch.float32, 64)), TritonBackend)
    assert isinstance(make_backend("auto", "cuda", model(torch.bfloat16, 16)), TritonBackend)
    monkeypatch.setitem(sys.modules, "flashinfer", _FakeFlashInfer())
    with pytest.raises(ValueError, match="FlashInfer has no float32 attention kernels"):
        FlashInferBackend().attach(model(torch.float32, 64), torch.device("cuda"))


def test_backend_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_backend("xformers")
    with pytest.raises(ValueError, match="CUDA"):
        make_backend("flashinfer", "cpu")
    monkeypatch.setattr(backends, "flashinfer_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[gpu\]'"):
        make_backend("flashinfer", "cuda")


def test_engine_default_is_the_torch_path(special_tokenizer):
    engine = Engine(tiny_model("llama", tokenizer=special_tokenizer), special_tokenizer)
    assert (
        engine.attention_backend.name == "torch"
        and engine.runner.backend is engine.attention_backend
    )


# -- equivalence through fork and join ------------------------------------------------------------
def generate_and_check(
    family,
    tokenizer,
    backend,
    *,
    tolerance,
    device="cpu",
    dtype=torch.float32,
    max_new_tokens=48,
    prompts=("What is 2+2?", "Primes?"),
    n=2,
    max_prefill_tokens=8192,
    num_pages=512,
    engines=None,
    **model_overrides,
):
    """Decode with ``backend`` and check the graphs against the dense forward (``engines``: a
    list the engine is appended to)."""
    model = tiny_model(family, tokenizer=tokenizer, dtype=dtype, **model_overrides).to(device)
    engine = Engine(
        model,
        tokenizer,
        page_size=4,
        num_pages=num_pages,
        device=device,
        attention_backend=backend,
        max_prefill_tokens=max_prefill_tokens,
    )
    planned = []
    original = engine.runner.backend.plan_decode

    def spy(lanes, views):
        planned.append(len(lanes))
        return original(lanes, views)

    engine.runner.backend.plan_decode = spy
    if engines is not None:
        engines.append(engine)
    params = SamplingParams(
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        min_branches=2,
        max_branches=3,
        seed=7,
        n=n,
        **SHORT,
    )
    graphs = engine.generate(list(prompts), params, mode="constrained", chat=False)
    assert planned and max(planned) > n, "decode steps ran through the backend, forks too"
    for graph in graphs:
        assert graph.metadata["layout_consistent"]
        assert graph.metadata["forks"] >= 1
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        error = (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max().item()
        assert error <= tolerance, f"{family} {backend}: log-prob error {error}"
    if max_new_tokens >= 48:  # room for three plans and a step on the critical path
        assert any(g.nodes_of("takeaway") for g in graphs), "a join happened"
    assert engine.pool.num_used == 0
    return graphs


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("cascade", [True, False])
def test_level_plans_reproduce_the_dense_forward(family, cascade, special_tokenizer):
    """The triton backend's plans, run by the kernels' torch references (fast on the CPU)."""
    backend = TritonBackend(cascade=cascade, kernels="torch")
    generate_and_check(family, special_tokenizer, backend, tolerance=1e-4, num_hidden_layers=2)


@pytest.mark.parametrize("budget", [2, 5])
def test_prompts_prefilled_in_chunks_through_the_plans_reproduce_the_dense_forward(
    budget, special_tokenizer
):
    """Small prefill budgets split the prompts into chunks: one token per prompt while both are
    being fed at a budget of 2 (a decode step of the backend's plan; prompt lanes belong to no
    sample yet), several per prompt otherwise (padded, the torch path)."""
    backend = TritonBackend(cascade=True, kernels="torch")
    generate_and_check(
        "qwen3",
        special_tokenizer,
        backend,
        tolerance=1e-4,
        num_hidden_layers=2,
        max_prefill_tokens=budget,
    )


@pytest.mark.parametrize("backend", ["triton-cascade", "triton-flat", "flashinfer-cascade"])
def test_preempted_requests_resume_through_the_plans(backend, special_tokenizer, monkeypatch):
    """A pool too small for both prompts: the one preempted is rebuilt by prefill forwards whose
    lanes belong to no sample (each its own level) and decodes on through the plans."""
    if backend.startswith("flashinfer"):
        monkeypatch.setitem(sys.modules, "flashinfer", _FakeFlashInfer())
        attention = FlashInferBackend(cascade=True)
    else:
        attention = TritonBackend(cascade=backend == "triton-cascade", kernels="torch")
    engines = []
    generate_and_check(
        "qwen3",
        special_tokenizer,
        attention,
        tolerance=1e-4,
        num_hidden_layers=2,
        max_new_tokens=64,
        num_pages=56,
        max_prefill_tokens=3,
        engines=engines,
    )
    (engine,) = engines
    assert engine.stats.preemptions > 0 and engine.stats.recomputed_tokens > 0


@pytest.mark.skipif(not backends.triton_installed(), reason="triton is not installed")
def test_triton_backend_reproduces_the_dense_forward(special_tokenizer):
    """The Triton kernels themselves (interpreted on the CPU, so one layer, one prompt, two
    samples and a short generation: the prompt level and the fork's levels)."""
    generate_and_check(
        "qwen3",
        special_tokenizer,
        TritonBackend(),
        tolerance=1e-4,
        device="cuda" if CUDA else "cpu",
        max_new_tokens=26,
        prompts=["Primes?"],
        num_hidden_layers=1,
    )


class _FakeFlashInfer(types.ModuleType):
    """FlashInfer's two wrappers as documented (plan once, run per layer, page tables in CSR
    form, NHD layout), computed by the kernels' torch references; records the calls. Plans
    refuse what FlashInfer 0.6.18 refuses: tables other than int32, a CUDA-graph buffer of
    the wrong size, and a float workspace too small for a CUDA-graph plan (its scheduler pads
    the work to ``max(2 * SMs / kv heads, ceil(batch * group / 16) + batch - 1)`` tiles of 16
    (query, head) rows and keeps float32 partial states of each; an H200's 132 SMs here)."""

    SMS = 132

    def __init__(self):
        super().__init__("flashinfer")
        self.calls = []
        self.in_kernel = 0  # > 0 while a stand-in kernel runs (its torch reference may sync)
        fake = self

        class _Wrapper:
            def __init__(self, *args, **kwargs):
                self.levels = None

            def _check(self, kwargs, page_size, *tables):
                assert page_size == 1 and kwargs["sm_scale"] > 0
                assert kwargs["q_data_type"] == kwargs["kv_data_type"]
                assert all(t.dtype == torch.int32 for t in tables), "FlashInfer's tables are int32"

            def run(self, q, paged_kv_cache):
                k_cache, v_cache = paged_kv_cache
                assert k_cache.dim() == 4 and k_cache.shape[1] == 1, "NHD pages of one slot"
                fake.calls.append("run")
                fake.in_kernel += 1
                try:
                    return cascade_decode_attention(
                        q, k_cache, v_cache, self.levels, scale=self.scale, backend="torch"
                    )
                finally:
                    fake.in_kernel -= 1

        class MultiLevelCascadeAttentionWrapper(_Wrapper):
            def __init__(self, num_levels, workspace, kv_layout="NHD"):
                assert kv_layout == "NHD"
                self.num_levels = num_levels

            def plan(
                self,
                qo_arr,
                kv_indptr_arr,
                kv_indices_arr,
                last_arr,
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
                **kwargs,
            ):
                assert len(qo_arr) == self.num_levels and not kwargs["causal"]
                self._check(kwargs, page_size, *qo_arr, *kv_indptr_arr, *kv_indices_arr, *last_arr)
                for kv_indptr in kv_indptr_arr:  # the engine's rule: kernels disagree on these
                    assert bool((kv_indptr[1:] > kv_indptr[:-1]).all()), "an empty KV list"
                fake.calls.append(f"plan{self.num_levels}")
                self.scale = kwargs["sm_scale"]
                self.levels = [
                    DecodeLevel(*arrays, 0, 0)
                    for arrays in zip(qo_arr, kv_indptr_arr, kv_indices_arr, last_arr, strict=True)
                ]

        class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
            def __init__(
                self,
                workspace,
                kv_layout="NHD",
                use_cuda_graph=False,
                use_tensor_cores=False,
                paged_kv_indptr_buffer=None,
                paged_kv_indices_buffer=None,
                paged_kv_last_page_len_buffer=None,
            ):
                assert kv_layout == "NHD"
                self.graph_mode = use_cuda_graph
                self.workspace_bytes = workspace.numel() * workspace.element_size()
                self.buffers = (
                    paged_kv_indptr_buffer,
                    paged_kv_indices_buffer,
                    paged_kv_last_page_len_buffer,
                )
                if use_cuda_graph:
                    assert all(b is not None for b in self.buffers)
                    assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1

            def plan(
                self,
                indptr,
                indices,
                last_page_len,
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
                **kwargs,
            ):
                self._check(kwargs, page_size, indptr, indices, last_page_len)
                self.scale = kwargs["sm_scale"]
                if self.graph_mode:  # the page table goes into the fixed buffers, as documented
                    fixed_indptr, fixed_indices, fixed_last = self.buffers
                    assert len(last_page_len) == len(fixed_last), (
                        "batch size is fixed in graph mode"
                    )
                    if len(indices) > len(fixed_indices):
                        raise ValueError("The size of indices should be less than or equal to "
                                         "the allocated buffer")  # fmt: skip
                    batch, group = len(last_page_len), num_qo_heads // num_kv_heads
                    padded = max(2 * fake.SMS // num_kv_heads, -(-batch * group // 16) + batch - 1)
                    need = num_qo_heads * padded * 16 * (head_dim + 1) * 4
                    if need > self.workspace_bytes:
                        raise RuntimeError(f"Buffer overflow when allocating memory for "
                                           f"batch_prefill_tmp_v: {need} bytes needed, "
                                           f"{self.workspace_bytes} in the workspace")  # fmt: skip
                    fixed_indptr.copy_(indptr)
                    fixed_indices[: len(indices)].copy_(indices)
                    fixed_last.copy_(last_page_len)
                    fake.calls.append("plan_graph")
                    return
                fake.calls.append("plan_flat")
                qo = torch.arange(len(indptr), dtype=torch.int32)
                self.levels = [DecodeLevel(qo, indptr, indices, last_page_len, 0, 0)]

            def run(self, q, paged_kv_cache):
                if self.graph_mode:  # a replayed kernel sees only the buffers
                    indptr, indices, last = self.buffers
                    qo = torch.arange(len(indptr), dtype=torch.int32)
                    fake.in_kernel += 1  # reading the table's length is the kernel's business
                    used = indices[: int(indptr[-1])]
                    fake.in_kernel -= 1
                    self.levels = [DecodeLevel(qo, indptr, used, last, 0, 0)]
                return super().run(q, paged_kv_cache)

        self.MultiLevelCascadeAttentionWrapper = MultiLevelCascadeAttentionWrapper
        self.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper


@pytest.mark.parametrize("cascade", [True, False])
def test_flashinfer_backend_plans_once_per_step_and_runs_per_layer(
    cascade, special_tokenizer, monkeypatch
):
    fake = _FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    generate_and_check(
        "llama",
        special_tokenizer,
        FlashInferBackend(cascade=cascade),
        tolerance=1e-4,
        num_hidden_layers=2,
    )
    plans = [c for c in fake.calls if c != "run"]
    assert fake.calls.count("run") == 2 * len(plans), "one plan per step, one run per layer"
    if cascade:
        assert {"plan2", "plan3"} & set(plans), "shared prompts and prefixes became levels"
    else:
        assert set(plans) == {"plan_flat"}


# Operations a CUDA graph cannot record: they copy a value to the host (``.item()``, ``bool``,
# ``.tolist()``), need one to size their output, or copy Python data to the device.
_HOST_SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
               "unique", "_unique2", "lift_fresh", "lift_fresh_copy"}  # fmt: skip


class _HostSyncProbe(TorchDispatchMode):
    """Records the operations of :data:`_HOST_SYNCS` run outside the stand-in's kernels."""

    def __init__(self, fake: _FakeFlashInfer | None = None, ops: set[str] = _HOST_SYNCS):
        super().__init__()
        self.fake = fake
        self.ops = ops
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        in_kernel = self.fake is not None and self.fake.in_kernel
        if not in_kernel and func.__name__.split(".")[0] in self.ops:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _ReplayGraph:
    """Stands in for a CUDA graph on the CPU: ``capture`` runs the step once and keeps its output
    tensor; ``replay`` runs it again into that same tensor, so every input must come through the
    static buffers, as in a real replay. With ``probe``, the capture records what it would refuse
    to record (:class:`_HostSyncProbe`)."""

    probe: _HostSyncProbe | None = None

    def capture(self, fn):
        self.fn = fn
        if self.probe is None:
            self.output = fn()
        else:
            with self.probe:
                self.output = fn()
        return self.output

    def replay(self):
        with torch.inference_mode():  # the output is an inference tensor, as the step made it
            self.output.copy_(self.fn())


@pytest.mark.parametrize("family, overlap", [("llama", False), ("qwen3", False), ("llama", True)])
def test_cuda_graph_decode_steps_reproduce_the_dense_forward(
    family, overlap, special_tokenizer, monkeypatch
):
    fake = _FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    probe = _HostSyncProbe(fake)
    monkeypatch.setattr(_ReplayGraph, "probe", probe)
    model = tiny_model(family, tokenizer=special_tokenizer, num_hidden_layers=2)
    engine = Engine(
        model,
        special_tokenizer,
        page_size=4,
        num_pages=512,
        attention_backend=FlashInferBackend(cascade=True),
        max_lanes=10,
        overlap=overlap,  # the picked tokens reach the graph's inputs on the device
    )
    engine.runner.enable_graphs(10, graph_factory=_ReplayGraph)
    graphs = engine.runner.graphs
    assert graphs.buckets == [1, 2, 4, 8, 10]
    params = SamplingParams(
        temperature=1.0, max_new_tokens=48, min_branches=2, max_branches=3, seed=7, n=2, **SHORT
    )
    results = engine.generate(["What is 2+2?", "Primes?"], params, mode="constrained", chat=False)
    # A step feeding more tokens than the largest bucket (forks: every branch feeds its header)
    # runs eagerly; every other decode step replays a graph.
    graphable = sum(fed <= graphs.buckets[-1] for fed in engine.stats.fed_per_step)
    assert graphs.replays == graphable > 0, "every decode step within the buckets replayed a graph"
    assert 1 <= graphs.captures <= len(graphs.buckets), "one capture per bucket used"
    assert fake.calls.count("plan_graph") == graphs.replays
    eager_plans = sum(call.startswith("plan") and call != "plan_graph" for call in fake.calls)
    assert eager_plans == engine.stats.decode_steps - graphable, "eager plans only beyond them"
    for graph in results:
        assert graph.metadata["layout_consistent"] and graph.metadata["forks"] >= 1
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        error = (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max().item()
        assert error <= 1e-4, f"log-prob error {error}"
    assert any(g.nodes_of("takeaway") for g in results), "a join happened"
    assert engine.pool.num_used == 0
    assert probe.seen == [], "a recorded decode step must not wait for the host"


@pytest.mark.skipif(
    not _triton.available("cuda" if CUDA else "cpu"),
    reason="Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("cascade", [False, True])
def test_triton_cuda_graph_decode_steps_reproduce_the_dense_forward(
    cascade, special_tokenizer, monkeypatch
):
    """The Triton kernels (interpreted on the CPU; on CUDA tensors where there is a GPU)
    recorded once per bucket and replayed over the page tables their plan rewrites: each
    group's KV length comes from the device, split over a fixed number of programs (3 here,
    so short lanes leave splits empty); with cascade, all three levels every step, empty lists
    where a lane shares nothing."""
    from kernels import attention_triton

    monkeypatch.setattr(attention_triton, "_num_splits", lambda *args: 3)
    probe = _HostSyncProbe()
    monkeypatch.setattr(_ReplayGraph, "probe", probe)
    device = "cuda" if CUDA else "cpu"
    model = tiny_model("llama", tokenizer=special_tokenizer, num_hidden_layers=1).to(device)
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=256, max_lanes=4,
                    device=device, attention_backend=TritonBackend(cascade=cascade))  # fmt: skip
    engine.runner.enable_graphs(4, graph_factory=_ReplayGraph)
    params = SamplingParams(temperature=1.0, max_new_tokens=36, min_branches=2, max_branches=2,
                            seed=7, max_plan_tokens=3, max_step_tokens=6, max_takeaway_tokens=3)  # fmt: skip
    (graph,) = engine.generate(["What is 2+2?"], params, mode="constrained", chat=False)
    graphs = engine.runner.graphs
    graphable = sum(fed <= graphs.buckets[-1] for fed in engine.stats.fed_per_step)
    assert graphs.replays == graphable > 0 and graphs.captures >= 1
    assert graph.metadata["forks"] == 1 and graph.nodes_of("takeaway"), "through fork and join"
    engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    error = (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max().item()
    assert error <= 1e-4, f"log-prob error {error}"
    assert probe.seen == [], "a recorded decode step must not wait for the host"


@pytest.mark.skipif(
    not _triton.available("cuda" if CUDA else "cpu"),
    reason="Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1",
)
@pytest.mark.slow
def test_triton_cuda_graphs_give_nested_branches_a_level_of_their_own(monkeypatch):
    """An engine for a grammar that nests (Multiverse) records its Triton cascade graphs with a
    level for the branches of nested blocks: they read their enclosing path up to their fork
    once, between them, not once each in their tails (as before: a graph's number of levels is
    fixed); the graphs still reproduce the dense forward."""
    from test_multiverse_engine import check_graph, nested_blocks, nesting

    from npr_graph.engine.runner import ModelRunner

    enable = ModelRunner.enable_graphs
    monkeypatch.setattr(
        ModelRunner,
        "enable_graphs",
        lambda self, n, graph_factory=None, **kw: enable(self, n, _ReplayGraph, **kw),
    )
    decoder_plan = backends._TritonGraphDecoder.plan
    shared_nested = []  # per graphed step: lanes that read a nested level's KV with others

    def spy(self, lanes, views):
        decoder_plan(self, lanes, views)
        assert len(self.levels) == 4, "request, sample, nested branch, tail"
        nested = self.levels[2]  # the recorded buffers, as the graph reads them
        qo, kv = nested.qo_indptr.tolist(), nested.kv_indptr.tolist()
        shared_nested.append(
            sum(qo[g + 1] - qo[g] for g in range(self.batch)
                if qo[g + 1] - qo[g] > 1 and kv[g + 1] > kv[g])
        )  # fmt: skip

    monkeypatch.setattr(backends._TritonGraphDecoder, "plan", spy)
    tok = gpu_decode.byte_tokenizer()
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "multiverse")
    device = "cuda" if CUDA else "cpu"
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1).to(device)
    engine = Engine(model, tok, page_size=4, num_pages=1024, max_lanes=4, device=device,
                    grammar="multiverse", attention_backend=TritonBackend(cascade=True),
                    cuda_graphs=True)  # fmt: skip
    # Short elements and 4 lanes: the interpreter runs every program of a graphed step's grid.
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=70, max_blocks=2,
                            max_branches=2, max_plan_tokens=3, max_step_tokens=8,
                            max_takeaway_tokens=3)  # fmt: skip
    (graph,) = engine.generate(
        ["Q"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
    )
    assert nested_blocks(graph) and engine.runner.graphs.replays > 0
    assert max(shared_nested) >= 2, "a nested block's branches shared their path at its level"
    check_graph(engine, graph)
    assert engine.pool.num_used == 0


def test_cuda_graph_bucket_grows_its_page_table(special_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", _FakeFlashInfer())
    from npr_graph.engine import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "INITIAL_SLOTS_PER_LANE", 8)  # outgrown after a few tokens
    model = tiny_model("llama", tokenizer=special_tokenizer, num_hidden_layers=1)
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=256,
                    attention_backend=FlashInferBackend(cascade=False))  # fmt: skip
    engine.runner.enable_graphs(4, graph_factory=_ReplayGraph)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    (graph,) = engine.generate(["Count: one two three"], params, mode="sequential", chat=False)
    assert engine.runner.graphs.captures >= 2, "the bucket was re-captured with a larger table"
    error = (dense_logprobs(engine.model, graph) - torch.tensor(
        graph.logprobs[graph.prompt_num_tokens :])).abs().max().item()  # fmt: skip
    assert error <= 1e-4
    # Room set before the first step (as the GPU benchmark does for its lanes' longest views):
    # recorded once, the same tokens.
    engine.runner.enable_graphs(4, graph_factory=_ReplayGraph)
    engine.runner.graphs.slots_per_lane = len(graph.token_ids)
    (again,) = engine.generate(["Count: one two three"], params, mode="sequential", chat=False)
    assert engine.runner.graphs.captures == 1 and again.token_ids == graph.token_ids


def test_flashinfer_graph_decoder_of_a_wide_bucket_gets_the_workspace_it_needs(monkeypatch):
    """FlashInfer's CUDA-graph plan pads a batch of b rows to about 1.25 b work tiles and keeps
    float32 partial states for each in the workspace (at Qwen3-4B's heads the default 128 MiB
    holds 407 rows; the benchmark's engines have buckets up to 512). The stand-in refuses a
    plan whose workspace is too small, as FlashInfer does; a wide bucket gets a larger one, a
    narrow one keeps sharing the eager plans'."""
    fake = _FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    model = tiny_model("llama", vocab_size=64, num_hidden_layers=1)  # 4 / 2 heads of 16
    backend = FlashInferBackend(cascade=False, workspace_bytes=2**20)
    backend.attach(model, torch.device("cpu"))
    pool = PagePool(1024, 4)
    batch, lanes = 256, []
    for i in range(batch - 3):  # and 3 padding rows
        lanes.append(LaneKV(pool))
        lanes[-1].append_slots(1 + i % 5)
    views = SlotViews.of(lanes)
    decoder = backend.graph_decoder(batch, indices_needed(views, batch))
    decoder.plan(lanes, views)
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(pool.num_pages * 4, 2, 16, generator=gen) for _ in range(2))
    query = torch.randn(batch, 4, 16, generator=gen)
    got = decoder.decode(query, keys, values, backend.scale)[: len(lanes)]
    want = paged_decode_reference(query[: len(lanes)], keys, values, flat_level(views),
                                  backend.scale)[0]  # fmt: skip
    torch.testing.assert_close(got, want)
    assert backend.graph_workspace(8) is backend._workspace


def test_a_new_flashinfer_graph_decoder_waits_for_the_last_plan(monkeypatch):
    """A new graph decoder replaces a bucket's old one (a re-capture), whose FlashInfer wrapper
    then frees its pinned plan buffer into torch's pinned-memory cache while FlashInfer's own
    copy out of it may still be queued (torch records no event for it): the backend waits for
    the last plan's copy first."""
    monkeypatch.setitem(sys.modules, "flashinfer", _FakeFlashInfer())
    backend = FlashInferBackend(cascade=False)
    backend.attach(tiny_model("llama", vocab_size=64, num_hidden_layers=1), torch.device("cpu"))
    waited = []

    class Event:  # stands in for the CUDA event the last plan recorded
        def synchronize(self):
            waited.append(True)

    backend._last_plan = Event()
    backend.graph_decoder(4, 64)
    assert waited == [True] and backend._last_plan is None


def test_dropped_cuda_graphs_free_their_memory_without_the_cycle_collector(monkeypatch):
    """An engine's graphs hold its KV cache (16 GiB in the GPU benchmark, which builds an engine
    per run) and their memory pool: dropping them must free both at once, not when Python's
    cycle collector next runs (a reference cycle through the graph factory did that)."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))  # no CUDA here
    kv = KVCache(1, 16, 2, 4, torch.float32)
    graphs = DecodeGraphs(torch.nn.Linear(1, 1), kv, None, 4, torch.device("cpu"))
    freed = weakref.ref(graphs)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del graphs
        assert freed() is None
    finally:
        if enabled:
            gc.enable()


def test_cuda_graph_capture_runs_without_the_cycle_collector(monkeypatch):
    """Destroying a CUDA graph (or unloading a Triton kernel) while another graph is recorded
    invalidates the recording, and since torch 2.9 ``torch.cuda.graph`` no longer collects
    garbage before it starts (pytorch#161037): garbage in a reference cycle that holds a graph
    could be collected by Python's automatic collector at any allocation of the recorded
    forward. The capture runs with the collector off. Here torch.cuda's capture is stood in
    for, and the forward drops such garbage and then allocates enough to trigger a collection."""
    recording = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Recording:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            recording.append(True)

        def __exit__(self, *exc):
            recording.clear()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", Recording)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    destroyed = []

    class OldGraph:  # a graph some dropped object still holds, in a reference cycle
        def __init__(self):
            self.cycle = self

        def __del__(self):
            destroyed.append("while recording" if recording else "outside")

    def forward():
        if recording:
            OldGraph()
            kept = [[] for _ in range(20_000)]  # the forward's allocations
            del kept
        return torch.zeros(1)

    gc.collect()
    CudaGraph().capture(forward)
    gc.collect()
    assert destroyed == ["outside"]


def test_cuda_graphs_need_a_capable_backend_and_device(special_tokenizer):
    model = tiny_model("llama", tokenizer=special_tokenizer, num_hidden_layers=1)
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(model, special_tokenizer, num_pages=64, cuda_graphs=True)
    for backend in ("torch", TritonBackend(kernels="torch")):  # references read the host
        engine = Engine(model, special_tokenizer, num_pages=64, attention_backend=backend)
        with pytest.raises(ValueError, match="cannot run in a CUDA graph"):
            engine.runner.enable_graphs(4, graph_factory=_ReplayGraph)


# -- on a GPU -------------------------------------------------------------------------------------
GPU_FAMILIES = ["qwen3", "llama"]


@gpu
@needs_cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_reproduce_the_dense_forward(family, backend, dtype, special_tokenizer):
    if backend == "flashinfer" and not backends.flashinfer_installed():
        pytest.skip("flashinfer is not installed")
    if backend == "flashinfer" and dtype == torch.float32:
        pytest.skip("flashinfer kernels take fp16/bf16")
    tolerance = 2e-3 if dtype == torch.float32 else 0.15
    generate_and_check(
        family,
        special_tokenizer,
        backend,
        tolerance=tolerance,
        device="cuda",
        dtype=dtype,
        max_new_tokens=64,
        **GPU_SHAPE,
    )


@gpu
@needs_cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_gpu_backends_agree_with_the_torch_backend_token_for_token(family, special_tokenizer):
    """Same seed, bf16: each backend samples the torch backend's tokens (where the distributions
    are this close, sampling with one generator picks the same ids) and its log-probs."""
    runs = {}
    names = ["torch", "triton"] + (["flashinfer"] if backends.flashinfer_installed() else [])
    for name in names:
        runs[name] = generate_and_check(
            family,
            special_tokenizer,
            name,
            tolerance=0.15,
            device="cuda",
            dtype=torch.bfloat16,
            max_new_tokens=64,
            **GPU_SHAPE,
        )
    reference = runs.pop("torch")
    for name, graphs in runs.items():
        for want, got in zip(reference, graphs, strict=True):
            n = min(len(want.token_ids), len(got.token_ids))
            prefix = next((i for i in range(n) if want.token_ids[i] != got.token_ids[i]), n)
            a = torch.tensor(want.logprobs[want.prompt_num_tokens : prefix], dtype=torch.float)
            b = torch.tensor(got.logprobs[got.prompt_num_tokens : prefix], dtype=torch.float)
            assert (a - b).abs().max().item() <= 0.1, f"{name} vs torch"


@gpu
@needs_cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
@pytest.mark.parametrize("backend, cascade", [("flashinfer", False), ("triton", False), ("triton", True)])  # fmt: skip
def test_gpu_cuda_graph_decode_matches_eager(family, backend, cascade, special_tokenizer):
    """Real CUDA graphs: log-probs within bf16 noise of the dense forward and of eager decoding
    with the same backend (bf16, same seed), token for token until a last-bit difference flips
    a pick. Neither runs exactly eager's arithmetic: a graph's matrix products run at its
    bucket's batch size, FlashInfer's CUDA-graph plans always split the KV and merge (eager
    ones only when the GPU would not fill), and Triton's graphs split each lane's KV over a
    number of programs fixed at capture (and keep every cascade level)."""
    if backend == "flashinfer" and not backends.flashinfer_installed():
        pytest.skip("flashinfer is not installed")
    model = tiny_model(family, tokenizer=special_tokenizer, dtype=torch.bfloat16, **GPU_SHAPE).to(
        "cuda"
    )
    params = SamplingParams(
        temperature=1.0, max_new_tokens=64, min_branches=2, max_branches=3, seed=7, n=3, **SHORT
    )
    runs = []
    for cuda_graphs in (False, True):
        attention = (FlashInferBackend if backend == "flashinfer" else TritonBackend)(cascade)
        engine = Engine(model, special_tokenizer, page_size=4, num_pages=2048, device="cuda",
                        attention_backend=attention, cuda_graphs=cuda_graphs)  # fmt: skip
        runs.append(engine.generate(["What is 2+2?", "Primes?"], params, mode="constrained",
                                    chat=False))  # fmt: skip
        if cuda_graphs:
            largest = engine.runner.graphs.buckets[-1]
            graphable = sum(fed <= largest for fed in engine.stats.fed_per_step)
            assert engine.runner.graphs.replays == graphable > 0
        assert engine.pool.num_used == 0
    for eager, graphed in zip(*runs, strict=True):
        n = min(len(eager.token_ids), len(graphed.token_ids))
        same = next((i for i in range(n) if eager.token_ids[i] != graphed.token_ids[i]), n)
        assert same > eager.prompt_num_tokens
        a = torch.tensor(eager.logprobs[eager.prompt_num_tokens : same], dtype=torch.float)
        b = torch.tensor(graphed.logprobs[graphed.prompt_num_tokens : same], dtype=torch.float)
        assert (a - b).abs().max().item() <= 0.1  # bf16: the dense-forward check is the tight one
        engine_logprobs = torch.tensor(graphed.logprobs[graphed.prompt_num_tokens :])
        error = (dense_logprobs(model, graphed) - engine_logprobs).abs().max().item()
        assert error <= 0.15, f"{family}: log-prob error {error}"


@gpu
@needs_cuda
@pytest.mark.parametrize("sampling", ["greedy", "top_p"])
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_gpu_overlapped_steps_match_the_plain_engine(
    backend, sampling, special_tokenizer, monkeypatch
):
    """Overlapped graphed steps on a GPU: picked tokens go from the device into the next graph's
    inputs, and to the host through pinned memory after that graph is queued. Greedy and seeded
    top-p (3 candidates: a random model's flat rows reach past them, so overlapped picks
    speculate wrong and are picked again; the default 256 hold every nucleus of this 265-token
    vocabulary), bf16: the plain engine's tokens (until a last-bit difference of
    another batch flips a pick) and log-probs within bf16 noise of the dense forward."""
    if backend == "flashinfer" and not backends.flashinfer_installed():
        pytest.skip("flashinfer is not installed")
    monkeypatch.setattr("npr_graph.engine.sampling.NUCLEUS_CANDIDATES", (3,))
    model = tiny_model("qwen3", tokenizer=special_tokenizer, dtype=torch.bfloat16, **GPU_SHAPE)
    model = model.to("cuda")
    picking = {"greedy": dict(temperature=0), "top_p": dict(temperature=1.0, top_p=0.5, seed=1)}
    params = SamplingParams(max_new_tokens=64, min_branches=2, max_branches=3, n=2, **SHORT,
                            **picking[sampling])  # fmt: skip
    runs = []
    for overlap in (False, True):
        attention = FlashInferBackend(False) if backend == "flashinfer" else TritonBackend(True)
        engine = Engine(model, special_tokenizer, page_size=4, num_pages=2048, device="cuda",
                        attention_backend=attention, cuda_graphs=True, overlap=overlap)  # fmt: skip
        runs.append(engine.generate(["What is 2+2?", "Primes?"], params, mode="constrained",
                                    chat=False))  # fmt: skip
        assert engine.runner.graphs.replays > 0 and engine.pool.num_used == 0
        assert (engine.stats.repicks > 0) == (overlap and sampling == "top_p")
    for plain, overlapped in zip(*runs, strict=True):
        n = min(len(plain.token_ids), len(overlapped.token_ids))
        same = next((i for i in range(n) if plain.token_ids[i] != overlapped.token_ids[i]), n)
        assert same > plain.prompt_num_tokens + 8
        assert overlapped.metadata["layout_consistent"] and overlapped.metadata["forks"] >= 1
        engine_logprobs = torch.tensor(overlapped.logprobs[overlapped.prompt_num_tokens :])
        error = (dense_logprobs(model, overlapped) - engine_logprobs).abs().max().item()
        assert error <= 0.15, f"log-prob error {error}"


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_gpu_preempted_requests_resume_in_graphed_overlapped_steps(backend, special_tokenizer):
    """A pool too small for both prompts, CUDA graphs and overlap on, bf16: the preempted request
    is rebuilt by prefill forwards and decodes on; its log-probs are within bf16 noise of the
    dense forward, and the tokens are a roomy pool's until a last-bit difference flips a pick."""
    if backend == "flashinfer" and not backends.flashinfer_installed():
        pytest.skip("flashinfer is not installed")
    model = tiny_model("qwen3", tokenizer=special_tokenizer, dtype=torch.bfloat16, **GPU_SHAPE)
    model = model.to("cuda")
    params = SamplingParams(temperature=0, max_new_tokens=64, min_branches=2, max_branches=3,
                            n=2, **SHORT)  # fmt: skip
    runs = []
    for pages in (2048, 56):
        attention = FlashInferBackend(True) if backend == "flashinfer" else TritonBackend(True)
        engine = Engine(model, special_tokenizer, page_size=4, num_pages=pages, device="cuda",
                        attention_backend=attention, cuda_graphs=True, overlap=True,
                        max_prefill_tokens=3)  # fmt: skip
        runs.append(engine.generate(["What is 2+2?", "Primes?"], params, mode="constrained",
                                    chat=False))  # fmt: skip
        assert engine.runner.graphs.replays > 0 and engine.pool.num_used == 0
    assert engine.stats.preemptions > 0 and engine.stats.recomputed_tokens > 0
    for roomy, tight in zip(*runs, strict=True):
        n = min(len(roomy.token_ids), len(tight.token_ids))
        same = next((i for i in range(n) if roomy.token_ids[i] != tight.token_ids[i]), n)
        assert same > roomy.prompt_num_tokens + 8
        assert tight.metadata["layout_consistent"]
        engine_logprobs = torch.tensor(tight.logprobs[tight.prompt_num_tokens :])
        error = (dense_logprobs(model, tight) - engine_logprobs).abs().max().item()
        assert error <= 0.15, f"log-prob error {error}"


@gpu
@needs_cuda
def test_gpu_kv_memory_auto_takes_a_share_of_the_free_memory(special_tokenizer, monkeypatch):
    """``kv_memory_bytes="auto"`` on a GPU: AUTO_KV_SHARE of what the card has free once the
    model is on it (here 1%, to leave the card to the other tests), and the engine decodes."""
    from npr_graph.engine import engine as engine_module
    from npr_graph.engine.runner import ModelRunner

    monkeypatch.setattr(engine_module, "AUTO_KV_SHARE", 0.01)
    model = tiny_model("qwen3", tokenizer=special_tokenizer, dtype=torch.bfloat16, **GPU_SHAPE)
    model = model.to("cuda")
    free, _ = torch.cuda.mem_get_info()
    engine = Engine(model, special_tokenizer, device="cuda", kv_memory_bytes="auto")
    expected = int(free * 0.01) // (ModelRunner.bytes_per_slot(model) * engine.pool.page_size)
    assert abs(engine.pool.num_pages - expected) <= 0.05 * expected and expected > 8
    params = SamplingParams(max_new_tokens=16, min_branches=2, max_branches=2, **SHORT)
    (graph,) = engine.generate(["What is 2+2?"], params, mode="constrained", chat=False)
    assert graph.num_tokens > graph.prompt_num_tokens and engine.pool.num_used == 0
