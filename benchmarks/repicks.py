"""How often an overlapped step's top-p speculation misses on a real model.

An overlapped decode step (``Engine(overlap=True)``) picks top-k/top-p tokens among the 4,096
best candidates without checking on the host that each row's nucleus ends among them; the host
picks a row again when it did not (``EngineStats.repicks``), which costs a wait for the device
and, if the token changes, a step for that lane. This counts re-picks per sampled token on the
embedded SmolLM2 (constrained mode, bf16, 4 questions x 2 samples) at the evaluation's
settings and hotter ones.

    python benchmarks/repicks.py [--tokens 160] [--questions 4] [--dtype bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine import Engine, SamplingParams  # noqa: E402

QUESTIONS = [
    "What is 17 * 24? Answer in \\boxed{}.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "How many primes are there below 30?",
    "Solve for x: 3x + 7 = 25.",
]
SETTINGS = {"t=0.6,top_p=0.95": (0.6, 0.95), "t=1.0,top_p=0.95": (1.0, 0.95),
            "t=1.0,top_p=0.99": (1.0, 0.99)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=160, help="max new tokens per sample")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many to ask")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    engine = Engine.from_pretrained(dtype=getattr(torch, args.dtype), overlap=True)
    for name, (temperature, top_p) in SETTINGS.items():
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=0, n=2,
                                max_new_tokens=args.tokens)  # fmt: skip
        graphs = engine.generate(QUESTIONS[: args.questions], params, mode="constrained")
        sampled = sum(not f for g in graphs for f in g.forced[g.prompt_num_tokens :])
        repicks = engine.stats.repicks
        rows.append({"sampling": name, "sampled_tokens": sampled, "repicks": repicks,
                     "repicks_per_sampled_token": repicks / max(sampled, 1)})  # fmt: skip
        if not args.json:
            r = rows[-1]
            print(f"{name:18s} {r['repicks']:4d} re-picks / {sampled:5d} sampled tokens "
                  f"({r['repicks_per_sampled_token']:.2%})")  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
