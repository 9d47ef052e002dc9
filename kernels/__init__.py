"""Triton kernels beside plain torch references.

* :func:`token_logprobs`: chunked per-token log-probs and entropy from hidden states and the
  lm_head, never materializing ``[tokens, vocab]`` logits (training; any device via ``torch``).
* :func:`merge_states`: merge partial attention states (output, log-sum-exp) of KV segments.
* :func:`paged_decode_attention`: decode attention of query groups over paged KV lists, GQA.
* :func:`cascade_decode_attention`: several levels of those (shared prefixes read once), merged.

Triton is optional: every kernel has a torch reference that runs anywhere (``backend="torch"``),
and the Triton version runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (CI).
``backend="auto"`` takes Triton for CUDA tensors when it is installed.
"""

from ._triton import available as triton_available
from .attention import (
    DecodeLevel,
    cascade_decode_attention,
    merge_states,
    paged_decode_attention,
)
from .logprobs import reference_logprobs, token_logprobs

__all__ = [
    "DecodeLevel",
    "cascade_decode_attention",
    "merge_states",
    "paged_decode_attention",
    "reference_logprobs",
    "token_logprobs",
    "triton_available",
]
