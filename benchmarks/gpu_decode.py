"""GPU decode benchmark: attention backends of the engine against transformers ``generate``.

A random-weight model with Qwen3-4B's shape (36 layers, hidden 2560, 32 query / 8 KV heads of
128, vocabulary 151936) in bf16, built on the GPU from its config (nothing is downloaded), and a
byte-level tokenizer with the format's tags as special tokens. The attention part first, then
the engine parts backend by backend (flashinfer, triton, torch: the best measured completely
under a tight budget); a run is skipped once ``--time-budget`` seconds are spent (recorded):

1. ``attention``: one layer's decode attention for RL groups (8 prompts x 8 samples over 4k
   prompts, and 2 x 64 over 16k prompts; short own tails): flashinfer cascade vs flat, triton
   cascade vs flat, torch (SDPA over gathered slots). CUDA-event timing of back-to-back calls
   and, from the profiler, the time the GPU spends in their kernels; no engine around it.
2. ``widths``: one prompt, one block of k = 2/4/8 parallel steps of ``--step-tokens`` tokens
   each (constrained mode, exactly k plans, elements run to their limits, EOS ignored), per
   backend; width 1 is sequential decoding of ``--step-tokens`` tokens with the same backend,
   and speedup is tokens/s over it.
3. ``rl_group``: 8 prompts x 8 samples of a width-2 block, prompts long enough that the shared
   prefix dominates; cascade vs flat per backend.
4. ``generate``: transformers ``generate`` at batch 1 (the sequential baseline without engine)
   and at batch k for the widest k (batching alone, the reference for the engine's width k).
   ``flashinfer-graphs`` (flat), ``triton-graphs`` (cascade) and ``triton-flat-graphs`` replay
   the decode steps as CUDA graphs; ``*-overlap`` launches each step before the host reads the
   tokens of the one before (``Engine(overlap=True)``).
5. ``profile``: a torch profile of short sequential and width-4 runs of each backend (top
   operators printed; kernel and graph launches and host milliseconds per step recorded).
6. ``selection``: one step's token selection at 8 and 64 rows over the vocabulary, at
   temperature 1 and with top-p: exact (the plain engine: it checks on the host whether the
   partial sort covered each cut) against speculating (an overlapped step: nothing read).

The order of the run: jit, attention, selection, then per backend widths, profile (then, for
the first backend, generate) and rl_group. The result files are rewritten after every part.

    python benchmarks/gpu_decode.py [--quick] [--out DIR] [--time-budget 300] [--backends ...]

``--quick`` shrinks the model and the lengths so the script runs on a CPU in seconds (CI smoke).
Results go to ``DIR/gpu_decode.json`` and a table to ``DIR/gpu_decode.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import forced_structure  # noqa: E402
from kernels.attention import DecodeLevel  # noqa: E402
from npr_graph.engine.backends import (  # noqa: E402
    FlashInferBackend,
    TorchBackend,
    TritonBackend,
    flashinfer_installed,
    triton_installed,
)
from npr_graph.engine.engine import Engine  # noqa: E402
from npr_graph.engine.kv import LaneKV, PagePool, SlotViews  # noqa: E402
from npr_graph.engine.sampling import SamplingParams  # noqa: E402
from npr_graph.models import add_tag_tokens  # noqa: E402

QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151_936,
    max_position_embeddings=40_960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QUICK = dict(QWEN3_4B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024)  # fmt: skip
# What the GPU tests' small models share with Qwen3-4B: the kernels FlashInfer compiles (bf16,
# head dim 128, 4 query heads per KV head), so one JIT compile serves tests and benchmark.
JIT_SHAPE = dict(QWEN3_4B, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)  # fmt: skip
# "*-graphs": decode steps replayed as CUDA graphs (Engine(cuda_graphs=True)); FlashInfer's are
# flat, Triton's cascade unless "-flat". "*-overlap" (any backend): Engine(overlap=True), each
# step's forward launched before the host reads the tokens of the step before.
BACKENDS = ("flashinfer-graphs-overlap", "flashinfer", "flashinfer-graphs", "flashinfer-flat",
            "triton", "triton-graphs", "triton-graphs-overlap", "triton-flat",
            "triton-flat-graphs", "torch")  # fmt: skip
OVERLAP = "-overlap"


def engine_only(name: str) -> bool:
    """Variants that change the engine around the kernels, not the kernels: the attention part
    times their kernels under their plain names."""
    return name.endswith(("-graphs", OVERLAP))


def engine_options(name: str) -> dict:
    """``Engine`` keyword arguments of a benchmark backend name."""
    overlap = name.endswith(OVERLAP)
    kernels = name.removesuffix(OVERLAP)
    return dict(attention_backend=make_backend(kernels), cuda_graphs=kernels.endswith("-graphs"),
                overlap=overlap)  # fmt: skip


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 tokens plus EOS), built in memory: any text
    encodes, ids past its vocabulary decode to empty text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>")


def build_model(config_fields: dict, device: str, dtype: torch.dtype, tokenizer):
    """Random weights, initialised directly on the device (a 4B model in seconds)."""
    import transformers

    fields = dict(config_fields, bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = transformers.Qwen3Config(**fields)
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    add_tag_tokens(model, tokenizer, "npr")
    return model.eval()


def make_backend(name: str):
    return {
        "torch": TorchBackend,
        "triton": lambda: TritonBackend(cascade=True),
        "triton-flat": lambda: TritonBackend(cascade=False),
        "flashinfer": lambda: FlashInferBackend(cascade=True),
        "flashinfer-flat": lambda: FlashInferBackend(cascade=False),
        "flashinfer-graphs": lambda: FlashInferBackend(cascade=False),
        "triton-graphs": lambda: TritonBackend(cascade=True),
        "triton-flat-graphs": lambda: TritonBackend(cascade=False),
    }[name]()


def available(name: str, device: str) -> bool:
    if name == "torch":
        return True
    if device != "cuda":
        return False
    return flashinfer_installed() if name.startswith("flashinfer") else triton_installed()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- 1. attention alone --------------------------------------------------------------------------
def attention_case(model, prompts: int, samples: int, prompt_tokens: int, tail_tokens: int):
    """KV views of an RL group, each prompt forked into samples with their own tails:
    ``(views, lanes, cache shape)``."""
    pool = PagePool(4 + prompts * (prompt_tokens // 16 + samples * (tail_tokens // 16 + 2)), 16)
    kvs, lanes = [], []
    for _ in range(prompts):
        request = object()
        prompt = LaneKV(pool)
        prompt.append_slots(prompt_tokens)
        for kv in prompt.fork(samples):
            kv.append_slots(tail_tokens)
            kvs.append(kv)
            lanes.append(_FakeLane(_FakeSample(request)))
    return SlotViews.of(kvs), lanes, _cache_shape(model, pool)


def nested_attention_case(
    model, paths: int, branches: int, prefix_tokens: int, path_tokens: int, tail_tokens: int
):
    """KV views of one sample: a block of ``paths`` paths after the prefix, each forked again
    into a nested block of ``branches`` branches with their own tails (Multiverse nesting):
    ``(views, lanes, cache shape)``."""
    per_path = path_tokens // 16 + 2 + branches * (tail_tokens // 16 + 2)
    pool = PagePool(4 + prefix_tokens // 16 + paths * per_path, 16)
    sample = _FakeSample(object())
    trunk = LaneKV(pool)
    trunk.append_slots(prefix_tokens)
    trunk_lane = _FakeLane(sample)
    kvs, lanes = [], []
    for p, path in enumerate(trunk.fork(paths)):
        path.append_slots(path_tokens)
        path_lane = _FakeLane(sample, owner=trunk_lane, branch=p)
        for b, kv in enumerate(path.fork(branches)):
            kv.append_slots(tail_tokens)
            kvs.append(kv)
            lanes.append(_FakeLane(sample, owner=path_lane, branch=b))
    return SlotViews.of(kvs), lanes, _cache_shape(model, pool)


def _cache_shape(model, pool: PagePool) -> tuple[int, int, int]:
    config = model.config
    return (pool.num_pages * pool.page_size, config.num_key_value_heads, config.head_dim)


def bench_attention(model, device, dtype, backends, args, budget) -> list[dict]:
    out = []
    for index, (prompts, samples, prefix, tail) in enumerate(args.attention_case):
        row = {"part": "attention", "prompts": prompts, "samples": samples,
               "queries": prompts * samples, "prefix_tokens": prefix, "tail_tokens": tail}  # fmt: skip
        case = attention_case(model, prompts, samples, prefix, tail)
        out += _bench_attention_case(model, device, dtype, backends, args, budget, row, case,
                                     sweep_tiles=index == 0)  # fmt: skip
    if args.nested_case:
        paths, branches, prefix, path_tokens, tail = args.nested_case
        row = {"part": "attention", "nested": f"{paths}x{branches}", "queries": paths * branches,
               "prefix_tokens": prefix, "path_tokens": path_tokens, "tail_tokens": tail}  # fmt: skip
        case = nested_attention_case(model, *args.nested_case)
        out += _bench_attention_case(model, device, dtype, backends, args, budget, row, case,
                                     sweep_tiles=False, unnested=True)  # fmt: skip
    return out


def _bench_attention_case(model, device, dtype, backends, args, budget, row, case, *,
                          sweep_tiles: bool, unnested: bool = False) -> list[dict]:  # fmt: skip
    """Time each backend's decode attention over ``case`` (views, lanes, cache shape); with
    ``sweep_tiles`` also the Triton tile sweep, with ``unnested`` also cascade without the
    levels of nested branches."""
    torch.manual_seed(0)
    config = model.config
    out = []
    views, lanes, shape = case
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(len(views.lengths), config.num_attention_heads, config.head_dim,
                        device=device, dtype=dtype)  # fmt: skip
    scale = config.head_dim**-0.5
    for name in backends:
        if engine_only(name):  # the same kernels as a plain backend
            continue
        if budget.spent():
            out.append({**row, "backend": name, "skipped": "time budget"})
            continue
        if name == "torch":  # what the torch path runs per layer: SDPA over gathered slots
            planners = [(name, lambda: _sdpa_fn(views.table, device))]
        else:
            backend = make_backend(name)
            backend.attach(model, torch.device(device))
            planners = [(name, lambda b=backend: b.plan_decode(lanes, views))]
            if unnested and backend.cascade:
                plain = type(backend)(cascade=True, nested=False)
                plain.attach(model, torch.device(device))
                planners.append((f"{name}-unnested", lambda b=plain: b.plan_decode(lanes, views)))
            if name.startswith("triton") and sweep_tiles:
                # The tiles are a guess made without a GPU: the same plan with other tiles
                # (on the first case only, to save device time)
                for tiles in args.triton_tiles:
                    tuned = TritonBackend(cascade=backend.cascade, tiles=tiles)
                    tuned.attach(model, torch.device(device))
                    planners.append((f"{name}-q{tiles[0]}t{tiles[1]}w{tiles[2]}s{tiles[3]}",
                                     lambda b=tuned: b.plan_decode(lanes, views)))  # fmt: skip
            if name.startswith("flashinfer"):
                # The engine's page tables have one-slot pages (a join view starts mid-page);
                # this case's segments start on page boundaries, so the same levels as whole
                # pages tell what the page size costs.
                levels = _whole_pages(backend.levels(lanes, views), PAGE)
                if levels is not None:
                    planners.append((f"{name}-p{PAGE}",
                                     lambda b=backend, lv=levels: b.plan_levels(lv, PAGE)))  # fmt: skip
        # Each variant is timed right after its plan: FlashInfer wrappers are reused.
        for label, plan in planners:
            try:
                fn = plan()
                seconds = _time_it(lambda fn=fn: fn(query, k_cache, v_cache, scale), device,
                                   args.repeats)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - recorded; the other variants go on
                out.append({**row, "backend": label, "error": repr(error)[:1000]})
                print(f"attention  {label:20s} failed: {error!r}", flush=True)
                continue
            result = {**row, "backend": label, "ms": seconds * 1e3}
            if device == "cuda":
                try:
                    result |= _kernel_time(lambda fn=fn: fn(query, k_cache, v_cache, scale),
                                           args.repeats)  # fmt: skip
                except Exception as error:  # noqa: BLE001 - the event timing stands alone
                    result["kernel_error"] = repr(error)[:1000]
            out.append(result)
            kernels = f"{result['kernel_ms']:8.3f} ms in kernels" if "kernel_ms" in result else ""
            print(f"attention  {label:20s} {_attention_label(row):40s} "
                  f"{seconds * 1e3:8.3f} ms {kernels}", flush=True)  # fmt: skip
    return out


def _attention_label(row: dict) -> str:
    if "nested" in row:
        return "nested {nested}, prefix {prefix_tokens}, paths {path_tokens}".format(**row)
    return "{prompts}x{samples}, prefix {prefix_tokens}".format(**row)


PAGE = 16  # the engine's page size (attention_case allocates pages of 16 slots)
# Triton tiles to try beside the backend's own choice (bf16: 16 or 64 query rows, 32 KV tokens,
# 8 warps, chosen because they spill no registers): query rows / KV tokens / warps / stages.
# 64/64/4/3 was the choice before; those with 4 warps and 64 tokens spill (kernels.compile_check).
TRITON_TILES = "16/64/4/3,64/64/4/3,64/32/4/3,32/32/8/3,32/64/8/3,64/64/8/3,64/16/8/3,64/32/8/2"


def _whole_pages(levels, page: int):
    """``levels`` (one-slot pages) as tables of ``page``-slot pages, or None when a group's
    slots do not run page by page from a page boundary."""
    out = []
    for level in levels:
        bounds = level.kv_indptr.tolist()
        indptr, pages, last = [0], [], []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            slots = level.kv_indices[lo:hi].long()
            count = -(-len(slots) // page)
            first = slots[::page]
            expected = (first[:, None] + torch.arange(page)).flatten()[: len(slots)]
            if int(first[0]) % page or not torch.equal(slots, expected):
                return None
            pages.append(first // page)
            indptr.append(indptr[-1] + count)
            last.append(len(slots) - page * (count - 1))
        out.append(DecodeLevel(level.qo_indptr, torch.tensor(indptr, dtype=torch.int32),
                               torch.cat(pages).to(torch.int32),
                               torch.tensor(last, dtype=torch.int32), level.max_kv_len,
                               level.max_group_size))  # fmt: skip
    return out


def warm_up(tokenizer, device, dtype, backends) -> list[dict]:
    """Compile (JIT) and run each backend's kernels once on a small case, timed."""
    model = build_model(JIT_SHAPE, device, dtype, tokenizer)
    views, lanes, shape = attention_case(model, 2, 2, 64, 16)
    config = model.config
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    query = torch.randn(len(lanes), config.num_attention_heads, config.head_dim,
                        device=device, dtype=dtype)  # fmt: skip
    out = []
    for name in backends:
        if name == "torch" or engine_only(name):
            continue
        start = time.perf_counter()
        try:
            backend = make_backend(name)
            backend.attach(model, torch.device(device))
            backend.plan_decode(lanes, views)(query, k_cache, k_cache, config.head_dim**-0.5)
            sync(device)
        except Exception as error:  # noqa: BLE001 - recorded; the other backends go on
            out.append({"part": "jit", "backend": name, "error": repr(error)[:1000]})
            print(f"jit        {name:16s} failed: {error!r}", flush=True)
            continue
        seconds = time.perf_counter() - start
        out.append({"part": "jit", "backend": name, "seconds": seconds})
        print(f"jit        {name:16s} compiled and ran in {seconds:.1f} s", flush=True)
    return out


class _FakeSample:
    def __init__(self, request):
        self.request = request


class _FakeLane:
    """What the planner reads of an engine lane: its sample (and request), and the block
    branch it is in (``owner``: the lane that forked the block)."""

    def __init__(self, sample: _FakeSample, owner: _FakeLane | None = None, branch=None):
        self.sample, self.owner, self.branch = sample, owner, branch


def _sdpa_fn(table, device):
    slots, mask = table.slots.to(device), table.mask.to(device)

    def run(query, k_cache, v_cache, scale):
        b, heads, dim = query.shape
        kv_heads = k_cache.shape[1]
        k = k_cache[slots].permute(0, 2, 1, 3)
        v = v_cache[slots].permute(0, 2, 1, 3)
        q = query.reshape(b, kv_heads, heads // kv_heads, dim)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], scale=scale
        )

    return run


def _time_it(fn, device, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync(device)
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3 / repeats


def _kernel_time(fn, repeats: int) -> dict:
    """The GPU's own time for one call of ``fn``: the summed durations of its kernels (and
    copies), from the profiler. Event timing of back-to-back calls measures the host instead
    when launching a call's kernels takes longer than running them, as with a cascade's
    several launches per layer: launch cost and kernel cost are separate questions (the first
    goes away in a CUDA graph, the second does not)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not device_events:
        raise RuntimeError("the profiler recorded no GPU activity")
    total_us = sum(e.time_range.elapsed_us() for e in device_events)
    return {"kernel_ms": total_us / 1e3 / repeats, "kernels_per_call": len(device_events) / repeats}


# -- 2./3. the engine ------------------------------------------------------------------------------
def run_engine(model, tokenizer, device, backend_name, *, prompts, n, width, step_tokens,
               kv_bytes, warm_up: int = 0, around=contextlib.nullcontext) -> dict:  # fmt: skip
    """One block of ``width`` steps per sample (constrained, structure forced); width 1 is plain
    sequential decoding of ``step_tokens`` tokens. ``warm_up``: first the same run with steps of
    that many tokens, untimed, on the same engine, so kernels compile (Triton's per tile shape)
    and CUDA graphs are recorded for the batch sizes the run uses before the timing starts.
    ``around()``: a context manager entered around the timed run only (a profiler)."""
    engine = Engine(model, tokenizer, device=device, kv_memory_bytes=kv_bytes, max_lanes=512,
                    **engine_options(backend_name))  # fmt: skip

    def params_for(tokens: int) -> tuple[SamplingParams, str]:
        if width == 1:
            return SamplingParams(temperature=1.0, seed=0, n=n, max_new_tokens=tokens,
                                  ignore_eos=True), "sequential"  # fmt: skip
        # A short header and join, long steps: the block dominates, as in long reasoning.
        return SamplingParams(temperature=1.0, seed=0, n=n, min_branches=width,
                              max_branches=width, max_blocks=1, max_plan_tokens=2,
                              max_step_tokens=tokens, max_takeaway_tokens=4,
                              max_new_tokens=7 * width + tokens + 12, max_total_tokens=10**7,
                              ignore_eos=True, suppress_tokens=forced_structure(engine)
                              ), "constrained"  # fmt: skip

    if engine.runner.graphs is not None:
        # Room for the longest view (a join reads every branch) from the first recording on, so
        # that the warm-up records the graphs the timed run replays (else a table outgrowing
        # its bucket's default room is recorded again while timed).
        longest = max(len(tokenizer.encode(p)) for p in prompts) + 7 * width + 12
        engine.runner.graphs.slots_per_lane = longest + width * step_tokens + 64
    if warm_up:
        params, mode = params_for(warm_up)
        engine.generate(prompts, params, mode=mode, chat=False)
    graphs_before = engine.runner.graphs.captures if engine.runner.graphs else 0
    params, mode = params_for(step_tokens)
    with around():
        sync(device)
        graphs = engine.generate(prompts, params, mode=mode, chat=False)
        sync(device)
    stats = engine.stats
    steps = stats.decode_steps + stats.prefill_steps
    recorded = engine.runner.graphs.captures - graphs_before if engine.runner.graphs else None
    return {
        "graph_captures": recorded,  # while timed (a table outgrowing its bucket's room)
        "generated_tokens": stats.generated_tokens,
        "decode_steps": stats.decode_steps,
        "wall_s": stats.wall_time,
        "tokens_per_s": stats.tokens_per_s,
        "ms_per_step": 1e3 * stats.wall_time / max(steps, 1),
        "mean_lanes_per_step": stats.to_dict()["mean_lanes_per_step"],
        "mean_fed_per_step": stats.to_dict()["mean_fed_per_step"],
        "forward_ms_per_decode_step": 1e3 * stats.forward_time / max(stats.decode_steps, 1),
        "pick_ms_per_decode_step": 1e3 * stats.pick_time / max(stats.decode_steps, 1),
        "widths": sorted({b.width for g in graphs for b in g.blocks}),
    }


def prompt_text(tokens: int, seed: int) -> str:
    """About ``tokens`` byte tokens of varied text (distinct prompts share no KV)."""
    words = [f"w{(seed * 7919 + i * 104729) % 10007}" for i in range(tokens // 6 + 1)]
    return " ".join(words)[:tokens]


def bench_widths(model, tokenizer, device, backends, args, budget, save=None) -> list[dict]:
    out = []
    for backend in backends:
        for width in args.widths:
            row = {"part": "widths", "backend": backend, "width": width,
                   "step_tokens": args.step_tokens}  # fmt: skip
            if budget.spent():
                out.append({**row, "skipped": "time budget"})
                continue
            mark_running(save, out, row)
            try:
                row |= run_engine(model, tokenizer, device, backend, prompts=[prompt_text(64, 0)],
                                  n=1, width=width, step_tokens=args.step_tokens,
                                  kv_bytes=args.kv_bytes, warm_up=args.warm_up_tokens)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - recorded; the other runs go on
                out.append({**row, "error": repr(error)[:1000]})
                print(f"widths     {backend:16s} k={width} failed: {error!r}", flush=True)
                break
            base = next((r for r in out if r.get("backend") == backend and r.get("width") == 1
                         and "tokens_per_s" in r), None)  # sequential, run first  # fmt: skip
            if base:
                row["speedup_vs_width1"] = row["tokens_per_s"] / base["tokens_per_s"]
            out.append(row)
            print(f"widths     {backend:16s} k={width} {row['tokens_per_s']:9.1f} tok/s "
                  f"{row['ms_per_step']:7.2f} ms/step", flush=True)  # fmt: skip
            if save is not None:
                save(out)
    return out


class SyncCounter:
    """A context manager factory counting the operations that made the host wait for the GPU
    (torch's sync debug mode: blocking copies, ``.item()``, stream syncs); ``count`` stays None
    without CUDA."""

    def __init__(self) -> None:
        self.count: int | None = None

    @contextlib.contextmanager
    def __call__(self):
        if not torch.cuda.is_available():
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        self.count = sum("synchroniz" in str(w.message) for w in caught)


# The host calls that launch one kernel, as the profiler names them: the runtime's (torch's own
# kernels, FlashInfer) and the driver's (Triton 3.6 launches through cuLaunchKernelEx).
KERNEL_LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
)


def profile_steps(model, tokenizer, device, backend, args, budget, save=None) -> list[dict]:
    """Where a decode step's time goes: a torch profile of a short sequential run and a short
    width-4 block with ``backend`` (after an untimed warm-up, so compiles and graph captures stay
    out of it), the top operators printed (to ``bench.log``) and the totals of host time per
    category recorded; then the same run again counting the host's waits for the GPU."""
    from torch.profiler import ProfilerActivity, profile

    row = {"part": "profile", "backend": backend, "step_tokens": args.profile_tokens}
    if budget.spent():
        return [{**row, "skipped": "time budget"}]
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device == "cuda")
    out = []
    for width in (1, 4):
        prof = profile(activities=activities)
        mark_running(save, out, {**row, "width": width})
        try:
            stats = run_engine(model, tokenizer, device, backend, prompts=[prompt_text(64, 1)],
                               n=1, width=width, step_tokens=args.profile_tokens,
                               kv_bytes=args.kv_bytes, warm_up=args.warm_up_tokens,
                               around=lambda prof=prof: prof)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded; the other runs go on
            out.append({**row, "width": width, "error": repr(error)[:1000]})
            print(f"profile    {backend} width {width} failed: {error!r}", flush=True)
            continue
        averages = prof.key_averages()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"profile    {backend} width {width}: {stats['ms_per_step']:.2f} ms/step")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
        print(averages.table(sort_by=sort, row_limit=12))
        launches = sum(e.count for e in averages if e.key in KERNEL_LAUNCH_CALLS)
        graph_launches = sum(e.count for e in averages if e.key == "cudaGraphLaunch")
        steps = max(stats["decode_steps"], 1)
        out.append({**row, "width": width, **stats,
                    "kernel_launches_per_step": launches / steps,
                    "graph_launches_per_step": graph_launches / steps,
                    "host_ms_per_step": sum(e.self_cpu_time_total for e in averages) / 1e3 / steps})  # fmt: skip
        if save is not None:
            save(out)
        counter = SyncCounter()
        try:
            counted = run_engine(model, tokenizer, device, backend, prompts=[prompt_text(64, 1)],
                                 n=1, width=width, step_tokens=args.profile_tokens,
                                 kv_bytes=args.kv_bytes, warm_up=args.warm_up_tokens,
                                 around=counter)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded; the profile stands
            out[-1]["host_syncs_error"] = repr(error)[:500]
            continue
        if counter.count is not None:
            out[-1]["host_syncs_per_step"] = counter.count / max(counted["decode_steps"], 1)
    return out


def bench_rl_group(model, tokenizer, device, backends, args, budget, save=None) -> list[dict]:
    out = []
    prompts_n, samples = args.rl_group
    prompts = [prompt_text(args.rl_prompt_tokens, seed) for seed in range(prompts_n)]
    for backend in backends:
        row = {"part": "rl_group", "backend": backend, "prompts": prompts_n, "samples": samples,
               "prompt_tokens": args.rl_prompt_tokens, "step_tokens": args.rl_step_tokens}  # fmt: skip
        if budget.spent():
            out.append({**row, "skipped": "time budget"})
            continue
        mark_running(save, out, row)
        try:
            row |= run_engine(model, tokenizer, device, backend, prompts=prompts, n=samples,
                              width=2, step_tokens=args.rl_step_tokens, kv_bytes=args.kv_bytes,
                              warm_up=args.warm_up_tokens)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded; the other runs go on
            out.append({**row, "error": repr(error)[:1000]})
            print(f"rl_group   {backend:16s} failed: {error!r}", flush=True)
            continue
        out.append(row)
        print(f"rl_group   {backend:16s} {row['tokens_per_s']:9.1f} tok/s "
              f"{row['ms_per_step']:7.2f} ms/step", flush=True)  # fmt: skip
    return out


def bench_selection(device, vocab, args, budget) -> list[dict]:
    """One step's token selection over ``vocab`` ids (peaked rows, as a trained model writes:
    the nucleus within the first candidates) at 8 and 64 rows: exact, as the plain engine
    selects (a partial sort, then a check on the host), and speculating, as an overlapped step
    does (4,096 candidates, nothing read on the host). Back-to-back calls, CUDA-event timed."""
    from npr_graph.engine.sampling import NoiseStream, SamplingParams, select_tokens

    generator = torch.Generator().manual_seed(0)
    settings = {"t=1": dict(temperature=1.0), "t=0.6,top_p=0.95": dict(temperature=0.6, top_p=0.95)}
    out = []
    for rows in (8, 64):
        logits = torch.randn(rows, vocab, generator=generator) * 2
        logits[:, :20] += 14.0
        logits = logits.to(device)
        none = [None] * rows
        for name, fields in settings.items():
            params = [SamplingParams(**fields)] * rows
            for speculate in (False, True):
                row = {"part": "selection", "backend": "speculating" if speculate else "exact",
                       "rows": rows, "vocab": vocab, "sampling": name}  # fmt: skip
                if budget.spent():
                    out.append({**row, "skipped": "time budget"})
                    continue
                streams = [NoiseStream.seeded(r) for r in range(rows)]

                call = functools.partial(select_tokens, logits, params, streams, none, none,
                                         none, speculate=speculate)  # fmt: skip
                counter = SyncCounter()
                with counter():
                    settled = call().settled
                row["ms_per_call"] = _time_it(call, device, args.repeats) * 1e3
                row["host_syncs_per_call"] = counter.count
                row["settled"] = None if settled is None else float(settled.float().mean())
                out.append(row)
                print(f"selection  {rows:3d} rows {name:18s} {row['backend']:12s} "
                      f"{row['ms_per_call']:7.3f} ms/call", flush=True)  # fmt: skip
    return out


def bench_generate(model, tokenizer, device, args, budget, save=None) -> list[dict]:
    """transformers ``generate`` at batch 1 (the sequential baseline) and at the widest engine
    width (what batching alone gives: the engine's width-k run should be at least as fast)."""
    out = []
    ids = torch.tensor([tokenizer.encode(prompt_text(64, 0))], device=device)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=True)  # warm-up
    for batch in sorted({1, max(args.widths)}):
        row = {"part": "generate", "backend": "transformers", "batch": batch,
               "tokens": args.step_tokens}  # fmt: skip
        if budget.spent():
            out.append({**row, "skipped": "time budget"})
            continue
        rows = ids.expand(batch, -1)
        mark_running(save, out, row)
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            model.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True,
                           max_new_tokens=args.step_tokens, min_new_tokens=args.step_tokens)  # fmt: skip
            sync(device)
        seconds = time.perf_counter() - start
        row |= {"wall_s": seconds, "tokens_per_s": batch * args.step_tokens / seconds,
                "ms_per_step": 1e3 * seconds / args.step_tokens}  # fmt: skip
        out.append(row)
        print(f"generate   transformers b{batch:<3}  {row['tokens_per_s']:9.1f} tok/s "
              f"{row['ms_per_step']:7.2f} ms/step", flush=True)  # fmt: skip
    return out


def guarded(part: str, backend: str, run, *args, **kwargs) -> list[dict]:
    """``run(*args, **kwargs)``'s rows, or a row saying why it raised: a part that fails on
    the GPU leaves the parts after it to run."""
    try:
        return run(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - recorded; the other parts go on
        print(f"{part:10s} {backend} failed: {error!r}", flush=True)
        traceback.print_exc()
        return [{"part": part, "backend": backend, "error": repr(error)[:1000]}]


# The row a run leaves while it runs: the next save replaces it with the result, so a run the
# hard time limit kills (past the budget's deadline) is still on record.
RUNNING = "running when the hard time limit came"


def mark_running(save, done: list[dict], row: dict) -> None:
    if save is not None:
        save(done + [{**row, "skipped": RUNNING}])


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


def table(results: list[dict]) -> str:
    lines = ["| part | backend | case | tokens/s | ms/step (attention: ms, GPU kernels) | forward / pick ms | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if r["part"] == "jit":
            continue
        try:  # a failed part's row may lack the fields of its case
            if r["part"] == "attention":
                case = _attention_label(r)
            else:
                case = {"widths": f"width {r.get('width')}", "rl_group": "{prompts}x{samples}",
                        "profile": f"profiled, width {r.get('width')}",
                        "generate": "batch {batch}", "selection": "{rows} rows, {sampling}"}[r["part"]]  # fmt: skip
                case = case.format(**r) if "{" in case else case
        except KeyError:
            case = ""
        if "skipped" in r or "error" in r:
            why = f"skipped ({r['skipped']})" if "skipped" in r else "failed (see the JSON)"
            lines.append(f"| {r['part']} | {r['backend']} | {case} | {why} | | | |")
            continue
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else ""
        ms = f"{r.get('ms_per_step', r.get('ms', r.get('ms_per_call', 0))):.3f}"
        if "kernel_ms" in r:
            ms += f" ({r['kernel_ms']:.3f} in {r['kernels_per_call']:.0f} kernels)"
        speed = f"{r['speedup_vs_width1']:.2f}x" if "speedup_vs_width1" in r else ""
        split = ""
        if "forward_ms_per_decode_step" in r:
            split = f"{r['forward_ms_per_decode_step']:.2f} / {r['pick_ms_per_decode_step']:.2f}"
        lines.append(
            f"| {r['part']} | {r['backend']} | {case} | {tps} | {ms} | {split} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (CPU smoke)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--parts", default="attention,widths,profile,generate,rl_group",
                        help="any of jit,attention,selection,widths,profile,generate,rl_group")  # fmt: skip
    parser.add_argument("--widths", default="1,2,4,8")
    parser.add_argument("--step-tokens", type=int, default=1024)
    parser.add_argument("--rl-group", default="8x8", help="prompts x samples")
    parser.add_argument("--rl-prompt-tokens", type=int, default=2048)
    parser.add_argument("--rl-step-tokens", type=int, default=256)
    # The second case's shared prompts (4.3 GB of flat KV reads per layer) cannot hide in L2.
    parser.add_argument("--attention-case", default="8,8,4096,256;2,64,16384,256",
                        help="prompts,samples,prefix tokens,tail tokens; several: ';'")  # fmt: skip
    parser.add_argument("--nested-case", default="4,4,4096,1024,256",
                        help="attention: paths,branches,prefix tokens,path tokens,tail tokens of "
                             "a block whose paths each fork a nested block ('' for none)")  # fmt: skip
    parser.add_argument("--triton-tiles", default=TRITON_TILES,
                        help="attention: also time the triton backends with these query rows / "
                             "KV tokens per tile / warps / pipeline stages ('' for none)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile-tokens", type=int, default=48,
                        help="tokens per step of the profiled runs")  # fmt: skip
    parser.add_argument(
        "--warm-up-tokens",
        type=int,
        default=16,
        help="untimed run first, with steps this long (0: none); see run_engine",
    )
    parser.add_argument("--kv-gib", type=float, default=16.0)
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds; then skip")
    parser.add_argument("--out", type=Path, default=None, help="folder for the result files")
    args = parser.parse_args(argv)
    if args.quick:
        args.step_tokens, args.rl_prompt_tokens, args.rl_step_tokens = 12, 40, 6
        args.profile_tokens, args.warm_up_tokens = 6, 3
        args.rl_group, args.attention_case, args.repeats, args.widths = "2x2", "2,2,64,8", 2, "1,2"
        args.nested_case = "2,3,32,32,8"
        args.kv_gib = 0.05
    args.widths = [int(w) for w in args.widths.split(",")]
    args.triton_tiles = [
        tuple(int(x) for x in tiles.split("/")) for tiles in args.triton_tiles.split(",") if tiles
    ]
    args.rl_group = tuple(int(x) for x in args.rl_group.split("x"))
    args.attention_case = [
        tuple(int(x) for x in case.split(",")) for case in args.attention_case.split(";") if case
    ]
    args.nested_case = tuple(int(x) for x in args.nested_case.split(",") if x)
    args.kv_bytes = int(args.kv_gib * 2**30)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = [b for b in wanted if available(b, device)]
    parts = set(args.parts.split(","))

    budget = Budget(args.time_budget)
    tokenizer = byte_tokenizer()
    start = time.perf_counter()
    shape = QUICK if args.quick else QWEN3_4B
    model = build_model(shape, device, dtype, tokenizer) if parts - {"jit"} else None
    sync(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "model": "Qwen3-4B shape, random weights" if not args.quick else "quick (tiny) shape",
        "model_build_s": time.perf_counter() - start,
        "backends_run": backends,
        "backends_missing": [b for b in wanted if b not in backends],
        "cuda_graphs": [b for b in backends if engine_options(b)["cuda_graphs"]] or "not used",
        "args": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"
        },  # fmt: skip
    }
    for package in ("triton", "flashinfer"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            info[package] = None
    print(json.dumps({k: info[k] for k in ("date", "device", "torch", "triton", "flashinfer")}))
    results: list[dict] = []

    def save(pending: list[dict] = ()) -> None:
        """Rewrite the result files after every part: a run killed at its hard time limit
        still leaves what it measured."""
        info["total_s"] = time.perf_counter() - start
        if args.out is not None:  # whole files: a kill mid-write leaves the last ones
            args.out.mkdir(parents=True, exist_ok=True)
            report = json.dumps({"info": info, "results": results + list(pending)}, indent=1)
            for name, text in (("gpu_decode.json", report),
                               ("gpu_decode.md", table(results + list(pending)) + "\n")):  # fmt: skip
                partial = args.out / f".{name}.partial"
                partial.write_text(text)
                os.replace(partial, args.out / name)

    # Each part runs guarded: one that raises (a backend failing on the GPU) is recorded as a
    # row with its error, and the parts after it still run.
    if "jit" in parts:
        results += guarded("jit", "-", warm_up, tokenizer, device, dtype, backends)
        save()
    if "attention" in parts:
        results += guarded("attention", "-", bench_attention, model, device, dtype, backends,
                           args, budget)  # fmt: skip
        save()
    if "selection" in parts:
        results += guarded("selection", "-", bench_selection, device, shape["vocab_size"], args,
                           budget)  # fmt: skip
        save()
    # Backend by backend, the best one first, so a tight budget still measures it completely;
    # transformers generate comes after the first backend's widths and profile.
    for index, backend in enumerate(b for b in backends if not b.endswith("-flat")):
        if "widths" in parts:
            results += guarded("widths", backend, bench_widths, model, tokenizer, device,
                               [backend], args, budget, save)  # fmt: skip
            save()
        if "profile" in parts:
            results += guarded("profile", backend, profile_steps, model, tokenizer, device,
                               backend, args, budget, save)  # fmt: skip
            save()
        if index == 0 and "generate" in parts:
            results += guarded("generate", "transformers", bench_generate, model, tokenizer,
                               device, args, budget, save)  # fmt: skip
            save()
        if "rl_group" in parts:
            pair = [backend] + [f"{backend}-flat"] * (f"{backend}-flat" in backends)
            results += guarded("rl_group", backend, bench_rl_group, model, tokenizer, device,
                               pair, args, budget, save)  # fmt: skip
            save()
    save()
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
