"""Per-step training metrics: a JSONL file, TensorBoard and a console line."""

from __future__ import annotations

import json
import math
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
        "parallel_rate",
        "mean_width",
        "rollout_tokens_per_s",
        "grad_norm",
        "lr",
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
        """Drop lines of steps after ``step`` (a resumed run redoes them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

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


def _short(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
