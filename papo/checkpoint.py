"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

A checkpoint is a directory ``step_NNNNNNN`` holding the model as a loadable transformers
directory (safetensors weights, config, tokenizer), the optimizer and scheduler states, the RNG
states and ``state.json`` (step, data position, metrics so far). It is written under a temporary
name and renamed into place, and ``latest`` (a one-line file, itself replaced atomically) names
the newest complete one, so a run killed mid-write leaves the previous checkpoint intact.

A sharded (FSDP2) run writes the same format: the weights come from its full replica and the
optimizer state is gathered to full tensors (:func:`full_optimizer_state`), so sharded and
unsharded runs resume from each other's checkpoints (:func:`load_optimizer_state` re-shards).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw: a resume may see fewer (or more)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    *,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``directory`` and point ``latest`` at it. ``model`` must
    hold full weights; ``optimizer_state`` replaces ``optimizer.state_dict()`` (a sharded run
    passes :func:`full_optimizer_state`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:07d}"
    temporary = directory / f".step_{step:07d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    model.save_pretrained(temporary, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(temporary)
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        temporary / "trainer.pt",
    )
    (temporary / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _atomic_write_text(directory / LATEST, final.name + "\n")
    return final


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory``, or None: the one ``latest`` names,
    else (the pointer was lost) the newest ``step_*`` directory, each of which was complete
    when it got its name."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        steps = sorted(Path(directory).glob("step_[0-9]*"), key=lambda p: p.name)
        complete = [path for path in steps if (path / "state.json").is_file()]
        return complete[-1] if complete else None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read checkpoint pointer {pointer}: {error}") from error
    path = Path(directory) / name
    if not name or not (path / "state.json").exists():
        raise ValueError(f"checkpoint {path} named by {pointer} is missing or incomplete")
    return path


def load(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states in place; returns ``state.json``.
    ``model`` takes full weights (a sharded run passes its replica); the optimizer may be over
    sharded parameters."""
    path = Path(path)
    state = _read(path, "state.json", lambda file: json.loads(file.read_text()))
    weights = _read(path, "model.safetensors", _load_weights)
    trainer = _read(path, "trainer.pt", lambda file: torch.load(file, weights_only=False))
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"cannot read checkpoint {path}: state.json holds no step number")
    skipped = state.get("skipped_steps", 0)
    if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
        raise ValueError(
            f"cannot read checkpoint {path}: state.json's skipped_steps is not a count"
        )
    if not isinstance(trainer, dict) or not {"optimizer", "scheduler", "rng"} <= trainer.keys():
        raise ValueError(
            f"cannot read checkpoint {path}: trainer.pt lacks the optimizer, scheduler or RNG state"
        )
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # tensors of another shape
        raise ValueError(f"checkpoint {path} does not fit the model: {error}") from error
    # transformers lists a class's tied keys whether or not this model ties them
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if _ties_head(model) else set()
    untied_missing = [k for k in missing if k not in tied]
    if untied_missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {untied_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    try:
        load_optimizer_state(optimizer, trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise ValueError(
            f"checkpoint {path} does not fit this run: trainer.pt: {error!r}"
        ) from error
    return state


def _ties_head(model: torch.nn.Module) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embeddings.weight


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or the files ``save_pretrained`` split it into (past 50 GB: a
    ``model.safetensors.index.json`` names them)."""
    index = file.with_name(file.name + ".index.json")
    if file.exists() or not index.exists():
        return load_file(str(file))
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index.name} holds no weight_map")
    weights: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(weight_map.values()):
        weights.update(load_file(str(file.with_name(name))))
    return weights


# what reading a damaged or partial checkpoint file raises (torch.load: EOFError on an empty
# file, UnpicklingError on garbage; safetensors: SafetensorError on a cut file)
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def _read(directory: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(directory / name)
    except READ_ERRORS as error:
        raise ValueError(f"cannot read checkpoint {directory}: {name}: {error}") from error


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, keep: bool = True
) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded (DTensor) state gathered into a full tensor:
    what an unsharded run's optimizer would hold. A collective when the parameters are sharded
    (every rank calls it); only where ``keep`` is the result kept (on CPU) and returned."""
    packed = optimizer.state_dict()
    states: dict[int, dict[str, Any]] = {}
    # a fixed order on every rank: each DTensor's full_tensor() is one all-gather
    for index in sorted(packed["state"]):
        entry = {}
        for key in sorted(packed["state"][index]):
            value = packed["state"][index][key]
            if isinstance(value, DTensor):
                value = value.full_tensor()
                value = value.cpu() if keep else None
            entry[key] = value
        states[index] = entry
    if not keep:
        return None
    return {"state": states, "param_groups": packed["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an optimizer state in the unsharded format (full tensors), sharding each per-parameter
    tensor like its parameter where the parameters are DTensors (local slicing, no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        optimizer.load_state_dict(saved)
        return
    states: dict[Any, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        states[index] = {
            key: _shard_like(value, param) if key != "step" else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({"state": states, "param_groups": saved["param_groups"]})


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    if (
        not isinstance(param, DTensor)
        or not isinstance(value, torch.Tensor)
        or isinstance(value, DTensor)
        or value.shape != param.shape
    ):
        return value
    return distribute_tensor(
        value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
    )
