"""Prompt templates for evaluation: the NPR format, the Multiverse format, plain chain of thought.

A template is text with a ``{problem}`` placeholder (replaced literally, so the LaTeX braces of
problems and templates need no escaping); a template without the placeholder gets the problem
appended after a blank line. The built-in templates live in ``npr_graph/data/prompt_<name>.txt``;
any other text file is accepted as a template. The tokenizer's chat template, when it has one, is
applied by the engine on top (``Engine.encode_prompt``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

PLACEHOLDER = "{problem}"
#: Built-in template name -> the grammar its output is parsed with (None: no parallel format).
BUILTIN: dict[str, str | None] = {"npr": "npr", "multiverse": "multiverse", "cot": None}


@dataclass(frozen=True)
class PromptTemplate:
    """``name`` (a built-in name or the file path), ``text`` and the ``grammar`` of the format it
    asks for (``"npr"``, ``"multiverse"``, or None for plain reasoning)."""

    name: str
    text: str
    grammar: str | None

    @property
    def digest(self) -> str:
        """A short digest of the text: what tells two templates apart, wherever they are kept."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def render(self, problem: str) -> str:
        text = self.text.strip()
        if PLACEHOLDER in text:
            return text.replace(PLACEHOLDER, problem.strip())
        return f"{text}\n\n{problem.strip()}"


def _guess_grammar(text: str) -> str | None:
    if "<Parallel>" in text or "<Path>" in text:
        return "multiverse"
    if "<guideline>" in text or "<step>" in text:
        return "npr"
    return None


def template_identity(name_or_path: str) -> str:
    """A built-in template's name, or the template file's absolute path: what a resumed run
    compares (a relative path names another file in another working directory)."""
    if name_or_path in BUILTIN:
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template (``npr``, ``multiverse``, ``cot``) or a template file.

    A file's grammar is guessed from the tags it mentions (Multiverse tags, else NPR tags, else
    none). Raises FileNotFoundError for a missing file and ValueError for an empty one.
    """
    if name_or_path in BUILTIN:
        text = files("npr_graph").joinpath(f"data/prompt_{name_or_path}.txt").read_text("utf-8")
        return PromptTemplate(name_or_path, text, BUILTIN[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt {name_or_path!r} is neither a built-in template "
            f"({', '.join(BUILTIN)}) nor a readable file"
        )
    text = path.read_text("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"prompt file {str(path)!r} is empty")
    return PromptTemplate(str(path), text, _guess_grammar(text))
