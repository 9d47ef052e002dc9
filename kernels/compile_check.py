"""Compile every Triton kernel for a CUDA architecture, on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, what CI runs) accepts code that the compiler
rejects, such as a plain Python global read inside a kernel. Compiling to a cubin needs no GPU,
only Triton's bundled LLVM and ptxas, so CI can catch those errors too. It also prints the
registers each kernel uses at its launch warps and fails when one spills (ptxas' report; a
spill stores and reloads values through local memory inside the kernel's loop)::

    python -m kernels.compile_check [--arch 90] [--allow-spills]

Run it without ``TRITON_INTERPRET`` set: under the interpreter ``triton.jit`` returns functions
that cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

DTYPES = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}  # name -> dot precision


Case = tuple[str, object, dict[str, str], dict[str, object], int]


def _case(
    label: str, kernel, types: dict[str, str], constexprs: dict[str, object], warps: int
) -> Case:
    """(label, kernel, signature, constexprs, warps); arguments not in ``types`` are int32."""
    signature = {name: types.get(name, "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    return label, kernel, signature, constexprs, warps


def _cases(dtypes: Sequence[str] = tuple(DTYPES)) -> Iterator[Case]:
    """Every kernel at the launch settings used on a GPU (tiles and warps)."""
    import torch

    from . import attention_triton as at
    from . import logprobs_triton as lt

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for dtype in dtypes:
        precision = DTYPES[dtype]
        wide_q, block_t, decode_warps = at.DECODE_TILES[torch_dtypes[dtype]]
        block_n, block_v, block_h, logprob_warps = lt._blocks(torch_dtypes[dtype])
        decode_types = dict(
            query=f"*{dtype}", k_cache=f"*{dtype}", v_cache=f"*{dtype}", out_values="*fp32",
            out_lse="*fp32", qo_indptr="*i32", kv_indptr="*i32", kv_indices="*i32",
            kv_last_page_len="*i32", scale="fp32",
        )  # fmt: skip
        for block_q in (at.NARROW_Q, wide_q):
            constexprs = dict(
                HEAD_DIM=128, GQ=4, PAGE=16, BLOCK_Q=block_q, BLOCK_T=block_t, BLOCK_D=128,
                UPCAST=False, PRECISION=precision,
            )  # fmt: skip
            yield _case(f"decode {dtype} BLOCK_Q={block_q}", at._decode_kernel,
                        decode_types, constexprs, decode_warps)  # fmt: skip
        yield _case(
            f"merge {dtype}",
            at._merge_kernel,
            dict(values="*fp32", lse="*fp32", out_values=f"*{dtype}", out_lse="*fp32"),
            dict(HEAD_DIM=128, BLOCK_S=at.merge_chunk(at.MAX_STATES), BLOCK_D=128),
            at.MERGE_WARPS,
        )
        logprob_types = dict(
            hidden=f"*{dtype}", weight=f"*{dtype}", targets="*i64", max_out="*fp32",
            sum_out="*fp32", target_out="*fp32", entropy_out="*fp32", inv_temperature="fp32",
        )  # fmt: skip
        for with_entropy in (False, True):
            constexprs = dict(
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, WITH_ENTROPY=with_entropy,
                UPCAST=False, PRECISION=precision,
            )  # fmt: skip
            yield _case(f"logprobs {dtype} entropy={with_entropy}", lt._forward_kernel,
                        logprob_types, constexprs, logprob_warps)  # fmt: skip

    grad_types = dict(
        logits="*fp32", targets="*i64", lse="*fp32", entropy="*fp32", grad_logprobs="*fp32",
        grad_entropy="*fp32", inv_temperature="fp32",
    )  # fmt: skip
    for with_entropy in (False, True):
        yield _case(f"logit_grad entropy={with_entropy}", lt._logit_grad_kernel, grad_types,
                    dict(BLOCK_V=lt.GRAD_BLOCK_V, WITH_ENTROPY=with_entropy),
                    lt.GRAD_WARPS)  # fmt: skip


class Compiled(NamedTuple):
    label: str
    error: str | None = None
    registers: int | None = None  # per thread, from ptxas' report (None: no report)
    spilled: int | None = None  # bytes of spill stores per thread


def _usage(log: str) -> tuple[int | None, int | None]:
    registers = re.search(r"Used (\d+) registers", log)
    spilled = re.search(r"(\d+) bytes spill stores", log)
    return (
        int(registers.group(1)) if registers else None,
        int(spilled.group(1)) if spilled else None,
    )


def compile_all(
    arch: int = 90, dtypes: Sequence[str] = tuple(DTYPES), warp_size: int = 32
) -> list[Compiled]:
    """Compile each kernel to a cubin for ``sm_<arch>`` at its launch warps, with the registers
    and spill stores ptxas reports (compiled afresh, not from Triton's cache, to get the report)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, warp_size)
    results = []
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v report to stdout
        knobs.compilation.always_compile = True
        for label, kernel, signature, constexprs, warps in _cases(dtypes):
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(
                        ASTSource(kernel, signature, constexprs),
                        target=target,
                        options={"num_warps": warps},
                    )
            except Exception as error:  # noqa: BLE001 - every compiler error is reported, not raised
                message = f"{type(error).__name__}: {str(error).strip()[:2000]}"
                results.append(Compiled(label, message))
                continue
            error = None if compiled.asm.get("cubin") else "no cubin produced"
            results.append(Compiled(label, error, *_usage(log.getvalue())))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help=f"any of {', '.join(DTYPES)} (comma-separated)"
    )
    parser.add_argument(
        "--allow-spills",
        action="store_true",
        help="exit 0 even when a kernel spills registers at its launch settings",
    )
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"unknown dtypes {sorted(unknown)}; expected some of {list(DTYPES)}")
    results = compile_all(args.arch, dtypes)
    failed = [r for r in results if r.error]
    spilling = [r for r in results if not r.error and r.spilled]
    for r in results:
        if r.error:
            print(f"{r.label}: {r.error}", file=sys.stderr)
        elif r.registers is None:
            print(f"{r.label}: compiled (ptxas gave no register report)")
        else:
            print(f"{r.label}: {r.registers} registers, {r.spilled or 0} bytes spilled")
    print(
        f"{len(results)} kernel variants, {len(failed)} failed, {len(spilling)} spill registers "
        f"(sm_{args.arch})"
    )
    return 1 if failed or (spilling and not args.allow_spills) else 0


if __name__ == "__main__":
    raise SystemExit(main())
