"""Compile every Triton kernel for a CUDA architecture, on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, what CI runs) accepts code that the compiler
rejects, such as a plain Python global read inside a kernel. Compiling to a cubin needs no GPU,
only Triton's bundled LLVM and ptxas, so CI can catch those errors too::

    python -m kernels.compile_check [--arch 90]

Run it without ``TRITON_INTERPRET`` set: under the interpreter ``triton.jit`` returns functions
that cannot be compiled.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

DTYPES = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}


Case = tuple[str, object, dict[str, str], dict[str, object]]


def _case(label: str, kernel, types: dict[str, str], constexprs: dict[str, object]) -> Case:
    """(label, kernel, signature, constexprs); arguments not in ``types`` are int32 scalars."""
    signature = {name: types.get(name, "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    return label, kernel, signature, constexprs


def _cases(dtypes: Sequence[str] = tuple(DTYPES)) -> Iterator[Case]:
    """Every kernel at the launch settings used on a GPU."""
    from . import attention_triton, logprobs_triton

    for dtype in dtypes:
        precision = DTYPES[dtype]
        decode_types = dict(
            query=f"*{dtype}", k_cache=f"*{dtype}", v_cache=f"*{dtype}", out_values="*fp32",
            out_lse="*fp32", qo_indptr="*i32", kv_indptr="*i32", kv_indices="*i32",
            kv_last_page_len="*i32", scale="fp32",
        )  # fmt: skip
        for block_q in (16, 64):
            constexprs = dict(
                HEAD_DIM=128, GQ=4, PAGE=16, BLOCK_Q=block_q, BLOCK_T=64, BLOCK_D=128,
                UPCAST=False, PRECISION=precision,
            )  # fmt: skip
            yield _case(f"decode {dtype} BLOCK_Q={block_q}", attention_triton._decode_kernel,
                        decode_types, constexprs)  # fmt: skip
        yield _case(
            f"merge {dtype}",
            attention_triton._merge_kernel,
            dict(values="*fp32", lse="*fp32", out_values=f"*{dtype}", out_lse="*fp32"),
            dict(HEAD_DIM=128, BLOCK_S=8, BLOCK_D=128),
        )
        logprob_types = dict(
            hidden=f"*{dtype}", weight=f"*{dtype}", targets="*i64", max_out="*fp32",
            sum_out="*fp32", target_out="*fp32", entropy_out="*fp32", inv_temperature="fp32",
        )  # fmt: skip
        for with_entropy in (False, True):
            constexprs = dict(
                BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, WITH_ENTROPY=with_entropy, UPCAST=False,
                PRECISION=precision,
            )  # fmt: skip
            yield _case(f"logprobs {dtype} entropy={with_entropy}",
                        logprobs_triton._forward_kernel, logprob_types, constexprs)  # fmt: skip

    grad_types = dict(
        logits="*fp32", targets="*i64", lse="*fp32", entropy="*fp32", grad_logprobs="*fp32",
        grad_entropy="*fp32", inv_temperature="fp32",
    )  # fmt: skip
    for with_entropy in (False, True):
        yield _case(f"logit_grad entropy={with_entropy}", logprobs_triton._logit_grad_kernel,
                    grad_types, dict(BLOCK_V=1024, WITH_ENTROPY=with_entropy))  # fmt: skip


def compile_all(
    arch: int = 90, dtypes: Sequence[str] = tuple(DTYPES), warp_size: int = 32
) -> list[str]:
    """Compile each kernel to a cubin for ``sm_<arch>``; returns one error line per failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, warp_size)
    failures = []
    for label, kernel, signature, constexprs in _cases(dtypes):
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target)
            if not compiled.asm.get("cubin"):
                failures.append(f"{label}: no cubin produced")
        except Exception as error:  # noqa: BLE001 - every compiler error is reported, not raised
            failures.append(f"{label}: {type(error).__name__}: {str(error).strip()[:2000]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help=f"any of {', '.join(DTYPES)} (comma-separated)"
    )
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"unknown dtypes {sorted(unknown)}; expected some of {list(DTYPES)}")
    failures = compile_all(args.arch, dtypes)
    for line in failures:
        print(line, file=sys.stderr)
    total = len(list(_cases(dtypes)))
    print(f"{total} kernel variants, {len(failures)} failed (sm_{args.arch})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
