"""Decode speed on the embedded model: transformers ``generate`` vs the engine, side by side.

For each DAG width k the engine decodes one block of k parallel steps in constrained mode with
the structure forced (exactly k plans, every element runs to its length limit), which fixes the
total token count N. In the same run, for the same N tokens: transformers ``generate`` at batch 1
(the sequential baseline), the engine in sequential mode, and transformers at batch k (N/k tokens
per row) as the ceiling of what batching alone gives on this machine.

    python benchmarks/decode.py [--quick] [--json] [--dtypes bfloat16,float32] [--widths 2,4,8]
                                [--step-tokens 256] [--repeats 1]   (medians of N back-to-back runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine.engine import Engine  # noqa: E402
from npr_graph.engine.sampling import SamplingParams  # noqa: E402
from npr_graph.models import load_model  # noqa: E402

QUESTION = (
    "A train travels 180 km in 2 hours and then 120 km in 1.5 hours. What is its average speed?"
)


def forced_structure(engine: Engine) -> tuple[int, ...]:
    """Token ids to suppress (``SamplingParams.suppress_tokens``): the elements' closing tags and
    EOS, so every element runs to its limit and each run decodes exactly the planned counts."""
    closers = ("</plan>", "</step>", "</takeaway>")
    return tuple(engine.format.tag_ids[tag] for tag in closers) + tuple(sorted(engine.eos_ids))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def hf_generate(model, prompt_ids: list[int], batch: int, tokens: int) -> float:
    ids = torch.tensor([prompt_ids] * batch)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out, seconds = timed(
            lambda: model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        )
    assert out.shape[1] - ids.shape[1] == tokens
    return seconds


def run_width(engine: Engine, prompt_ids: list[int], width: int, step_tokens: int) -> dict:
    # A short header and join, long steps: the block dominates, as in long reasoning branches.
    params = SamplingParams(
        temperature=0,
        min_branches=width,
        max_branches=width,
        max_blocks=1,
        max_plan_tokens=2,
        max_step_tokens=step_tokens,
        max_takeaway_tokens=4,
        max_new_tokens=7 * width + step_tokens + 12,
        max_total_tokens=100_000,
        ignore_eos=True,
        suppress_tokens=forced_structure(engine),
    )
    (graph,), seconds = timed(lambda: engine.generate([prompt_ids], params, mode="constrained"))
    total = len(graph.token_ids) - graph.prompt_num_tokens
    widths = [b.width for b in graph.blocks]
    assert widths == [width], widths
    prefix = next(graph[b[0]].token_start for b in graph.blocks[0].branches)
    pages = engine.pool.page_size
    own = sum(graph[b[-1]].token_end - graph[b[0]].token_start for b in graph.blocks[0].branches)
    naive_pages = width * -(-prefix // pages) + -(-own // pages)
    return {
        "tokens": total,
        "seconds": seconds,
        "tok_s": total / seconds,
        "decode_steps": engine.stats.decode_steps,
        "peak_kv_pages": engine.stats.peak_kv_pages,
        "naive_kv_pages": naive_pages,
    }


def bench_dtype(dtype: str, widths: list[int], step_tokens: int, repeats: int = 1) -> dict:
    """Per width: the four runs back to back, ``repeats`` times; each side's median time."""
    model, tokenizer = load_model(None, dtype=dtype, tags="special")
    engine = Engine(model, tokenizer)
    prompt_ids = engine.encode_prompt(QUESTION)
    # Warm up every timed path: the first constrained block and the first batched generate pay
    # one-time costs (width 2's first block took 7% longer than the next ones, bf16, one core).
    hf_generate(model, prompt_ids, 1, 4)
    hf_generate(model, prompt_ids, 2, 4)
    engine.generate(
        [prompt_ids], SamplingParams(temperature=0, max_new_tokens=4), mode="sequential"
    )
    run_width(engine, prompt_ids, 2, 4)
    rows = {}
    for width in widths:
        times: dict[str, list[float]] = {"parallel": [], "engine_seq": [], "hf_1": [], "hf_k": []}
        for _ in range(repeats):
            parallel = run_width(engine, prompt_ids, width, step_tokens)
            times["parallel"].append(parallel["seconds"])
            tokens = parallel["tokens"]
            sequential = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
            (graph,), seconds = timed(
                lambda p=sequential: engine.generate([prompt_ids], p, mode="sequential")
            )
            times["engine_seq"].append(seconds)
            assert len(graph.token_ids) - graph.prompt_num_tokens == tokens
            times["hf_1"].append(hf_generate(model, prompt_ids, 1, tokens))
            per_row = -(-tokens // width)
            times["hf_k"].append(hf_generate(model, prompt_ids, width, per_row))
        par, engine_seq, hf_1, hf_k = (statistics.median(times[k]) for k in times)
        rows[width] = {
            "tokens": tokens,
            "repeats": repeats,
            "hf_batch1_tok_s": tokens / hf_1,
            f"hf_batch{width}_tok_s": per_row * width / hf_k,
            "engine_sequential_tok_s": tokens / engine_seq,
            "engine_parallel_tok_s": tokens / par,
            "ceiling": (per_row * width / hf_k) / (tokens / hf_1),
            "speedup_vs_hf": hf_1 / par,
            "speedup_vs_engine_sequential": engine_seq / par,
            "engine_vs_hf_batch_k": (tokens / par) / (per_row * width / hf_k),
            "seq_latency_ratio": engine_seq / hf_1,
            "engine_parallel_decode_steps": parallel["decode_steps"],
            # generate's first forward is the prefill (the engine's decode steps leave it out)
            f"hf_batch{width}_decode_steps": per_row - 1,
            "peak_kv_pages": parallel["peak_kv_pages"],
            "naive_kv_pages": parallel["naive_kv_pages"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="bf16 only, widths 2 and 8, short steps"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--widths", default="2,4,8")
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=1, help="run each side N times, report medians"
    )
    args = parser.parse_args()
    dtypes = ["bfloat16"] if args.quick else args.dtypes.split(",")
    widths = [2, 8] if args.quick else [int(w) for w in args.widths.split(",")]
    step_tokens = 64 if args.quick else args.step_tokens
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    }
    for dtype in dtypes:
        results[dtype] = bench_dtype(dtype, widths, step_tokens, args.repeats)
    summary = {
        "ceiling": {w: r["ceiling"] for w, r in results[dtypes[0]].items()},
        "speedup_vs_hf": {w: r["speedup_vs_hf"] for w, r in results[dtypes[0]].items()},
        # the goal is "no slower than generate": the worst width is the one that can miss it
        "seq_latency_ratio": max(r["seq_latency_ratio"] for r in results[dtypes[0]].values()),
        "engine_vs_hf_batch_k": {
            w: r["engine_vs_hf_batch_k"] for w, r in results[dtypes[0]].items()
        },
    }
    if args.json:
        print(json.dumps({**summary, "dtype": dtypes[0], "results": results}))
        return
    print(results["machine"])
    for dtype in dtypes:
        print(f"\n{dtype}: tokens/s (same total tokens per width)")
        header = f"{'width':>5} {'tokens':>6} {'HF b1':>7} {'HF bk':>7} {'eng seq':>8} {'eng par':>8} {'par/seq':>8} {'par/HFbk':>8} {'seq lat':>8} {'KV pages':>12} {'steps par/HFbk':>15}"
        print(header)
        for width, r in results[dtype].items():
            print(
                f"{width:>5} {r['tokens']:>6} {r['hf_batch1_tok_s']:>7.1f} {r[f'hf_batch{width}_tok_s']:>7.1f} "
                f"{r['engine_sequential_tok_s']:>8.1f} {r['engine_parallel_tok_s']:>8.1f} "
                f"{r['speedup_vs_engine_sequential']:>7.2f}x {r['engine_vs_hf_batch_k']:>7.2f}x {r['seq_latency_ratio']:>8.2f} "
                f"{r['peak_kv_pages']:>5} / {r['naive_kv_pages']:<5} "
                f"{r['engine_parallel_decode_steps']:>7} / {r[f'hf_batch{width}_decode_steps']:<6}"
            )


if __name__ == "__main__":
    main()
