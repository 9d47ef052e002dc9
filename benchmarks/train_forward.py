"""Training forward + backward on reasoning graphs: packed graph attention vs the reference.

The reference NPR SFT code trains one sample at a time with a dense ``[L, L]`` float mask (the
attention bias) and full ``[L, vocab]`` logits. ``papo.forward`` packs several graphs into one
row, runs attention group by group from the compact mask (no ``[L, L]`` matrix) and computes
log-probs chunk by chunk through ``kernels.token_logprobs``. Both compute the same per-token
log-probs and gradients (checked in the run, which stops if they differ); this script times
forward + backward of the summed log-probs, the two sides alternating, at 4k and 16k tokens per
batch.

The model has SmolLM2-135M's shape (hidden 576, 9 query / 3 KV heads, vocab 49k) with fewer
layers (``--layers``, default 4) and random weights: the comparison is about attention masking
and logits, which do not depend on the weights, and a 30-layer backward at 16k tokens would take
many minutes per repeat on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph import load_smollm2, machine_info, make_trace, with_special_tags  # noqa: E402

import npr_graph as ng  # noqa: E402
from papo.data import pack  # noqa: E402
from papo.forward import row_logprobs  # noqa: E402


def smollm2_shaped_model(tokenizer: Any, layers: int, seed: int = 0) -> torch.nn.Module:
    from npr_graph.models import tiny_model

    return tiny_model(
        "llama",
        tokenizer=tokenizer,
        seed=seed,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ).train()


def make_graphs(tokenizer: Any, samples: int, tokens: int, seed: int = 0) -> list[Any]:
    prompt = tokenizer.encode("Count the lattice points in the region.", add_special_tokens=False)
    graphs = []
    for i in range(samples):
        response = make_trace(tokenizer, tokens - len(prompt), seed=seed + i)
        ids = prompt + tokenizer.encode(response, add_special_tokens=False)
        graphs.append(ng.parse(ids, tokenizer=tokenizer, prompt_ids=prompt))
    return graphs


def reference_logprobs(model: torch.nn.Module, graph: Any) -> torch.Tensor:
    """One sample, a dense float mask (0 / -inf) and full logits, as the reference trains."""
    ids = torch.tensor(graph.token_ids)[None]
    allowed = ng.attention_mask(graph)
    bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
    logits = model(
        input_ids=ids, attention_mask=bias[None, None], position_ids=ng.position_ids(graph)[None]
    ).logits[0]
    start = graph.prompt_num_tokens
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs[start - 1 : -1].gather(1, ids[0, start:, None]).squeeze(1)


def run_reference(model: torch.nn.Module, graphs: list[Any]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    values = []
    for graph in graphs:
        logprobs = reference_logprobs(model, graph)
        logprobs.sum().backward()
        values.append(logprobs.detach())
    return torch.cat(values)


def run_packed(model: torch.nn.Module, graphs: list[Any], row_tokens: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    values = {}
    for row in pack(graphs, max_tokens=row_tokens):
        logprobs, _ = row_logprobs(model, row)
        logprobs.sum().backward()
        for sample, positions in row.response_slices():
            offset = int(row.scored[: positions.start].sum())
            count = int(row.scored[positions].sum())
            values[sample] = logprobs.detach()[offset : offset + count]
    return torch.cat([values[i] for i in range(len(graphs))])


def gradients(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def max_gradient_diff(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """The largest difference of two gradient lists relative to the largest gradient entry; inf
    when one side has a gradient the other lacks."""
    scale = max((float(g.abs().max()) for g in a if g is not None), default=0.0) or 1.0
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return float("inf")
        if x is not None:
            worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


LOGPROB_TOLERANCE = 1e-3  # fp32: the two paths differ by ~3e-6 (docs/BENCHMARKS.md)
GRADIENT_TOLERANCE = 1e-3  # relative to the largest gradient entry


def bench(tokenizer: Any, model: torch.nn.Module, samples: int, tokens: int, repeats: int) -> dict:
    """Forward + backward of both sides: one warm-up each (whose log-probs and gradients are
    compared: the two sides must compute the same thing), then ``repeats`` rounds alternating the
    sides, so drift on a shared machine hits both; each side's median."""
    graphs = make_graphs(tokenizer, samples, tokens)
    total = sum(g.num_tokens for g in graphs)
    sides = {
        "reference": lambda: run_reference(model, graphs),
        "packed": lambda: run_packed(model, graphs, row_tokens=total),
    }
    values, grads = {}, {}
    for name, fn in sides.items():  # warm-up
        values[name] = fn()
        grads[name] = gradients(model)
    logprob_diff = float((values["reference"] - values["packed"]).abs().max())
    gradient_diff = max_gradient_diff(grads["reference"], grads["packed"])
    del grads
    if not (logprob_diff <= LOGPROB_TOLERANCE and gradient_diff <= GRADIENT_TOLERANCE):
        raise RuntimeError(
            f"the packed forward differs from the reference: log-probs by {logprob_diff:.2e}, "
            f"gradients by {gradient_diff:.2e} (relative)"
        )
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    reference_s, packed_s = (statistics.median(times[name]) for name in sides)
    return {
        "samples": samples,
        "tokens_per_sample": tokens,
        "batch_tokens": total,
        "reference_s": reference_s,
        "packed_s": packed_s,
        "reference_tokens_per_s": total / reference_s,
        "packed_tokens_per_s": total / packed_s,
        "speedup": reference_s / packed_s,
        "reference_mask_mib_per_sample": max(g.num_tokens for g in graphs) ** 2 * 4 / 2**20,
        "max_logprob_diff": logprob_diff,
        "max_gradient_diff": gradient_diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="4k tokens only, 1 repeat")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = with_special_tags(load_smollm2())
    model = smollm2_shaped_model(tokenizer, args.layers)
    # (samples, tokens each): 4 x 1k = 4k tokens, 4 x 4k = 16k tokens
    shapes = [(4, 1024)] if args.quick else [(4, 1024), (4, 4096)]
    repeats = 1 if args.quick else args.repeats
    results = {
        "machine": machine_info(),
        "layers": args.layers,
        "runs": [bench(tokenizer, model, s, t, repeats) for s, t in shapes],
    }
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        f"{'batch':>14} {'reference tok/s':>16} {'packed tok/s':>13} {'speedup':>8} {'max diff':>9}"
    )
    for r in results["runs"]:
        label = f"{r['samples']}x{r['tokens_per_sample']}"
        print(
            f"{label:>14} {r['reference_tokens_per_s']:>16.1f} {r['packed_tokens_per_s']:>13.1f} "
            f"{r['speedup']:>7.2f}x {r['max_logprob_diff']:>9.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
