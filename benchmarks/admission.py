"""Continuous admission against fixed batches of prompts.

Decoding a list of prompts B at a time, one engine call per batch, leaves lanes idle while each
call's longest prompt finishes; one call with ``max_running=B`` admits the next prompt as soon
as one ends (what ``npr eval --batch`` and ``npr sample`` now do). This decodes the same prompts
both ways on the embedded SmolLM2, seeded, each prompt with its own token budget (spread like
answer lengths), the two sides alternating, and reports wall time, tokens/s, decode steps and
lanes per step, and how many samples came out the same (in float32 all must, else it exits 1).

    python benchmarks/admission.py [--prompts 16] [--batch 4] [--samples 2] [--min-tokens 16] \
        [--max-tokens 160] [--mode sequential] [--repeats 2] [--dtype bfloat16] [--json] \
        [--kv-pages N] [--sides batches,continuous]

``--kv-pages`` gives the engine a pool of N pages of 16 slots, to see how admission fares when
the pool, not ``--batch``, bounds what runs (``--batch 0``: no bound): each run also reports
its preemptions, prefill forwards and the tokens it fed again to resume preempted prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine import Engine, SamplingParams  # noqa: E402
from npr_graph.graph import FinishReason  # noqa: E402

SIDES = ("batches", "continuous")


def questions(count: int) -> list[str]:
    rng = random.Random(0)
    return [
        f"What is {rng.randint(11, 99)} * {rng.randint(11, 99)}? Explain, then answer in \\boxed{{}}."
        for _ in range(count)
    ]


def budgets(count: int, low: int, high: int) -> list[int]:
    """Evenly spread from ``low`` to ``high``, in a fixed shuffled order."""
    spread = [round(low + (high - low) * i / max(count - 1, 1)) for i in range(count)]
    random.Random(1).shuffle(spread)
    return spread


def decode(engine: Engine, side: str, prompts, params, mode: str, batch: int) -> dict:
    started = time.perf_counter()
    graphs, lanes = [], []
    preemptions = prefills = recomputed = 0
    if side == "batches":
        size = batch or len(prompts)
        for first in range(0, len(prompts), size):
            chunk = slice(first, first + size)
            graphs += engine.generate(prompts[chunk], params[chunk], mode=mode)
            lanes += engine.stats.lanes_per_step
            preemptions += engine.stats.preemptions
            prefills += engine.stats.prefill_steps
            recomputed += engine.stats.recomputed_tokens
    else:
        graphs = engine.generate(prompts, params, mode=mode, max_running=batch or None)
        lanes = list(engine.stats.lanes_per_step)
        preemptions, prefills = engine.stats.preemptions, engine.stats.prefill_steps
        recomputed = engine.stats.recomputed_tokens
    wall = time.perf_counter() - started
    tokens = sum(g.num_tokens - g.prompt_num_tokens for g in graphs)
    return {
        "side": side,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "decode_steps": len(lanes),
        "mean_lanes_per_step": sum(lanes) / max(len(lanes), 1),
        "preemptions": preemptions,
        "prefill_forwards": prefills,
        "recomputed_tokens": recomputed,
        "cut": sum(g.metadata["finish_reason"] == FinishReason.KV_EXHAUSTED for g in graphs),
        "token_ids": [g.token_ids for g in graphs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="prompts decoding at once (0: all)")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--mode", default="sequential", choices=["sequential", "constrained"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-pages", type=int, default=None, help="KV pool pages (16 slots)")
    parser.add_argument("--sides", default=",".join(SIDES), help="which of " + ", ".join(SIDES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sides = tuple(args.sides.split(","))
    if not sides or not set(sides) <= set(SIDES):
        parser.error(f"--sides: a comma-separated subset of {', '.join(SIDES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(dtype=getattr(torch, args.dtype), num_pages=args.kv_pages)
    prompts = questions(args.prompts)
    params = [
        SamplingParams(temperature=0.7, seed=i, n=args.samples, max_new_tokens=b)
        for i, b in enumerate(budgets(args.prompts, args.min_tokens, args.max_tokens))
    ]
    warm = SamplingParams(n=args.samples, max_new_tokens=4)
    engine.generate(prompts[:2], warm, mode=args.mode)  # one-time costs, untimed
    runs = []
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            runs.append(decode(engine, side, prompts, params, args.mode, args.batch))
            if not args.json:
                r = runs[-1]
                print(f"{side:10s} {r['wall_s']:7.2f} s {r['tokens']:6d} tokens "
                      f"{r['tokens_per_s']:7.1f} tok/s {r['decode_steps']:5d} steps "
                      f"{r['mean_lanes_per_step']:5.2f} lanes/step {r['preemptions']:4d} "
                      f"preemptions {r['prefill_forwards']:4d} prefills "
                      f"{r['recomputed_tokens']:5d} recomputed")  # fmt: skip
    first = {side: next(r for r in runs if r["side"] == side) for side in sides}
    samples = len(runs[0]["token_ids"])
    same = samples
    if len(sides) == 2:
        pairs = zip(first["batches"]["token_ids"], first["continuous"]["token_ids"], strict=True)
        same = sum(a == b for a, b in pairs)
    # tokens/s, not wall time: in bfloat16 the sides may sample different tokens, so unequal work
    rates = {
        side: statistics.median(r["tokens_per_s"] for r in runs if r["side"] == side)
        for side in sides
    }
    summary = {
        "same_samples": same,
        "samples": samples,
        "speedup": rates["continuous"] / rates["batches"] if len(sides) == 2 else None,
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
    }
    if args.json:
        print(json.dumps(summary))
    elif len(sides) == 2:
        print(f"same samples: {same} of {samples}; continuous admission "
              f"{summary['speedup']:.2f}x the batches' speed (median tokens/s)")  # fmt: skip
    if args.dtype == "float32" and same != samples:
        # float32 leaves no near-tie for another batch shape to flip: a difference is a bug
        print("the two sides sampled different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
