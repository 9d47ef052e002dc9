"""A character-level tokenizer with the format tags as single tokens, for tests and examples.

It follows the small part of the Hugging Face tokenizer interface that the parser uses
(``encode``/``decode``), so graphs can be tokenized without downloading a vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .parse import DIALECTS

NPR_TAGS = DIALECTS["npr"].tag_names
MULTIVERSE_TAGS = DIALECTS["multiverse"].tag_names
TAG_BASE = 0x110000  # first id past the Unicode range


class CharTokenizer:
    """One token per character; with ``special_tags`` each format tag is one token instead."""

    def __init__(self, special_tags: bool = True, tags: Sequence[str] = NPR_TAGS + MULTIVERSE_TAGS):
        self.special_tags = special_tags
        self.tag_texts = [f"<{t}>" for t in tags] + [f"</{t}>" for t in tags]
        self.tag_ids = {text: TAG_BASE + i for i, text in enumerate(self.tag_texts)}
        self.pattern = re.compile("|".join(re.escape(t) for t in self.tag_texts))

    def encode(self, text: str, **_: Any) -> list[int]:
        if not self.special_tags:
            return [ord(c) for c in text]
        ids: list[int] = []
        cursor = 0
        for match in self.pattern.finditer(text):
            ids.extend(ord(c) for c in text[cursor : match.start()])
            ids.append(self.tag_ids[match.group()])
            cursor = match.end()
        ids.extend(ord(c) for c in text[cursor:])
        return ids

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(self.tag_texts[i - TAG_BASE] if i >= TAG_BASE else chr(i) for i in ids)

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, **kwargs)}
