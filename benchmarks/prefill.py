"""Prefill in chunks under a token budget against one whole-prompt forward: peak memory and time.

The engine feeds admitted prompts in forwards of at most ``max_prefill_tokens`` (rows times the
padded width). This prefills ``--prompts`` prompts of ``--length`` tokens on the embedded
SmolLM2 (one token decoded each, sequential mode) once per budget, each run in a process of its
own so that its peak resident memory (``ru_maxrss``) is its own; the budgets alternate over
``--repeats`` rounds (the order swapped every round) and each reports its median time and peak
memory above the loaded engine. Every run must pick the same tokens, or the script exits 1.

    python benchmarks/prefill.py [--prompts 32] [--length 1024] [--budgets 0,8192,2048]
                                 [--repeats 2] [--threads 2]

A budget of 0 stands for no budget (one forward of every prompt, padded to the longest).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then"]


def one_run(prompts: int, length: int, budget: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from npr_graph.engine import Engine, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(
        kv_memory_bytes=2 * 2**30, max_lanes=max(64, prompts), max_prefill_tokens=budget or 2**62
    )
    text = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)) for i in range(prompts)]
    ids = [engine.encode_prompt(t, chat=False)[:length] for t in text]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    graphs = engine.generate(
        ids, SamplingParams(max_new_tokens=1, temperature=0), mode="sequential"
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "budget": budget,
        "seconds": seconds,
        "peak_mib_above_loaded": (peak - loaded) / 1024,
        "prefill_forwards": engine.stats.prefill_steps,
        "tokens": [g.token_ids[-1] for g in graphs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budgets", default="0,8192,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args.prompts, args.length, args.one, args.threads)))
        return 0
    budgets = [int(b) for b in args.budgets.split(",")]
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    for round_ in range(args.repeats):
        for budget in budgets if round_ % 2 == 0 else budgets[::-1]:
            command = [sys.executable, __file__, "--one", str(budget), "--prompts",
                       str(args.prompts), "--length", str(args.length), "--threads",
                       str(args.threads)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[budget].append(json.loads(out.strip().splitlines()[-1]))
    tokens = {json.dumps(r["tokens"]) for rs in runs.values() for r in rs}
    for budget, rs in runs.items():
        row = {
            "budget": budget or "none",
            "prompts": args.prompts,
            "length": args.length,
            "prefill_forwards": rs[0]["prefill_forwards"],
            "seconds": round(statistics.median(r["seconds"] for r in rs), 2),
            "peak_mib_above_loaded": round(
                statistics.median(r["peak_mib_above_loaded"] for r in rs)
            ),
        }
        print(json.dumps(row), flush=True)
    if len(tokens) != 1:
        print("the budgets picked different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
