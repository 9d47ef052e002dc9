"""Lark grammars of the reasoning formats, loaded once and cached.

``npr.lark`` is the strict NPR format, ``multiverse.lark`` the nestable Multiverse format. Each
file's terminals double as the tag lexer of the lenient (cold-start) parser, so both parsers
agree on what a tag is.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from lark import Lark

GRAMMAR_DIR = Path(__file__).resolve().parent
GRAMMARS = ("npr", "multiverse")


def path(name: str) -> Path:
    """The ``.lark`` file of grammar ``name``."""
    if name not in GRAMMARS:
        raise ValueError(f"unknown grammar {name!r}; choose one of {', '.join(GRAMMARS)}")
    return GRAMMAR_DIR / f"{name}.lark"


@cache
def load(name: str) -> Lark:
    """The LALR parser of grammar ``name`` (built once per process)."""
    return Lark(path(name).read_text(), parser="lalr", lexer="contextual", maybe_placeholders=False)


@cache
def lexer(name: str) -> Lark:
    """A tag lexer over the same terminals: ``lexer(name).lex(text)`` yields tag and TEXT tokens."""
    return Lark(path(name).read_text(), parser="lalr", lexer="basic", maybe_placeholders=False)
