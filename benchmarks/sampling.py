"""Token selection per decode step: the batched selection the engine runs where the logits are
(``npr_graph.engine.sampling.select_tokens``) against the row-by-row loop it replaced, which first
copied every row's logits to the host (the engine before this benchmark was written).

Both sides pick from the same ``[rows, vocab]`` float32 logits with one seed per row (a CPU
generator before, a counter-based noise stream now), the way the engine calls them: a constrained lane's banned tags on every row, repetition penalties
on a quarter of them. Times are medians over ``--repeats`` side-by-side rounds.

``--logits model`` takes the rows from the embedded SmolLM2 instead of random numbers: its
next-token logits at successive positions of a short text (real, peaked distributions, whose
top-p nuclei are small; random logits are flat, with nuclei of thousands of tokens).

    python benchmarks/sampling.py [--device cpu|cuda] [--vocab 151936] [--rows 1,8,64]
                                  [--logits random|model] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine.sampling import NoiseStream, SamplingParams, select_tokens  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0),
    "t=1": dict(temperature=1.0),
    "t=0.7,top_p=0.95": dict(temperature=0.7, top_p=0.95),
}


def row_by_row(logits, params, seeds, allowed, banned, penalized):
    """The engine's selection before batching: logits to the host, then one row at a time."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    logits = logits.float().cpu()
    tokens = torch.empty(len(params), dtype=torch.long)
    rows = zip(params, generators, allowed, banned, penalized, strict=True)
    for row, (p, generator, allow, ban, seen) in enumerate(rows):
        choice = logits[row].clone()
        if seen and p.repetition_penalty != 1.0:
            index = torch.tensor(sorted(set(seen)))
            values = choice[index]
            choice[index] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if allow is not None:
            keep = torch.full_like(choice, float("-inf"))
            keep[allow] = 0.0
            choice = choice + keep
        if ban:
            choice[ban] = float("-inf")
        if p.greedy:
            tokens[row] = int(torch.argmax(choice))
            continue
        choice = choice / p.temperature
        if p.top_p < 1.0:
            ranked, order = torch.sort(choice, descending=True)
            probs = ranked.softmax(-1)
            choice = choice.clone()
            choice[order[probs.cumsum(-1) - probs > p.top_p]] = float("-inf")
        probs = torch.softmax(choice, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    temperatures = torch.tensor([p.scoring_temperature for p in params])
    scores = torch.log_softmax(logits / temperatures[:, None], dim=-1)
    return tokens, scores.gather(1, tokens[:, None])[:, 0].tolist()


def batched(logits, params, seeds, allowed, banned, penalized):
    streams = [NoiseStream.seeded(seed) for seed in seeds]
    tokens, logprobs, _ = select_tokens(logits, params, streams, allowed, banned, penalized)
    return torch.tensor(tokens.tolist()), logprobs.tolist()  # what reaches the host


TEXT = (
    "The train left the station at nine and covered the first hundred and eighty kilometres in "
    "two hours. After a short stop it went on, slower now, through hills and small towns, and "
    "reached the coast in the early afternoon, where the passengers stepped out into the wind."
)


def model_logits(rows: int) -> torch.Tensor:
    """The embedded model's next-token logits at the first ``rows`` positions of ``TEXT``."""
    from npr_graph.models import load_model

    model, tokenizer = load_model(tags="text")
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    ids = (ids * (rows // len(ids) + 1))[:rows]
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def case(rows: int, vocab: int, setting: dict, device: str, real: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(rows)
    if real is not None:
        logits = real[:rows].to(device)
    else:
        logits = (torch.randn(rows, vocab, generator=generator) * 3).to(device)
    params = [SamplingParams(repetition_penalty=1.02, **setting)] * rows
    banned = [list(range(8))] * rows
    penalized = [list(range(100, 260)) if row % 4 == 0 else None for row in range(rows)]
    return logits, params, [None] * rows, banned, penalized


def timed(fn, logits, params, allowed, banned, penalized, device) -> float:
    seeds = list(range(len(params)))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(logits, params, seeds, allowed, banned, penalized)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen3's by default")
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logits", choices=("random", "model"), default="random")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    real = None
    if args.logits == "model":
        real = model_logits(max(int(r) for r in args.rows.split(",")))
        args.vocab = real.shape[-1]
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, setting in SETTINGS.items():
            inputs = case(rows, args.vocab, setting, args.device, real)
            for fn in (row_by_row, batched):  # warm-up
                timed(fn, *inputs, args.device)
            if name == "greedy":  # both sides must pick the same tokens
                seeds = list(range(rows))
                old_tokens, _ = row_by_row(*inputs[:2], seeds, *inputs[2:])
                new_tokens, _ = batched(*inputs[:2], seeds, *inputs[2:])
                if not torch.equal(old_tokens, new_tokens):
                    raise SystemExit(f"greedy picks differ at {rows} rows")
            old, new = [], []
            for _ in range(args.repeats):
                old.append(timed(row_by_row, *inputs, args.device))
                new.append(timed(batched, *inputs, args.device))
            result = {
                "rows": rows,
                "vocab": args.vocab,
                "setting": name,
                "logits": args.logits,
                "row_by_row_ms": 1e3 * statistics.median(old),
                "batched_ms": 1e3 * statistics.median(new),
            }
            result["speedup"] = result["row_by_row_ms"] / result["batched_ms"]
            results.append(result)
            print(
                f"rows {rows:3d}  {name:18s} row by row {result['row_by_row_ms']:8.2f} ms   "
                f"batched {result['batched_ms']:8.2f} ms   {result['speedup']:5.2f}x",
                flush=True,
            )
    if args.json:
        print(json.dumps({"device": args.device, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
