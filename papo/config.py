"""Training configuration: one dataclass per run, read from a TOML or JSON file.

Defaults follow the NPR reference per stage (see :data:`STAGE_DEFAULTS`); anything in the file
or in ``--set key=value`` overrides them. Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from npr_graph.engine.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE
from npr_graph.prompts import BUILTIN
from npr_graph.typecheck import type_problems

STAGES = ("zero", "sft", "papo")
SHARDING = ("none", "fsdp2")
# settings that take one of a few names
CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "tags": ("special", "text"),
    "grammar": ("npr", "multiverse"),
    "dtype": ("float32", "bfloat16"),
    "mode": ("free", "constrained", "sequential"),
    "lr_schedule": ("constant", "cosine"),
    "sharding": SHARDING,
}
# the smallest value each numeric setting may take (None, where a setting allows it, is fine)
AT_LEAST: dict[str, int] = {
    "steps": 1, "epochs": 1, "prompts_per_step": 1, "samples_per_prompt": 1, "batch_size": 1,
    "lr": 0, "weight_decay": 0, "row_tokens": 16, "temperature": 0, "top_k": 0,
    "max_new_tokens": 1, "min_branches": 1, "max_blocks": 1, "max_depth": 1,
    "max_plan_tokens": 1, "max_step_tokens": 1, "max_takeaway_tokens": 1,
    "kv_pages": 2, "page_size": 1, "overlong_buffer": 0, "overlong_factor": 0,
    "kl_coef": 0, "mini_batches": 1, "save_every": 0, "log_every": 1, "rollouts_every": 0,
    "eval_every": 0, "eval_samples": 1, "eval_temperature": 0,
}  # fmt: skip


@dataclass
class TrainConfig:
    stage: str = "papo"
    # model and data
    model: str | None = None  # a local model directory; None = the embedded SmolLM2
    tags: str = "special"  # "special" | "text"
    grammar: str = "npr"  # "npr" | "multiverse": the format traces are read in and rollouts decode
    dtype: str = "float32"
    data: str = ""
    prompt_field: str | None = None  # default: problem / question / prompt
    answer_field: str | None = None  # default: answer / final_answer / solution
    response_field: str = "response"  # SFT traces
    prompt_template: str = (
        "{problem}"  # text with {problem}, a built-in (npr, multiverse, cot) or a file
    )
    chat: bool | None = None  # apply the tokenizer's chat template (None: when it has one)
    output_dir: str = "runs/train"
    seed: int = 0
    # schedule
    steps: int | None = None  # RL: required; SFT: default traces x epochs / batch_size, rounded up
    epochs: int = 1
    prompts_per_step: int = 16
    samples_per_prompt: int = 16
    batch_size: int = 16  # SFT traces per step
    lr: float = 1e-7
    lr_schedule: str = "constant"  # "constant" | "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    row_tokens: int = 8192  # packed row length
    # rollouts
    mode: str = "free"  # engine mode: free | constrained | sequential
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    min_branches: int = 2
    max_branches: int = 5
    max_blocks: int = 4
    max_depth: int = 2  # how deep Multiverse blocks nest (1 = flat)
    max_plan_tokens: int = 48
    max_step_tokens: int = 160
    max_takeaway_tokens: int = 96
    kv_pages: int = 4096
    page_size: int = 16
    cuda_graphs: bool = False  # decode steps replayed as CUDA graphs (GPU only)
    overlap: bool = False  # each decode step launched before the last step's tokens are read
    # objective
    reward: str = "accuracy"
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens (0 = off)
    overlong_factor: float = 1.0
    advantage: str = "papo"
    branch_lambda: float = 0.5
    loss: str = "papo"
    clip: tuple[float, float] | None = None
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    mini_batches: int = 1  # optimizer updates per step; all but the first are off-policy
    drop_invalid: bool = True  # drop structurally invalid rollouts (counted, not penalized)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    # parallelism: "none" = every rank holds the whole model; "fsdp2" = the training copy is
    # sharded over the ranks and a full replica per rank serves rollouts (see papo.distributed)
    sharding: str = "none"
    # None: cuda:LOCAL_RANK when CUDA is present, else cpu (model, engine and training forward)
    device: str | None = None
    # held-out evaluation (any stage): eval_data's problems before the first step, every
    # eval_every steps (0: no others) and after the last, decoded as rollouts are
    eval_data: str | None = None
    eval_prompt_field: str | None = None  # default: prompt_field
    eval_answer_field: str | None = None  # default: answer_field
    eval_every: int = 0
    eval_samples: int = 1  # per problem
    eval_temperature: float = 0.0  # 0: greedy
    # bookkeeping
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 1
    rollouts_every: int = 0  # RL: every N-th step's rollouts to rollouts.jsonl (0: none)
    tensorboard: bool = True

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if problems:
            raise ValueError(f"invalid training config: {'; '.join(problems)}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.clip is not None:
            self.clip = tuple(float(c) for c in self.clip)  # type: ignore[assignment]
        low, high = self.clip or (0.0, 0.0)
        checks = [
            (value is None or value >= least, f"{key} must be >= {least}, got {value}")
            for key, least in AT_LEAST.items()
            for value in [getattr(self, key)]
        ]
        checks += [
            (self.grammar == "npr" or self.reward not in ("npr_zero", "format"),
             f"reward {self.reward!r} scores the NPR format; use another with grammar 'multiverse'"),
            (self.stage == "sft" or self.mode != "constrained" or self.tags == "special",
             "mode 'constrained' needs the tags as special tokens (tags = 'special')"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2^32), got {self.seed}"),
            (self.model is None or self.model.strip() != "",
             "model is a model directory; leave it out for the embedded SmolLM2 (\"\" named "
             "the working directory)"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {list(self.betas)}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.stage != "sft" or not self.rollouts_every,
             "rollouts_every logs RL rollouts; stage 'sft' trains on traces"),
            (self.eval_samples == 1 or self.eval_temperature > 0,
             f"eval_samples = {self.eval_samples} needs eval_temperature > 0 (greedy samples "
             "are all the same)"),
            (self.eval_data is not None or not self.eval_every,
             "eval_every needs eval_data (the held-out problems)"),
            (self.eval_data is not None
             or (self.eval_prompt_field is None and self.eval_answer_field is None),
             "eval_prompt_field and eval_answer_field name fields of eval_data"),
            (self.min_branches <= self.max_branches,
             f"min_branches ({self.min_branches}) must be <= max_branches ({self.max_branches})"),
            (self.overlong_buffer <= self.max_new_tokens,
             f"overlong_buffer ({self.overlong_buffer}) must be <= max_new_tokens ({self.max_new_tokens})"),
            (low >= 0 and high >= 0, f"clip is [low, high] with both >= 0, got {self.clip}"),
            (self.device is None or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be cpu, cuda or cuda:N, got {self.device!r}"),
            ("{problem}" in self.prompt_template or self.prompt_template in BUILTIN
             or Path(self.prompt_template).is_file(),
             "prompt_template is text with {problem}, a built-in template name or a file"),
        ]  # fmt: skip
        for key in ("temperature", "eval_temperature"):
            value = getattr(self, key)
            checks.append(
                (value <= 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE,
                 f"{key} must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:.3g}], "
                 f"got {value}")
            )  # fmt: skip
        checks += [(False, message) for message in _unknown_names(self)]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid training config: {message}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What the NPR reference uses per stage; a config file overrides any of them.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "zero": dict(
        tags="text",
        mode="sequential",
        reward="npr_zero",
        advantage="grpo",
        loss="ppo_clip",
        clip=(0.2, 0.28),
        dynamic_sampling=True,
        drop_invalid=False,
        lr=1e-6,
    ),
    "sft": dict(
        tags="special",
        loss="sft",
        lr=1e-6,
        lr_schedule="cosine",
        warmup_ratio=0.05,
        weight_decay=0.1,
        betas=(0.9, 0.95),
    ),
    "papo": dict(
        tags="special",
        mode="free",
        reward="accuracy",
        advantage="papo",
        loss="papo",
        lr=1e-7,
        lr_schedule="constant",
        drop_invalid=True,
    ),
}


def _type_problems(config: TrainConfig) -> list[str]:
    """One line per setting whose value is not of its field's annotated type (for a setting of
    :data:`CHOICES`: not one of its names)."""
    problems = type_problems(config, skip=CHOICES)
    for key, names in CHOICES.items():
        value = getattr(config, key)
        if value not in names:
            problems.append(f"{key} must be one of {', '.join(names)}, got {value!r}")
    return problems


def _unknown_names(config: TrainConfig) -> list[str]:
    """Settings that name a registered function (a reward, an estimator, a loss, an aggregation)
    must name a known one; checked at load time, after user code may have registered its own."""
    from . import advantages, loss, rewards

    registries = {
        "reward": rewards.get,
        "advantage": advantages.get,
        "loss": loss.get,
        "aggregation": loss.aggregation,
    }
    problems = []
    for key, get in registries.items():
        try:
            get(getattr(config, key))
        except KeyError as error:
            problems.append(f"{key}: {error.args[0]}")
    return problems


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when they parse as JSON (numbers, booleans, lists, null), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(
    path: str | Path | None, stage: str, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Stage defaults, then the file (``.toml`` or ``.json``), then ``overrides``."""
    values: dict[str, Any] = dict(STAGE_DEFAULTS.get(stage, {}))
    if path is not None:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read config {path}: {error.strerror or error}") from error
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise ValueError(f"config {path}: a .toml or .json file, not {path.suffix or 'none'}")
        try:
            loaded = tomllib.loads(raw.decode()) if suffix == ".toml" else json.loads(raw)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"config {path} does not parse: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must hold a table of settings")
        if loaded.get("stage", stage) != stage:
            raise ValueError(f"config {path} is for stage {loaded['stage']!r}, not {stage!r}")
        values.update(loaded)
    overrides = overrides or {}
    if overrides.get("stage", stage) != stage:
        raise ValueError(f"--set stage={overrides['stage']} in a run of stage {stage!r}")
    values.update(overrides)
    values["stage"] = stage
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            named.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ValueError(f"unknown config keys: {', '.join(named)}")
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise ValueError(f"invalid training config: {error}") from error
