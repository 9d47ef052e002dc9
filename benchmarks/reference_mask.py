"""A plain re-implementation of the NPR reference SFT code's mask and position loops.

This is the baseline the foundation benchmark compares :mod:`npr_graph.layout` against. It is
written the way research training code usually is: walk the token ids one at a time in Python,
track the current block and step by their tag tokens, and write the result with torch tensor
indexing. It is deliberately not optimized, and it needs every format tag to be a single token
(e.g. :class:`npr_graph.tokenizers.CharTokenizer` with ``special_tags=True``, or a Hugging Face
tokenizer after ``add_special_tokens({"additional_special_tokens": [...]})``).

The rules it implements (the ``official`` layout mode of :mod:`npr_graph.layout`):

* mask: causal ``[L, L]``; within each block (closed by ``<takeaway>``), every pair of step spans
  ``<step>`` .. ``</step>`` (tags included) is masked both ways; the prompt and text between
  steps stay causal.
* positions: sequential; each ``<step>`` restarts at ``pos(</guideline>) + 1`` and each
  ``<takeaway>`` at ``max(pos(</step>)) + 1`` over the steps of its block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from npr_graph.parse import DIALECTS

NPR_TAG_TEXTS = DIALECTS["npr"].tag_texts


def tag_token_ids(tokenizer: Any) -> dict[str, int]:
    """The single token id of every NPR tag; raises if a tag is split into several tokens."""
    out = {}
    for tag in NPR_TAG_TEXTS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{tag} is {len(ids)} tokens; the reference loop needs single tokens")
        out[tag] = int(ids[0])
    return out


def reference_attention_mask(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: dict[str, int], start: int = 0
) -> torch.Tensor:
    """``BoolTensor[L, L]`` (True = may attend). ``start`` is where the response begins (the
    reference code starts after the prompt's first ``<|im_end|>``)."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist()
    seq_len = len(input_ids)
    mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))

    step_open = tag_ids["<step>"]
    step_close = tag_ids["</step>"]
    takeaway_open = tag_ids["<takeaway>"]

    in_step = False
    step_start = -1
    steps = []  # (first token, one past last token) of each step of the current block
    i = start
    while i < seq_len:
        token = input_ids[i]
        if token == step_open:
            if in_step:
                raise ValueError(f"<step> inside a step at token {i}")
            in_step = True
            step_start = i
        elif token == step_close:
            if not in_step:
                raise ValueError(f"</step> outside a step at token {i}")
            in_step = False
            steps.append((step_start, i + 1))
        elif token == takeaway_open:
            if in_step:
                raise ValueError(f"<takeaway> inside a step at token {i}")
            # every pair of steps of this block: mask both directions
            rows = []
            cols = []
            for a in range(len(steps)):
                idx_a = torch.arange(steps[a][0], steps[a][1])
                for b in range(a + 1, len(steps)):
                    idx_b = torch.arange(steps[b][0], steps[b][1])
                    grid_a, grid_b = torch.meshgrid(idx_a, idx_b, indexing="ij")
                    rows.append(grid_a.flatten())
                    cols.append(grid_b.flatten())
            if rows:
                all_rows = torch.cat(rows)
                all_cols = torch.cat(cols)
                mask[all_rows, all_cols] = False
                mask[all_cols, all_rows] = False
            steps = []
        i += 1
    if in_step:
        raise ValueError("unclosed <step>")
    return mask


def reference_position_ids(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: dict[str, int], start: int = 0
) -> torch.Tensor:
    """``LongTensor[L]``: sequential positions with the step and takeaway restarts."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist()
    seq_len = len(input_ids)
    positions = torch.arange(seq_len, dtype=torch.long)

    guideline_open = tag_ids["<guideline>"]
    guideline_close = tag_ids["</guideline>"]
    step_open = tag_ids["<step>"]
    step_close = tag_ids["</step>"]
    takeaway_open = tag_ids["<takeaway>"]

    block = None  # state of the block being read
    i = start
    while i < seq_len:
        token = input_ids[i]
        if token == guideline_open:
            block = {"guideline_end": -1, "max_step_end": -1, "in_guideline": True}
        elif token == guideline_close and block is not None and block["in_guideline"]:
            block["guideline_end"] = int(positions[i])
            block["in_guideline"] = False
        elif token == step_open and block is not None and block["guideline_end"] != -1:
            # shift everything from here on so that this step starts right after </guideline>
            positions[i:] -= positions[i] - (block["guideline_end"] + 1)
        elif token == step_close and block is not None and block["guideline_end"] != -1:
            block["max_step_end"] = max(block["max_step_end"], int(positions[i]))
        elif token == takeaway_open and block is not None and block["guideline_end"] != -1:
            # the takeaway continues after the longest step
            positions[i:] -= positions[i] - (block["max_step_end"] + 1)
            block = None
        i += 1
    return positions
