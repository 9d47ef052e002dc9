"""The engine's host work per decode step: a step's time outside the model's forward.

Once a GPU replays the forward as a CUDA graph, what the host does around it (scheduling, slot
lists and page tables, the attention plan, selection, the format) is what widening a block pays
for. This runs a tiny random-weight Qwen3 on the CPU, where the forward is cheap, and times every
call of ``model.forward``; the rest of the decode steps' time (the engine's ``forward_time`` and
``pick_time``: no prefill, no building of the graphs at the end) is the engine's. A width-k
block (structure forced, ``--step-tokens`` per step) against sequential decoding, with the torch
path and with a planned backend (``TritonBackend(kernels="torch")``: the Triton plan, run through
the kernels' torch references, so no GPU or interpreter is needed).

    python benchmarks/engine_host.py [--widths 1,8] [--step-tokens 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_decode  # noqa: E402

from npr_graph.engine import Engine, SamplingParams  # noqa: E402
from npr_graph.engine.backends import TritonBackend  # noqa: E402

BACKENDS = {  # Engine keyword arguments
    "torch": lambda: dict(attention_backend="torch"),
    "planned": lambda: dict(attention_backend=TritonBackend(kernels="torch")),
    # The same, overlapped: on the CPU the forward does not run beside the host, so this shows
    # what the overlapped loop itself costs (steps the engine's text waits for included).
    "planned-overlap": lambda: dict(attention_backend=TritonBackend(kernels="torch"), overlap=True),
}


class TimedForward:
    """Wraps ``model.forward`` and sums the seconds spent in it, those of prefills apart."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forward = model.forward
        self.seconds = self.prefill_seconds = 0.0
        self.prefilling = False
        model.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.forward(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            self.seconds += seconds
            if self.prefilling:
                self.prefill_seconds += seconds

    def watch_prefills(self, engine: Engine) -> None:
        """Count ``engine``'s prefill forwards apart (rebuilds of preempted requests too)."""
        for name in ("_prefill", "_rebuild"):
            method = getattr(engine, name)

            def wrapped(*args, _method=method, **kwargs):
                self.prefilling = True
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.prefilling = False

            setattr(engine, name, wrapped)


def run(model, tokenizer, timer: TimedForward, backend: str, width: int, step_tokens: int) -> dict:
    engine = Engine(model, tokenizer, max_lanes=512, **BACKENDS[backend]())
    timer.watch_prefills(engine)
    if width == 1:
        params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=step_tokens,
                                ignore_eos=True)  # fmt: skip
        mode = "sequential"
    else:
        params = SamplingParams(temperature=1.0, seed=0, min_branches=width, max_branches=width,
                                max_blocks=1, max_plan_tokens=2, max_step_tokens=step_tokens,
                                max_takeaway_tokens=4, max_new_tokens=7 * width + step_tokens + 12,
                                max_total_tokens=10**7, ignore_eos=True,
                                suppress_tokens=gpu_decode.forced_structure(engine))  # fmt: skip
        mode = "constrained"
    timer.seconds = timer.prefill_seconds = 0.0
    engine.generate([gpu_decode.prompt_text(64, 0)], params, mode=mode, chat=False)
    stats = engine.stats
    steps = max(stats.decode_steps, 1)
    # the decode steps' own time (the engine's split of it), not the prefill and the graphs'
    # building at the end that the call's wall time also holds
    decoding = stats.forward_time + stats.pick_time
    model = timer.seconds - timer.prefill_seconds
    return {
        "backend": backend,
        "width": width,
        "decode_steps": stats.decode_steps,
        "decode_s": decoding,
        "call_s": stats.wall_time,
        "ms_per_step": 1e3 * decoding / steps,
        "host_ms_per_step": 1e3 * (decoding - model) / steps,
        "model_ms_per_step": 1e3 * model / steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1,8")
    parser.add_argument("--backends", default="torch,planned")
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best is kept")
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = gpu_decode.byte_tokenizer()
    config = dict(gpu_decode.QUICK, num_hidden_layers=args.layers)
    model = gpu_decode.build_model(config, "cpu", torch.float32, tokenizer)
    timer = TimedForward(model)
    rows = []
    for backend in args.backends.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            run(model, tokenizer, timer, backend, width, 16)  # warm-up
            runs = [run(model, tokenizer, timer, backend, width, args.step_tokens)
                    for _ in range(args.repeats)]  # fmt: skip
            best = min(runs, key=lambda r: r["host_ms_per_step"])
            rows.append(best)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in best.items()}), flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
