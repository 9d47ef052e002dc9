"""A learnable demo: a tiny random-init model learns the NPR parallel format by SFT, then PAPO.

Problems are sums of products (``Compute 7*8 + 6*9.``, see ``problems.py``), one branch per
product. A 4-layer Llama (265k parameters) over the embedded SmolLM2 tokenizer (restricted to the
demo's texts, the NPR tags added as special tokens) starts from random weights and learns the
format and the arithmetic by parallel SFT on generated traces, written by a sloppy teacher whose
plans repeat the first product instead of covering the second in 60% of them (two branches, one
wasted). PAPO then trains on rollouts of the parallel engine (constrained mode: the engine writes
what the format fixes, the model writes the contents and chooses how many branches to open) with
the accuracy reward, and learns to give each branch its own product. Held-out accuracy is
measured with greedy constrained decoding after SFT and every ``papo_eval_every`` PAPO steps.

    python examples/parallel_arithmetic/run.py --quick    # 20 PAPO steps, 1.5-6 minutes on 1 core
    python examples/parallel_arithmetic/run.py            # 60 PAPO steps: the curve

Progress goes to stderr; stdout gets one JSON line: ``accuracy_sft``, ``accuracy_papo``,
``parallel_rate``, ``valid_rate`` (after PAPO), ``problems`` (held-out size), the curve, timings
and the settings. ``--set key=value`` overrides a setting (``--set teacher_flaw=null`` trains on
correct traces only).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

# Run as a script or imported by the tests: the sibling module and the repository root must be
# importable either way.
HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from problems import Problem, generate, split, teacher_flaws  # noqa: E402

import npr_graph as ng  # noqa: E402
from npr_graph.engine import Engine, SamplingParams  # noqa: E402
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model  # noqa: E402
from npr_graph.typecheck import type_problems  # noqa: E402
from papo import rewards  # noqa: E402
from papo.config import load_config  # noqa: E402
from papo.trainer import Trainer  # noqa: E402


@dataclass
class Settings:
    """Everything a run depends on. The defaults are the tuned ``--quick`` run."""

    seed: int = 0
    # A few-layer model is dominated by per-op overhead: on 2 shared cores one intra-op thread
    # ran an SFT step 5-10x faster than two (measured), the second thread only adds contention.
    threads: int = 1
    # data (the whole space of two products of factors 4..9 is 1,296 problems)
    train_problems: int = 1000
    test_problems: int = 256
    min_terms: int = 2
    max_terms: int = 2
    min_factor: int = 4
    max_factor: int = 9
    # The SFT teacher's flaw (see problems.FLAWS; None: correct traces) and how often it makes it.
    # A redundant teacher plans the first product twice in 60% of the traces: SFT imitates it,
    # so the parallel structure is right but one branch is wasted, a systematic weakness for the
    # accuracy reward to fix (docs/BENCHMARKS.md also has "lazy", one plan, and "carry").
    teacher_flaw: str | None = "redundant"
    flaw_rate: float = 0.6
    # "demo": SmolLM2's BPE restricted to the demo's texts (~300 ids, same tokenization);
    # "full": all 49,152 ids, whose softmax dominates a few-layer model on CPU
    vocabulary: str = "demo"
    model: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    )
    row_tokens: int = 1024  # packed training rows; short rows keep per-branch attention cheap
    # SFT
    sft_steps: int = 700
    sft_batch: int = 16
    sft_lr: float = 3e-3
    # PAPO
    papo_steps: int = 20
    papo_eval_every: int = 5
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    papo_lr: float = 1e-4
    advantage: str = "papo"
    temperature: float = 1.0
    # decoding, rollouts and evaluation alike: the model chooses 1-4 plans, in one block
    min_branches: int = 1
    max_branches: int = 4
    max_new_tokens: int = 96
    max_plan_tokens: int = 12
    max_step_tokens: int = 16
    max_takeaway_tokens: int = 24

    def sampling(self) -> dict[str, Any]:
        """The engine limits shared by rollouts and evaluation."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            min_branches=self.min_branches,
            max_branches=self.max_branches,
            max_blocks=1,  # a second block would be stray structure after the answer
            max_plan_tokens=self.max_plan_tokens,
            max_step_tokens=self.max_step_tokens,
            max_takeaway_tokens=self.max_takeaway_tokens,
        )


QUICK = Settings()
# The same SFT, then a longer PAPO: the quick run's curve is a prefix of this one.
FULL = replace(QUICK, papo_steps=60)
# The smallest run through every stage (tests).
SMOKE = replace(
    QUICK,
    train_problems=16,
    test_problems=4,
    model=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ),
    sft_steps=2,
    sft_batch=4,
    papo_steps=2,
    papo_eval_every=1,
    prompts_per_step=2,
    samples_per_prompt=2,
    max_new_tokens=32,
)


# -- tokenizer and model -------------------------------------------------------------------------
TAG_TEXT = re.compile(r"</?(?:guideline|plan|step|takeaway)>")


def restricted_tokenizer(base: Any, texts: Iterable[str]) -> Any:
    """``base`` (a byte-level BPE tokenizer) restricted to what ``texts`` need: every byte token,
    the merges that build a substring of a word of ``texts``, and the special tokens.

    Keeping exactly those merges, in their order, tokenizes every word of ``texts`` as ``base``
    does (each merge BPE applies to such a word builds one of its substrings, and the lowest-ranked
    applicable merge is still the lowest among a subset), while any other text still encodes, in
    shorter pieces."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError("restricted_tokenizer needs a byte-level BPE tokenizer")
    pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    words = {
        word
        for text in texts
        for part in TAG_TEXT.split(text)  # the tags will be special tokens: they split words
        for word, _ in pre_tokenizer.pre_tokenize_str(part)
    }
    substrings = {w[i:j] for w in words for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
    vocab: dict[str, int] = model["vocab"]
    kept = set(pre_tokenizers.ByteLevel.alphabet()) & set(vocab)
    merges = []
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if left in kept and right in kept and left + right in substrings:
            merges.append([left, right])
            kept.add(left + right)
    by_id = {index: token for token, index in vocab.items()}
    old_ids = sorted({vocab[token] for token in kept} | {t["id"] for t in spec["added_tokens"]})
    model["vocab"] = {by_id[old]: new for new, old in enumerate(old_ids)}
    model["merges"] = merges
    for token in spec["added_tokens"]:
        token["id"] = model["vocab"][token["content"]]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **base.special_tokens_map
    )


def build_tokenizer(vocabulary: str = "demo") -> Any:
    """The embedded SmolLM2 tokenizer (``full``), or the same BPE restricted to the demo's texts
    (``demo``: 49,152 ids become ~300, which makes SFT ~Nx faster on CPU; see BENCHMARKS.md)."""
    base = copy.deepcopy(default_tokenizer())
    if vocabulary == "full":
        return base
    if vocabulary != "demo":
        raise ValueError(f"vocabulary must be 'demo' or 'full', not {vocabulary!r}")
    # Every word a demo text can hold occurs in these (SmolLM2 has no multi-digit tokens).
    samples = generate(500, 12345, min_terms=1, max_terms=4, min_factor=0, max_factor=9)
    texts = [text for p in samples for flaw in (None, "lazy") for text in (p.text, p.trace(flaw))]
    return restricted_tokenizer(base, texts)


def build_model(settings: Settings) -> tuple[torch.nn.Module, Any]:
    """The tokenizer with the NPR tags as special tokens, and a random-init few-layer Llama over
    its vocabulary."""
    tokenizer = build_tokenizer(settings.vocabulary)
    model = tiny_model("llama", tokenizer=tokenizer, seed=settings.seed, **settings.model)
    add_tag_tokens(model, tokenizer, "npr")
    return model, tokenizer


# -- data ----------------------------------------------------------------------------------------
def problem_sets(settings: Settings) -> tuple[list[Problem], list[Problem]]:
    """The training problems and the disjoint held-out problems."""
    return split(
        settings.train_problems,
        settings.test_problems,
        settings.seed,
        min_terms=settings.min_terms,
        max_terms=settings.max_terms,
        min_factor=settings.min_factor,
        max_factor=settings.max_factor,
    )


def write_jsonl(problems: Sequence[Problem], path: Path, flaws: Sequence[str | None] = ()) -> Path:
    """One record per problem (``problem``, true ``answer``, SFT ``response``); ``flaws[i]`` is the
    teacher's flaw in trace ``i`` (None: a correct trace)."""
    flaws = list(flaws) or [None] * len(problems)
    path.write_text(
        "".join(json.dumps(p.record(f)) + "\n" for p, f in zip(problems, flaws, strict=True))
    )
    return path


# -- stages --------------------------------------------------------------------------------------
def _common(settings: Settings, out: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        seed=settings.seed,
        chat=False,  # the bare problem is the prompt: no chat template to learn
        tensorboard=False,
        row_tokens=settings.row_tokens,
        page_size=16,
        kv_pages=4096,
    )


def sft(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Path,
    settings: Settings,
    out: Path,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Parallel SFT (``Trainer`` stage ``sft``) on the traces of ``data``; per-step metrics."""
    config = load_config(
        None,
        "sft",
        dict(
            data=str(data),
            steps=settings.sft_steps,
            batch_size=settings.sft_batch,
            lr=settings.sft_lr,
            warmup_ratio=0.05,
            weight_decay=0.0,
            log_every=50,
            **_common(settings, out),
        ),
    )
    return Trainer(config, model=model, tokenizer=tokenizer, console=console).train()


def evaluate(engine: Engine, problems: Sequence[Problem], settings: Settings) -> dict[str, Any]:
    """Greedy constrained decoding of every problem: accuracy (``papo.rewards`` ``accuracy``),
    parallel rate (a block of >= 2 branches), valid rate (no ``strict`` violation), mean width."""
    params = SamplingParams(temperature=0.0, **settings.sampling())
    start = time.perf_counter()
    graphs = engine.generate([p.text for p in problems], params, mode="constrained", chat=False)
    accuracy = rewards.get("accuracy")
    correct = parallel = valid = width = redundant = 0
    violations: Counter[str] = Counter()
    for problem, graph in zip(problems, graphs, strict=True):
        correct += accuracy(graph.response_text, str(problem.answer)).correct
        shape = ng.metrics(graph)
        parallel += bool(shape["is_parallel"])
        width += max(shape["widths"], default=0)
        plans = [n.content.split(":", 1)[-1].strip() for n in graph.nodes_of("plan")]
        redundant += len(set(plans)) < len(plans)
        found = ng.validate(graph, "strict")
        valid += not found
        violations.update({v.code for v in found})
    count = len(problems)
    return {
        "accuracy": correct / count,
        "parallel_rate": parallel / count,
        "valid_rate": valid / count,
        "mean_width": width / count,
        "redundant_rate": redundant / count,  # two plans with the same content
        "violations": dict(violations),  # graphs with each strict rule broken
        "problems": count,
        "eval_s": round(time.perf_counter() - start, 1),
    }


def papo(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Path,
    settings: Settings,
    out: Path,
    on_interval: Callable[[int, Engine], None] | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """PAPO (``Trainer`` stage ``papo``) on constrained rollouts; ``on_interval(step, engine)``
    runs before the first step and every ``papo_eval_every`` steps. Per-step metrics."""
    config = load_config(
        None,
        "papo",
        dict(
            data=str(data),
            steps=settings.papo_steps,
            prompts_per_step=settings.prompts_per_step,
            samples_per_prompt=settings.samples_per_prompt,
            lr=settings.papo_lr,
            advantage=settings.advantage,
            mode="constrained",
            temperature=settings.temperature,
            **settings.sampling(),
            **_common(settings, out),
        ),
    )
    trainer = Trainer(config, model=model, tokenizer=tokenizer, console=console)
    history: list[dict[str, Any]] = []
    if on_interval is not None:
        on_interval(0, trainer.engine)
    while trainer.step < trainer.total_steps:
        history += trainer.train(stop_after=trainer.step + settings.papo_eval_every)
        if on_interval is not None:
            on_interval(trainer.step, trainer.engine)
    return history


# -- the whole run -------------------------------------------------------------------------------
def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None


def run(settings: Settings, out: Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Data, model, SFT, PAPO with held-out evaluations; returns the result line as a dict."""
    console = Console(stderr=True, quiet=log is None)  # the trainers' step lines
    log = log or (lambda message: None)
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    train, test = problem_sets(settings)
    out.mkdir(parents=True, exist_ok=True)
    flaws = teacher_flaws(train, settings.teacher_flaw, settings.flaw_rate, settings.seed)
    data = write_jsonl(train, out / "train.jsonl", flaws)
    model, tokenizer = build_model(settings)
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"{len(train)} training problems ({sum(f is not None for f in flaws)} flawed traces), "
        f"{len(test)} held out; model {parameters:,} parameters, vocabulary {len(tokenizer)}"
    )

    clock = time.perf_counter()
    sft_history = sft(model, tokenizer, data, settings, out / "sft", console)
    sft_s = time.perf_counter() - clock
    log(f"SFT: {len(sft_history)} steps in {sft_s:.0f} s, last loss {sft_history[-1]['loss']:.3f}")

    curve: list[dict[str, Any]] = []

    def on_interval(step: int, engine: Engine) -> None:
        result = evaluate(engine, test, settings)
        curve.append({"papo_step": step, **result})
        log(f"held-out after {'SFT' if step == 0 else f'PAPO step {step}'}: {result}")

    clock = time.perf_counter()
    history = papo(model, tokenizer, data, settings, out / "papo", on_interval, console)
    papo_s = time.perf_counter() - clock
    eval_s = sum(point["eval_s"] for point in curve)
    first, last = curve[0], curve[-1]
    every = settings.papo_eval_every
    return {
        "accuracy_sft": first["accuracy"],
        "accuracy_papo": last["accuracy"],
        "parallel_rate": last["parallel_rate"],
        "valid_rate": last["valid_rate"],
        "problems": len(test),
        "parallel_rate_sft": first["parallel_rate"],
        "valid_rate_sft": first["valid_rate"],
        "curve": [
            {k: point[k] for k in ("papo_step", "accuracy", "parallel_rate", "valid_rate")}
            | {"mean_width": round(point["mean_width"], 3), "violations": point["violations"]}
            | {"redundant_rate": point["redundant_rate"]}
            for point in curve
        ],
        # rollout (temperature 1) accuracy and branch width, averaged per evaluation interval
        "rollout_accuracy": [
            _mean(h.get("accuracy") for h in history[i : i + every])
            for i in range(0, len(history), every)
        ],
        "rollout_width": [
            _mean(h.get("mean_width") for h in history[i : i + every])
            for i in range(0, len(history), every)
        ],
        "skipped_papo_steps": sum(1 for h in history if h.get("skipped")),
        "sft_loss": round(sft_history[-1]["loss"], 4),
        "sft_s": round(sft_s, 1),
        "papo_s": round(papo_s - eval_s, 1),
        "eval_s": round(eval_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "parameters": parameters,
        "vocabulary": len(tokenizer),
        "torch": torch.__version__,
        "settings": asdict(settings),
    }


def parse_settings(base: Settings, items: Sequence[str]) -> Settings:
    """``base`` with ``key=value`` overrides (values are JSON when they parse as JSON), each
    of its setting's type (checked here, not minutes later where it is used)."""
    known = {f.name for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    settings = replace(base, **changes)
    problems = type_problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute run")
    parser.add_argument("--seed", type=int, default=None, help="overrides the setting")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default: a temp dir)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set papo_lr=5e-5 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(QUICK if args.quick else FULL, args.set)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="parallel_arithmetic_") as tmp:
            result = run(settings, Path(tmp), log)
    else:
        result = run(settings, args.out, log)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
