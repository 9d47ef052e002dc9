"""Training data: problems with reference answers (RL) and accepted traces (SFT).

Files are read by :mod:`npr_graph.evaluate`'s readers (``.jsonl``, ``.json``, ``.parquet``; the
usual field names problem / question / prompt and answer / final_answer / solution, or named ones),
so training and evaluation read a dataset the same way. Training is strict where evaluation is
forgiving: a malformed line or a record missing a field stops the run with a message naming the
file and line, rather than training on a silently smaller dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npr_graph.evaluate import (
    PROBLEM_FIELDS,
    EvalError,
    load_problems,
    problem_key,
    read_records,
)
from npr_graph.typecheck import has_shape


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str

    @property
    def key(self) -> str:
        """:func:`npr_graph.evaluate.problem_key` of its prompt and answer."""
        return problem_key(self.prompt, self.answer)


@dataclass(frozen=True)
class Trace:
    id: str
    prompt: str
    response: str
    # the prompt it answered, when npr sample wrote it: (template name, digest of its text, chat)
    sampled_with: tuple[str, str, bool] | None = None


# what npr sample records of the prompt a trace answered
SAMPLED_WITH = {"prompt_template": str, "prompt_digest": str, "chat": bool}


def _fail(errors: list[str]) -> None:
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    raise ValueError("; ".join(errors[:5]) + more)


def read_problems(
    path: str | Path, prompt_field: str | None = None, answer_field: str | None = None
) -> list[Problem]:
    """Problems with their reference answers (a ``solution`` field yields its boxed answer)."""
    fields = {
        key: value for key, value in (("problem", prompt_field), ("answer", answer_field)) if value
    }
    try:
        problems, errors = load_problems(path, fields=fields, rename_duplicates=False)
    except EvalError as error:
        raise ValueError(str(error)) from error
    if errors:
        _fail(errors)
    return [Problem(p.id, p.question, p.reference) for p in problems]


def _text(value: object) -> bool:
    """A non-blank string (a blank prompt is as good as none, as for problems)."""
    return isinstance(value, str) and bool(value.strip())


def read_traces(
    path: str | Path, prompt_field: str | None = None, response_field: str = "response"
) -> list[Trace]:
    """Prompt/response pairs for SFT (what ``npr sample`` writes)."""
    errors: list[str] = []
    traces = []
    prompt_names = (prompt_field,) if prompt_field else PROBLEM_FIELDS
    try:
        for index, (where, record) in enumerate(read_records(Path(path), errors)):
            if not isinstance(record, dict):
                errors.append(f"{where}: not an object")
                continue
            prompt = next(
                (record[n] for n in prompt_names if _text(record.get(n))),
                None,
            )
            response = record.get(response_field)
            if prompt is None or not isinstance(response, str) or not response.strip():
                missing = "/".join(prompt_names) if prompt is None else response_field
                errors.append(f"{where}: no {missing} field")
                continue
            given_id = record.get("id")
            sampled_with = None
            if has_shape(record, SAMPLED_WITH):
                sampled_with = tuple(record[key] for key in SAMPLED_WITH)
            key = str(index if given_id is None else given_id)
            traces.append(Trace(key, prompt, response, sampled_with))
    except EvalError as error:
        raise ValueError(str(error)) from error
    if errors:
        _fail(errors)
    return traces
