"""Per-step training metrics (a JSONL file, TensorBoard and a console line) and the rollout log."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from rich.console import Console


class StepLogger:
    """Appends one JSON line per step to ``DIR/metrics.jsonl`` (resumed runs continue the file),
    writes the numeric metrics to TensorBoard under ``DIR/tensorboard`` and prints a short line."""

    CONSOLE_KEYS = (
        "loss",
        "reward",
        "accuracy",
        "format_valid_rate",
        "dropped_rollouts",
        "pool_cut_rollouts",
        "parallel_rate",
        "mean_width",
        "rollout_tokens_per_s",
        "grad_norm",
        "lr",
        "eval_accuracy",
        "eval_parallel_rate",
    )

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        console: Console | None = None,
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (a resumed run redoes them), and lines that are not
        a step's record: a run killed mid-write leaves its last line cut."""
        if self.enabled:
            truncate_steps(self.path, step, self.console)

    def logged(self, step: int) -> bool:
        """Whether the log holds a line of ``step``."""
        if not self.enabled or not self.path.exists():
            return False
        with self.path.open("rb") as file:
            return any(_raw_step(raw) == step for raw in file if raw.strip())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as file:
            file.write(json.dumps(record, allow_nan=True) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()
        shown = "  ".join(
            f"{key}={_short(metrics[key])}" for key in self.CONSOLE_KEYS if key in metrics
        )
        skipped = f"  [yellow]skipped: {metrics['skipped']}[/]" if metrics.get("skipped") else ""
        self.console.print(f"step {step}  {shown}{skipped}", highlight=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RolloutLog:
    """``DIR/rollouts.jsonl``: every rollout of the steps the trainer logs, one JSON line each
    (``Trainer._rollout_records``), appended one step at a time; a resumed
    run drops the lines of the steps it redoes."""

    def __init__(
        self, output_dir: str | Path, *, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.path = Path(output_dir) / "rollouts.jsonl"

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            truncate_steps(self.path, step, self.console)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # ASCII: a lone surrogate (an answer read from a JSON escape) is written as its escape
        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
        with self.path.open("a", encoding="ascii") as file:
            file.write(lines)


def truncate_steps(path: Path, step: int, console: Console) -> None:
    """Keep the lines of ``path`` that record a step up to ``step``; say how many lines that
    are not a step's record (a kill mid-write cuts the last one) were dropped. Lines are read
    one at a time (a rollout log holds gigabytes); when what goes is the file's tail, as after
    a kill, the file is cut there, else the kept lines are copied to a new file that replaces it.
    """
    if not path.exists():
        return
    unreadable: list[int] = []
    cut_at: int | None = None  # where the dropped tail starts, while every drop is in it
    interleaved = False  # a kept line after a dropped one: the file must be rewritten
    offset = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            logged = _raw_step(raw)
            if logged is None:
                unreadable.append(number)
            if logged is None or logged > step:
                cut_at = start if cut_at is None else cut_at
            elif cut_at is not None:
                interleaved = True
    if cut_at is not None and not interleaved:
        os.truncate(path, cut_at)
    elif interleaved:
        fresh = path.with_name(path.name + ".tmp")
        with path.open("rb") as source, fresh.open("wb") as target:
            for raw in source:
                logged = _raw_step(raw) if raw.strip() else None
                if logged is not None and logged <= step:
                    target.write(raw if raw.endswith(b"\n") else raw + b"\n")
        os.replace(fresh, path)
    elif offset and _last_byte(path) != b"\n":  # a whole record cut just before its newline
        with path.open("ab") as file:
            file.write(b"\n")
    if unreadable:
        lines = ", ".join(map(str, unreadable[:5])) + (" ..." if len(unreadable) > 5 else "")
        note = f"{path}: dropped {len(unreadable)} unreadable line(s): {lines}"
        console.print(note, style="yellow", markup=False)


# How the loggers here begin a line; one that ends its record with a newline and holds no
# other record's start (a record never holds the key "step" below its top level) needs no parse.
_STEP_PREFIX = re.compile(rb'\{"step": (-?\d+)[,}]')


def _raw_step(raw: bytes) -> int | None:
    """:func:`_logged_step` of a line as bytes, read from its prefix when it is one whole record
    as the loggers here write it (a rollout log's lines hold megabytes)."""
    match = _STEP_PREFIX.match(raw)
    if match and raw.endswith(b"}\n") and raw.count(b'{"step": ') == 1:
        return int(match[1])
    return _logged_step(raw.decode("utf-8", errors="replace"))


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _logged_step(line: str) -> int | None:
    """The step of a metrics line, or None when the line is not a step's JSON record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _short(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
