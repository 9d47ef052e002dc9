"""Runs ``npr`` commands in one process (under torchrun: on every rank) for the distributed tests.

Usage: ``launcher.py COMMAND [--then COMMAND ...]``. A command is an ``npr`` CLI command line
(``train papo --config ...``) or ``fork SOURCE TARGET STEP``, which starts run directory TARGET
from SOURCE's checkpoint of step STEP (rank 0 copies, every rank waits), ready for ``--resume``.

``grads-check OUT`` checks :meth:`World.all_reduce_grads` on a small model (every rank calls it)
and rank 0 writes what it found to the JSON file OUT.

``launcher.py --record-end ...`` writes how each rank ended to ``ended.rankR.txt`` and keeps
torchrun from stopping a rank early (:func:`record_end`).

The reward ``test_length`` is registered (it has spread even for a random model, so every step has
non-zero advantages), ``test_even_length`` (for ``npr sample``: about half the responses are
correct; it logs which rank graded which problem to ``graded.rankR.txt`` in the working
directory; and every sampled format counts as valid and every sample as ended by the model,
since a random model never writes the boxed answer the format asks for, and seldom its end of
sequence within a short budget) and ``test_even_length_fails_on_rank_1`` (raises a ValueError
on rank 1), ``test_length_fails_on_rank_1`` (raises a ValueError on
rank 1: a bad problem), the advantage estimator ``test_batch_z_by_position`` (graph-level: a
z-score over the whole batch, falling along the response), the loss ``test_papo_nan_once_on_rank_1`` (the ``papo`` loss, except
that its first call on rank 1 returns NaN) and ``test_papo_oom_on_rank_1`` (raises
torch.OutOfMemoryError on rank 1, as CUDA running out of memory would). After every
``Trainer.train`` the launcher writes ``replica_check.json`` to the run's output directory: how
the engine's weights compare with the trained (possibly sharded) weights and with the initial
ones; and every rank writes
``rollouts.rankR.json``: per RL step, each rollout it sampled (group, problem, reward, valid,
token ids) with the advantage and mini-batch place it was trained with (None when not kept).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from npr_graph.cli import main
from papo import advantages, rejection, rewards
from papo import loss as losses
from papo.distributed import init_world
from papo.trainer import Trainer


@rewards.register("test_length")
def length(response: str, reference: str, **_: Any) -> rewards.Reward:
    return rewards.Reward(-len(response) / 100, False, None, None, False)


@rewards.register("test_even_length")
def even_length(response: str, reference: str, **_: Any) -> rewards.Reward:
    """Correct when the response has an even length; each call is logged to
    ``graded.rankR.txt`` (the reference), so a test sees which rank graded which problem."""
    with open(f"graded.rank{_rank()}.txt", "a") as log:
        log.write(reference + "\n")
    return rewards.Reward(0.0, len(response) % 2 == 0, None, None, True)


@rewards.register("test_even_length_fails_on_rank_1")
def even_length_fails_on_rank_1(response: str, reference: str, **_: Any) -> rewards.Reward:
    if dist.is_initialized() and dist.get_rank() == 1:
        raise ValueError(f"test: cannot grade on rank 1 (answer {reference!r})")
    return even_length(response, reference)


rejection.format_valid = lambda graph: True
rejection.ended_by_model = lambda graph: True  # nor its end of sequence, within a short budget


@advantages.register("test_batch_z_by_position")
def batch_z_by_position(graphs, references, rewards_, group_ids):
    """A graph-level estimator of one's own: the reward's z-score over the whole step's batch
    (every rank's graphs), falling linearly to half of it along the response."""
    rewards_ = rewards_.double()  # sums in another order (by rank) round alike
    z = (rewards_ - rewards_.mean()) / (rewards_.std() + 1e-6)
    return [
        value * torch.linspace(1.0, 0.5, graph.num_tokens - graph.prompt_num_tokens)
        for graph, value in zip(graphs, z.tolist(), strict=True)
    ]


batch_z_by_position.graph_level = True  # type: ignore[attr-defined]


_nan_returned = False


@losses.register("test_papo_nan_once_on_rank_1")
def papo_nan_once_on_rank_1(*args: Any, **kwargs: Any) -> losses.LossOutput:
    global _nan_returned
    out = losses.get("papo")(*args, **kwargs)
    if dist.is_initialized() and dist.get_rank() == 1 and not _nan_returned:
        _nan_returned = True
        return losses.LossOutput(out.loss * float("nan"), out.stats)
    return out


@rewards.register("test_length_fails_on_rank_1")
def length_fails_on_rank_1(response: str, reference: str, **_: Any) -> rewards.Reward:
    if dist.is_initialized() and dist.get_rank() == 1:
        raise ValueError(f"test: a bad problem on rank 1 (answer {reference!r})")
    return length(response, reference)


@losses.register("test_papo_oom_on_rank_1")
def papo_oom_on_rank_1(*args: Any, **kwargs: Any) -> losses.LossOutput:
    if dist.is_initialized() and dist.get_rank() == 1:
        raise torch.OutOfMemoryError("test: CUDA out of memory (a stand-in) on rank 1")
    return losses.get("papo")(*args, **kwargs)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _replica_check(trainer: Trainer) -> dict[str, Any]:
    """Collective under torchrun: every rank gathers each sharded parameter."""
    initial = load_file(str(Path(trainer.config.model) / "model.safetensors"))
    engine_params = dict(trainer.engine.model.named_parameters())
    to_sharded, to_initial, dtensors = 0.0, 0.0, 0
    for name, param in trainer.model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        dtensors += isinstance(param, DTensor)
        replica = engine_params[name]
        to_sharded = max(to_sharded, float((replica - full).abs().max()))
        to_initial = max(to_initial, float((replica - initial[name]).abs().max()))
    return {
        "sharded": trainer.sharded,
        "engine_uses_replica": trainer.engine.model is trainer.replica,
        "engine_dtensors": sum(isinstance(p, DTensor) for p in engine_params.values()),
        "trained_dtensors": dtensors,
        "replica_vs_trained": to_sharded,
        "replica_vs_initial": to_initial,
    }


_train = Trainer.train
_rollout = Trainer.rollout
_optimize = Trainer._optimize


def _record_rollouts(self: Trainer, draws: list[tuple[int, int]], step: int):
    out, wall = _rollout(self, draws, step)
    self._test_records = getattr(self, "_test_records", [])
    self._test_step = {}  # id(graph) -> its record, for this step's graphs (alive until it ends)
    for r in out:
        self._test_step[id(r.graph)] = {
            "step": step,
            "group": r.group,
            "problem": r.problem,
            "reward": r.reward.score,
            "valid": r.valid,
            "token_ids": list(r.graph.token_ids),
            "advantage": None,
            "place": None,
        }
    self._test_records.extend(self._test_step.values())
    return out, wall


def _record_advantages(self: Trainer, graphs, token_advantages, temperature, places=None):
    record = getattr(self, "_test_step", {})
    for index, (graph, tokens) in enumerate(zip(graphs, token_advantages, strict=True)):
        if id(graph) in record and tokens is not None:
            record[id(graph)]["advantage"] = float(tokens[0])
            record[id(graph)]["place"] = index if places is None else places[index]
    extra = {} if places is None else {"places": places}
    return _optimize(self, graphs, token_advantages, temperature, **extra)


def _train_and_check(self: Trainer, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    history = _train(self, *args, **kwargs)
    with torch.no_grad():
        report = _replica_check(self)
    if _is_main():
        (self.output_dir / "replica_check.json").write_text(json.dumps(report))
    rollouts = getattr(self, "_test_records", [])
    self.output_dir.mkdir(parents=True, exist_ok=True)
    (self.output_dir / f"rollouts.rank{_rank()}.json").write_text(json.dumps(rollouts))
    return history


Trainer.train = _train_and_check  # type: ignore[method-assign]
Trainer.rollout = _record_rollouts  # type: ignore[method-assign]
Trainer._optimize = _record_advantages  # type: ignore[method-assign]


def grads_check(out: str) -> None:
    """:meth:`World.all_reduce_grads` where no rank, one rank or every rank has a gradient."""
    world = init_world()
    report: dict[str, Any] = {"world_size": world.size}
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    # one real update, so AdamW has momentum that a zero gradient would still apply
    model(torch.ones(1, 3)).sum().backward()
    world.all_reduce_grads(model)
    report["first"] = [p.grad.tolist() for p in model.parameters()]
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    # no rank has a gradient (an empty mini-batch everywhere): none after, and no movement
    optimizer.zero_grad(set_to_none=True)
    world.all_reduce_grads(model)
    report["none_everywhere"] = [p.grad is None for p in model.parameters()]
    optimizer.step()
    report["moved"] = max(
        float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True)
    )
    # only rank 0 has a gradient: every rank gets it
    optimizer.zero_grad(set_to_none=True)
    if world.rank == 0:
        model(torch.full((1, 3), 2.0)).sum().backward()
    world.all_reduce_grads(model)
    report["rank_0_only"] = world.gather([p.grad.tolist() for p in model.parameters()])
    # buckets of 4 values: the weight's 6 span two, the bias shares the second
    for index, p in enumerate(model.parameters()):
        p.grad = torch.arange(p.numel(), dtype=p.dtype).view_as(p) * (world.rank + 1) + index
    world.all_reduce_grads(model, bucket_elements=4)
    report["bucketed"] = world.gather([p.grad.tolist() for p in model.parameters()])
    if world.is_main:
        Path(out).write_text(json.dumps(report))
    world.barrier()


def fork(source: str, target: str, step: int) -> None:
    if _is_main():
        name = f"step_{step:07d}"
        checkpoints = Path(target) / "checkpoints"
        checkpoints.mkdir(parents=True)
        shutil.copytree(Path(source) / "checkpoints" / name, checkpoints / name)
        (checkpoints / "latest").write_text(name + "\n")
        shutil.copy(Path(source) / "metrics.jsonl", Path(target) / "metrics.jsonl")
    if dist.is_initialized():
        dist.barrier()


def run(argv: list[str]) -> int:
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        if command[0] == "fork":
            fork(command[1], command[2], int(command[3]))
        elif command[0] == "grads-check":
            grads_check(command[1])
        elif (code := main(command)) != 0:
            return code
    return 0


def record_end(argv: list[str]) -> int:
    """``run``, writing how this rank ended to ``ended.rankR.txt`` (its exit code, or
    ``raised``). SIGTERM is ignored, so that torchrun, stopping the other ranks when one fails,
    cannot end a rank before a test sees what that rank does by itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ended = "raised"
    try:
        code = run(argv)
        ended = str(code)
        return code
    finally:
        Path(f"ended.rank{os.environ.get('RANK', '0')}.txt").write_text(ended)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record-end"]:
        raise SystemExit(record_end(sys.argv[2:]))
    raise SystemExit(run(sys.argv[1:]))
