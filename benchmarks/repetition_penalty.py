"""Host time of the repetition penalty per decode step, as a response grows.

A sequential response is one step long, so its penalty reads every id it wrote, every step
(a block's steps read only their own stretch). This times, side by side in one run, the
penalty as the engine applies it (each lane's ids converted to an array once, as they come:
``Lane.token_ids``; the logits indexed by flat position) against the engine's earlier code, kept
here as the reference (each step every row's ids deduplicated and sorted in Python, expanded
into (row, id) lists, indexed by pairs). Rows are lanes of ``length`` tokens drawn from a Zipf
law, as text repeats its ids; each then writes ``steps`` more tokens, one per step, and both
sides penalize the same logits. The run stops with an error if the two sides' logits differ.
Each side's median per step over ``repeats`` rounds, alternating the sides (in turn, the order
swapped every round).

    python benchmarks/repetition_penalty.py [--rows 8,64] [--lengths 256,1024,4096,16384]
                                            [--vocab 49152] [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine.lanes import Lane  # noqa: E402
from npr_graph.engine.sampling import apply_repetition_penalty  # noqa: E402


def reference_penalty(
    logits: torch.Tensor, penalized: Sequence[list[int] | None], penalties: Sequence[float]
) -> None:
    """The engine's earlier repetition penalty (before 2026-11-29)."""
    rows, ids, factors = [], [], []
    for row, (seen, penalty) in enumerate(zip(penalized, penalties, strict=True)):
        if seen and penalty != 1.0:
            unique = sorted(set(seen))
            rows += [row] * len(unique)
            ids += unique
            factors += [penalty] * len(unique)
    if not rows:
        return
    index = (torch.tensor(rows), torch.tensor(ids))
    factor = torch.tensor(factors, dtype=logits.dtype)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / factor, values * factor)


def lanes_of(ids: np.ndarray) -> list[Lane]:
    lanes = []
    for row in ids:
        lane = Lane(None, None, None, 0)
        for token in row.tolist():
            lane.tokens.append(token)
            lane.logprobs.append(0.0)
            lane.forced.append(False)
        lanes.append(lane)
    return lanes


def run_case(rows: int, length: int, vocab: int, steps: int, repeats: int) -> dict:
    rng = np.random.default_rng(length + rows)
    ids = np.minimum(rng.zipf(1.2, (rows, length + steps)), vocab - 1)
    logits = torch.randn(steps, rows, vocab, generator=torch.Generator().manual_seed(rows))
    penalties = [1.1] * rows

    def engine_side() -> tuple[float, torch.Tensor]:
        lanes = lanes_of(ids[:, :length])
        out = logits.clone()
        start = time.perf_counter()
        for step in range(steps):
            apply_repetition_penalty(out[step], [lane.token_ids() for lane in lanes], penalties)
            for lane, token in zip(lanes, ids[:, length + step].tolist(), strict=True):
                lane.tokens.append(token)
        return (time.perf_counter() - start) / steps, out

    def reference_side() -> tuple[float, torch.Tensor]:
        tokens = [row.tolist() for row in ids[:, :length]]
        out = logits.clone()
        start = time.perf_counter()
        for step in range(steps):
            reference_penalty(out[step], tokens, penalties)
            for row, token in zip(tokens, ids[:, length + step].tolist(), strict=True):
                row.append(token)
        return (time.perf_counter() - start) / steps, out

    if not torch.equal(engine_side()[1], reference_side()[1]):
        raise RuntimeError(f"the two sides penalize differently at {rows} rows x {length} ids")
    times: dict[str, list[float]] = {"reference": [], "engine": []}
    for round_ in range(repeats):
        sides = [("reference", reference_side), ("engine", engine_side)]
        for name, side in sides if round_ % 2 == 0 else sides[::-1]:
            times[name].append(side()[0])
    reference, engine = (1e3 * statistics.median(times[k]) for k in ("reference", "engine"))
    return {"rows": rows, "length": length, "reference_ms": reference, "engine_ms": engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="8,64")
    parser.add_argument("--lengths", default="256,1024,4096,16384")
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's by default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for rows in [int(r) for r in args.rows.split(",")]:
        for length in [int(n) for n in args.lengths.split(",")]:
            result = run_case(rows, length, args.vocab, args.steps, args.repeats)
            print(
                f"rows {rows:3d}  ids {length:6d}   reference {result['reference_ms']:8.3f} ms"
                f"   engine {result['engine_ms']:7.3f} ms   "
                f"{result['reference_ms'] / result['engine_ms']:5.1f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
