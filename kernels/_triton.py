"""Whether Triton kernels can run here, and the settings that differ under its interpreter.

Triton is an optional dependency (the ``gpu`` and ``dev`` extras). Kernels run on CUDA tensors,
or on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is imported (CI does this at
tiny shapes). Kernel modules import Triton at their top, so import them only after
:func:`require` passed.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str | None = None) -> bool:
    """Can Triton kernels run on tensors of ``device`` (default: CUDA if present, else CPU)?"""
    if not installed():
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreting())


def require(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless Triton can run on these tensors."""
    if not installed():
        raise RuntimeError("the triton backend needs triton (pip install -e '.[gpu]')")
    for tensor in tensors:
        if not available(tensor.device):
            raise RuntimeError(
                f"the triton backend runs on CUDA tensors (or CPU tensors with "
                f"TRITON_INTERPRET=1), got a tensor on {tensor.device}"
            )


def upcast_dots() -> bool:
    """Upcast tiles to float32 before ``tl.dot``: the interpreter gets bf16/fp16 dots wrong
    (triton 3.9), and float32 products of low-precision values equal what tensor cores
    accumulate."""
    return interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs multiply in full precision (TF32 would break the fp32 tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"
