"""Kernels against their plain torch references.

Without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set below, before
any kernel module is imported), at tiny shapes: the interpreter is slow. With CUDA they run on the
GPU at the same shapes (and the ``gpu`` tests add larger ones).
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import reference_logprobs, token_logprobs, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available(DEVICE), reason="triton is not installed (pip install -e '.[dev]')"
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


# -- token_logprobs -------------------------------------------------------------------------------
def _logprob_case(n=37, dim=48, vocab=101, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (0.3 * torch.randn(vocab, dim, generator=gen)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    return hidden, weight, targets, gen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_token_logprobs_match_full_logits(backend, with_entropy):
    hidden, weight, targets, gen = _logprob_case()
    g_lp = torch.randn(len(targets), generator=gen).to(DEVICE)
    g_ent = torch.randn(len(targets), generator=gen).to(DEVICE)
    # chunk_size 16 splits 37 tokens into 3 chunks, the last one partial.
    logprobs, entropy = token_logprobs(
        hidden,
        weight,
        targets,
        temperature=0.7,
        chunk_size=16,
        with_entropy=with_entropy,
        backend=backend,
    )
    ref_lp, ref_ent = reference_logprobs(hidden, weight, targets, temperature=0.7)
    assert logprobs.dtype == torch.float32 and logprobs.shape == targets.shape
    torch.testing.assert_close(logprobs, ref_lp, rtol=1e-5, atol=1e-5)
    loss = (logprobs * g_lp).sum()
    ref_loss = (ref_lp * g_lp).sum()
    if with_entropy:
        torch.testing.assert_close(entropy, ref_ent, rtol=1e-5, atol=1e-5)
        loss = loss + (entropy * g_ent).sum()
        ref_loss = ref_loss + (ref_ent * g_ent).sum()
    else:
        assert entropy is None
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref_grads = torch.autograd.grad(ref_loss, [hidden, weight])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_token_logprobs_at_the_tiles_a_gpu_launches(monkeypatch):
    """The forward kernel at each dtype's GPU tiles (``FORWARD_TILES``; the interpreter
    otherwise runs small ones): tiles wider than the hidden size and the vocabulary, masked."""
    from kernels import logprobs_triton

    hidden, weight, targets, _ = _logprob_case(n=70)
    ref_lp, ref_ent = reference_logprobs(hidden, weight, targets, temperature=0.7)
    for tiles in dict.fromkeys(logprobs_triton.FORWARD_TILES.values()):
        monkeypatch.setattr(logprobs_triton, "_blocks", lambda dtype=None, tiles=tiles: tiles)
        logprobs, entropy = token_logprobs(
            hidden, weight, targets, temperature=0.7, with_entropy=True, backend="triton"
        )
        torch.testing.assert_close(logprobs, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_stays_exact_and_non_negative_for_large_logits(backend):
    """Entropy as sum(p * (lse - z)): lse - sum(p * z) lost ~1e-3 to cancellation with logits
    near 1000 and could go below 0."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 8, generator=gen)
    for size in (100.0, 1000.0):
        hidden = torch.randn(16, 8, generator=gen)
        hidden = hidden / (hidden @ weight.T).abs().max() * size
        targets = torch.zeros(16, dtype=torch.long)
        _, entropy = token_logprobs(
            hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), with_entropy=True,
            backend=backend,
        )  # fmt: skip
        exact = torch.distributions.Categorical(logits=hidden.double() @ weight.double().T)
        assert entropy.min() >= 0
        torch.testing.assert_close(entropy.cpu().double(), exact.entropy(), rtol=0, atol=5e-5)


def test_token_logprobs_keeps_leading_dims_and_low_precision():
    hidden, weight, targets, _ = _logprob_case(n=24, dtype=torch.bfloat16)
    logprobs, entropy = token_logprobs(
        hidden.reshape(2, 12, -1),
        weight,
        targets.reshape(2, 12),
        with_entropy=True,
        backend="torch",
    )
    ref_lp, ref_ent = reference_logprobs(hidden, weight, targets)
    assert logprobs.shape == (2, 12) and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.flatten(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.flatten(), ref_ent, rtol=1e-5, atol=1e-5)
    logprobs.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_token_logprobs_gradient_of_one_input_only():
    hidden, weight, targets, _ = _logprob_case(n=10)
    frozen = weight.detach()
    logprobs, _ = token_logprobs(hidden, frozen, targets, chunk_size=4, backend="torch")
    logprobs.sum().backward()
    ref, _ = reference_logprobs(hidden.detach().requires_grad_(), frozen, targets)
    assert hidden.grad is not None and frozen.grad is None
    torch.testing.assert_close(logprobs, ref)


def test_token_logprobs_rejects_bad_arguments():
    hidden, weight, targets, _ = _logprob_case(n=4)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    for bad in (-100, weight.shape[0]):  # the Triton kernel returned -lse for such an id
        with pytest.raises(ValueError, match=r"token ids in \[0, 101\)"):
            token_logprobs(hidden, weight, torch.full_like(targets, bad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_bf16_gradients_match_float64(backend):
    """bf16 inputs with LLM-sized logits (largest about 30): both backends' gradients stay
    within bf16 rounding of float64 autograd on the same inputs. Where ``torch.mm`` has no
    float32 output for bf16 (the CPU, torch < 2.8), the Triton backward rounded its recomputed
    logits to bf16, and their probabilities did not fit the forward's float32 LSE."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(16, 32, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (1.2 * torch.randn(64, 32, generator=gen)).to(DEVICE, torch.bfloat16)
    weight.requires_grad_()
    targets = torch.randint(0, 64, (16,), generator=gen).to(DEVICE)
    logprobs, _ = token_logprobs(hidden, weight, targets, chunk_size=8, backend=backend)
    logprobs.sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logits = h64 @ w64.T
    assert logits.abs().max() > 20
    torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().backward()
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        error = (got.double() - want).norm() / want.norm()
        assert error < 1e-2, float(error)
    if backend == "triton":
        with pytest.raises(ValueError, match="one dtype"):
            token_logprobs(hidden, weight.float(), targets, backend="triton")


# -- merge_states ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_states_equals_attention_over_the_union(backend):
    """Attention over [A, B, C] equals the merge of attention over A, B and C; an empty segment
    (lse = -inf) is neutral, and a query whose segments are all empty gets 0 and -inf."""
    from kernels.attention import merge_states

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 3, 16, generator=gen)
    k, v = torch.randn(2, 12, 3, 16, generator=gen).unbind(0)
    bounds = [(0, 4), (4, 4), (4, 12)]  # the middle segment is empty
    scores = torch.einsum("nhd,thd->nht", q, k) / 4.0
    parts, lses = [], []
    for lo, hi in bounds:
        s = scores[..., lo:hi]
        lse = torch.logsumexp(s, -1) if hi > lo else torch.full(s.shape[:2], -torch.inf)
        out = torch.einsum("nht,thd->nhd", torch.softmax(s, -1), v[lo:hi]) if hi > lo else q * 0
        parts.append(out)
        lses.append(lse)
    values, lse = torch.stack(parts, 1).to(DEVICE), torch.stack(lses, 1).to(DEVICE)
    lse[0] = -torch.inf  # query 0: nothing to attend to
    merged, merged_lse = merge_states(values, lse, backend=backend)
    full = torch.einsum("nht,thd->nhd", torch.softmax(scores, -1), v)
    torch.testing.assert_close(merged[1:].cpu(), full[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse[1:].cpu(), torch.logsumexp(scores, -1)[1:])
    assert (merged[0] == 0).all() and torch.isneginf(merged_lse[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_states_streams_many_states(backend):
    """More states than the kernel reads at once (it streams them in chunks): the largest
    state in the last chunk, a query whose first chunks are all empty, one with no state."""
    from kernels.attention import merge_states
    from kernels.attention_triton import MERGE_CHUNK

    gen = torch.Generator().manual_seed(3)
    num_states = 2 * MERGE_CHUNK + 7
    values = torch.randn(3, num_states, 2, 8, generator=gen)
    lse = 3 * torch.randn(3, num_states, 2, generator=gen)
    lse[0, -1] = 40.0  # dominates: a merge that misses the last chunk is far off
    lse[1, : 2 * MERGE_CHUNK] = -torch.inf
    lse[2] = -torch.inf
    weights = torch.softmax(lse[:2], dim=1)
    want = torch.einsum("nsh,nshd->nhd", weights, values[:2])
    merged, merged_lse = merge_states(values.to(DEVICE), lse.to(DEVICE), backend=backend)
    torch.testing.assert_close(merged[:2].cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse[:2].cpu(), torch.logsumexp(lse[:2], dim=1))
    assert (merged[2] == 0).all() and torch.isneginf(merged_lse[2]).all()


# -- paged decode ---------------------------------------------------------------------------------
def _paged_case(page_size, seed=2, dtype=torch.float32):
    """8 queries (4 heads over 2 KV heads) in 4 groups, one group with an empty KV list."""
    gen = torch.Generator().manual_seed(seed)
    pages, kv_heads, dim = 24, 2, 16
    k_cache = torch.randn(pages, page_size, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(pages, page_size, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    query = torch.randn(8, 2 * kv_heads, dim, generator=gen).to(DEVICE, dtype)
    counts = [3, 0, 5, 2]
    kv_indptr = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    kv_indices = torch.randperm(pages - 1, generator=gen)[: sum(counts)].to(torch.int32) + 1
    last = torch.tensor([1, 1, page_size, max(1, page_size - 1)], dtype=torch.int32)
    qo_indptr = torch.tensor([0, 1, 3, 6, 8], dtype=torch.int32)
    return query, k_cache, v_cache, kv_indptr, kv_indices, last, qo_indptr


def _dense_decode(query, k_cache, v_cache, kv_indptr, kv_indices, last, qo_indptr):
    """Per query: gather its slots, repeat KV heads, softmax attention (the plainest form)."""
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = query.shape[1] // kv_heads
    outs = []
    for g in range(len(last)):
        pages = kv_indices[kv_indptr[g] : kv_indptr[g + 1]].long().tolist()
        slots = [p * page_size + o for p in pages for o in range(page_size)]
        slots = slots[: max(0, len(slots) - page_size + int(last[g]))] if pages else []
        keys = k_cache.reshape(-1, kv_heads, k_cache.shape[-1])[slots].float()
        values = v_cache.reshape(-1, kv_heads, v_cache.shape[-1])[slots].float()
        for q in query[qo_indptr[g] : qo_indptr[g + 1]].float():
            if not slots:
                outs.append(torch.zeros_like(q))
                continue
            k = keys.repeat_interleave(groups, dim=1)
            scores = torch.einsum("hd,thd->ht", q, k) / q.shape[-1] ** 0.5
            v = values.repeat_interleave(groups, dim=1)
            outs.append(torch.einsum("ht,thd->hd", torch.softmax(scores, -1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size, splits", [(1, None), (4, None), (4, 3)])
def test_paged_decode_matches_dense_attention(backend, page_size, splits):
    from kernels.attention import paged_decode_attention

    case = _paged_case(page_size)
    out, lse = paged_decode_attention(*case, num_splits=splits, backend=backend)
    torch.testing.assert_close(out.cpu(), _dense_decode(*case).cpu(), rtol=1e-4, atol=1e-5)
    assert (
        torch.isneginf(lse[1:3]).all()
        and torch.isfinite(lse[:1]).all()
        and torch.isfinite(lse[3:]).all()
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "page_size, heads, kv_heads, dim, dtype",
    [(3, 4, 4, 80, torch.float32), (5, 8, 1, 24, torch.float32), (7, 8, 1, 96, torch.bfloat16),
     (16, 16, 2, 64, torch.float16)],
)  # fmt: skip
def test_paged_decode_at_other_shapes(backend, page_size, heads, kv_heads, dim, dtype):
    """Page sizes and head dims that are not powers of two, GQA 1 and 8, MQA, half precision
    (float32 accumulation): against dense attention over the gathered keys."""
    from kernels.attention import paged_decode_attention

    gen = torch.Generator().manual_seed(page_size)
    pages = 12
    k_cache = torch.randn(pages, page_size, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(pages, page_size, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    query = torch.randn(5, heads, dim, generator=gen).to(DEVICE, dtype)
    kv_indptr = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    kv_indices = torch.randperm(pages, generator=gen)[:9].to(torch.int32)
    last = torch.tensor([page_size, 1, max(1, page_size - 2)], dtype=torch.int32)
    qo_indptr = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    case = (query, k_cache, v_cache, kv_indptr, kv_indices, last, qo_indptr)
    out, _ = paged_decode_attention(*case, num_splits=2, backend=backend)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        out.cpu().float(), _dense_decode(*case).cpu(), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_reads_caches_whose_dims_are_strided(backend):
    """A cache viewed with a stride in its last dimension (every other element of a wider
    one) reads as its contiguous copy (the Triton kernel stepped by 1)."""
    from kernels.attention import paged_decode_attention

    query, k_cache, v_cache, *rest = _paged_case(4)
    wide_k = torch.stack([k_cache, -k_cache], dim=-1).flatten(-2)[..., ::2]
    wide_v = torch.stack([v_cache, -v_cache], dim=-1).flatten(-2)[..., ::2]
    assert wide_k.stride(-1) == 2 and torch.equal(wide_k, k_cache)
    got, _ = paged_decode_attention(query, wide_k, wide_v, *rest, backend=backend)
    want, _ = paged_decode_attention(query, k_cache, v_cache, *rest, backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_in_no_group_gets_an_empty_state(backend):
    """A query no group of a level covers merges as empty (out 0, lse -inf), as the reference
    says; the Triton path returned whatever memory it was given."""
    from kernels.attention import paged_decode_attention

    query, k_cache, v_cache, indptr, indices, last, qo = _paged_case(4)
    extra = torch.randn(1, *query.shape[1:]).to(query)
    out, lse = paged_decode_attention(
        torch.cat([query, extra]), k_cache, v_cache, indptr, indices, last, qo, backend=backend
    )
    assert torch.all(out[-1] == 0) and torch.all(lse[-1] == float("-inf"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "key", "key_inf"])
def test_a_nan_or_inf_score_comes_out_nan_not_empty(backend, where):
    """A NaN (or inf) in a query or key makes that query's attention NaN, as the dense form
    has it: taken as "no keys here" (output 0, LSE -inf) it vanished in the merge, and the
    engine's check for NaN log-probs never saw it. A group without keys stays empty."""
    from kernels.attention import merge_states, paged_decode_attention

    query, k_cache, v_cache, indptr, indices, last, qo = _paged_case(4)
    bad = float("inf") if where == "key_inf" else float("nan")
    if where == "query":
        query[0, 1, 3] = bad  # group 0, query head 1 (KV head 0)
    else:
        k_cache.view(-1, *k_cache.shape[2:])[int(indices[0]) * 4, 0, 5] = bad  # group 0's first key
    case = (query, k_cache, v_cache, indptr, indices, last, qo)
    out, lse = paged_decode_attention(*case, num_splits=2, backend=backend)
    dense = _dense_decode(*case)
    nan = torch.isnan(dense)
    assert nan[0].any() and not nan[1:].any()
    assert torch.equal(torch.isnan(out.cpu()), nan)
    torch.testing.assert_close(out.cpu()[~nan], dense[~nan], rtol=1e-4, atol=1e-5)
    heads = nan[0].any(dim=-1)
    assert not torch.isfinite(lse[0, heads]).any() and torch.isneginf(lse[1:3]).all()
    # merged with a finite state, the NaN state still comes out NaN; two empty states stay empty
    values = torch.stack([out, torch.ones_like(out)], dim=1)
    merged, merged_lse = merge_states(values, torch.stack([lse, lse.nan_to_num(0.0)], dim=1),
                                      backend=backend)  # fmt: skip
    assert torch.isnan(merged[0, heads]).all() and not torch.isfinite(merged_lse[0, heads]).any()
    empty = merge_states(values[1:3], torch.full_like(lse[1:3, None].expand(-1, 2, -1), -math.inf),
                         backend=backend)  # fmt: skip
    assert (empty[0] == 0).all() and torch.isneginf(empty[1]).all()


def test_paged_decode_flat_cache_is_page_size_one():
    from kernels.attention import paged_decode_attention

    query, k_cache, v_cache, indptr, indices, last, qo = _paged_case(4)
    slots = torch.cat(
        [
            (indices[indptr[g] : indptr[g + 1]].long()[:, None] * 4 + torch.arange(4)).flatten()[
                : max(0, 4 * int(indptr[g + 1] - indptr[g]) - 4 + int(last[g]))
            ]
            for g in range(len(last))
        ]
    ).to(torch.int32)
    sizes = torch.tensor([3 * 4 - 3, 0, 5 * 4, 2 * 4 - 1], dtype=torch.int32)
    slot_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), sizes.cumsum(0).to(torch.int32)])
    flat = paged_decode_attention(
        query,
        k_cache.flatten(0, 1),
        v_cache.flatten(0, 1),
        slot_indptr,
        slots,
        torch.ones(4, dtype=torch.int32),
        qo,
        backend="torch",
    )
    paged = paged_decode_attention(
        query, k_cache, v_cache, indptr, indices, last, qo, backend="torch"
    )
    torch.testing.assert_close(flat, paged)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cascade_of_shared_prefix_and_tails_equals_flat_decode(backend):
    """Level 1: 6 queries in 2 groups each sharing a prefix; level 2: each query's own tail."""
    from kernels.attention import DecodeLevel, cascade_decode_attention, paged_decode_attention

    gen = torch.Generator().manual_seed(3)
    slots_total, kv_heads, dim = 200, 2, 16
    k_cache = torch.randn(slots_total, kv_heads, dim, generator=gen).to(DEVICE)
    v_cache = torch.randn(slots_total, kv_heads, dim, generator=gen).to(DEVICE)
    query = torch.randn(6, 4, dim, generator=gen).to(DEVICE)
    prefixes = [torch.arange(10, 40), torch.arange(50, 57)]
    tails = [torch.arange(100 + 10 * i, 103 + 10 * i + i) for i in range(6)]
    owner = [0, 0, 0, 0, 1, 1]

    def level(qo, lists):
        sizes = torch.tensor([len(x) for x in lists])
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(torch.int32)
        return DecodeLevel(
            torch.tensor(qo, dtype=torch.int32),
            indptr,
            torch.cat(lists).to(torch.int32),
            torch.ones(len(lists), dtype=torch.int32),
            int(sizes.max()),
            max(b - a for a, b in zip(qo, qo[1:], strict=False)),
        )

    levels = [level([0, 4, 6], prefixes), level(list(range(7)), tails)]
    got = cascade_decode_attention(
        query, k_cache, v_cache, [lv.to(DEVICE) for lv in levels], backend=backend
    )
    whole = [torch.cat([prefixes[owner[i]], tails[i]]) for i in range(6)]
    flat = level(list(range(7)), whole)
    want, _ = paged_decode_attention(
        query,
        k_cache,
        v_cache,
        flat.kv_indptr,
        flat.kv_indices,
        flat.kv_last_page_len,
        backend="torch",
    )
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
    if backend == "triton":  # other tiles and pipelining (the benchmark's sweep): same result
        from kernels.attention_triton import plan_launch

        device_levels = [lv.to(DEVICE) for lv in levels]
        retuned = plan_launch(device_levels, 4, kv_heads, query.device, tiles=(32, 32, 2, 2))
        got = cascade_decode_attention(
            query, k_cache, v_cache, device_levels, backend=backend, launch=retuned
        )
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
        # each level with its own query tile, as plan_launch gives levels of different widths
        from kernels.attention_triton import Launch

        mixed = Launch(64, 1, [(device_levels[0], 64, 1, 1), (device_levels[1], 16, 1, 1)], 2)
        got = cascade_decode_attention(
            query, k_cache, v_cache, device_levels, backend=backend, launch=mixed
        )
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
        # the tiles a GPU launches for each dtype (DECODE_TILES), with two KV splits per list
        from kernels import _triton
        from kernels.attention_triton import DECODE_TILES

        for dtype, (wide_q, block_t, warps) in DECODE_TILES.items():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_triton, "interpreting", lambda: False)
                gpu = plan_launch(device_levels, 4, kv_heads, query.device, 2, dtype=dtype)
            assert gpu.block_t == block_t and gpu.total_states == 4
            # these groups are narrow (at most 8 rows): their wide tile only when forced
            wide = plan_launch(
                device_levels, 4, kv_heads, query.device, 2, (wide_q, block_t, warps, None)
            )
            for launch in (gpu, wide):
                got = cascade_decode_attention(
                    query, k_cache, v_cache, device_levels, backend=backend, launch=launch
                )
                torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)


def test_plan_launch_keeps_the_splits_it_chooses_within_the_merge(monkeypatch):
    """Long views on a large GPU take up to 64 splits per level: five levels (nested blocks)
    would need 320 states, past the merge's 256, and the step failed. Chosen splits now share
    the states; splits a caller asks for beyond them are still an error."""
    from kernels import attention_triton
    from kernels.attention import DecodeLevel
    from kernels.attention_triton import MAX_STATES, plan_launch

    monkeypatch.setattr(attention_triton, "_num_splits", lambda *args: 64)
    one = torch.tensor([0, 1], dtype=torch.int32)
    level = DecodeLevel(one, one, torch.zeros(1, dtype=torch.int32), one[1:], 8192, 1)
    launch = plan_launch([level] * 5, 12, 2, torch.device("cpu"))
    assert launch.total_states <= MAX_STATES
    assert [splits for *_, splits in launch.levels] == [MAX_STATES // 5] * 5
    assert plan_launch([level] * 4, 12, 2, torch.device("cpu")).total_states == 256
    with pytest.raises(ValueError, match="exceed"):
        plan_launch([level] * 5, 12, 2, torch.device("cpu"), num_splits=64)


def test_plan_launch_tiles_each_level_by_its_widest_group(monkeypatch):
    """On a GPU a level's query tile fits its widest group: a shared prefix read by 8 lanes
    (GQA 4: 32 rows) takes 64-row tiles, each lane's own tail (4 rows) 16-row ones."""
    from kernels import _triton
    from kernels.attention import DecodeLevel
    from kernels.attention_triton import plan_launch

    monkeypatch.setattr(_triton, "interpreting", lambda: False)

    def level(groups: int, size: int) -> DecodeLevel:  # groups of ``size`` queries, 10 slots each
        qo = torch.arange(groups + 1, dtype=torch.int32) * size
        kv = torch.arange(groups + 1, dtype=torch.int32) * 10
        return DecodeLevel(qo, kv, torch.zeros(groups * 10, dtype=torch.int32),
                           torch.ones(groups, dtype=torch.int32), 10, size)  # fmt: skip

    shared, own = level(2, 8), level(16, 1)
    launch = plan_launch([shared, own], 32, 8, torch.device("cpu"))
    assert [entry[1:3] for entry in launch.levels] == [(64, 1), (16, 1)] and launch.block_q == 64
    fp32 = plan_launch([shared, own], 32, 8, torch.device("cpu"), dtype=torch.float32)
    assert [entry[1:3] for entry in fp32.levels] == [(32, 1), (16, 1)], "no 64-row fp32 tiles"
    tuned = plan_launch([shared, own], 32, 8, torch.device("cpu"), tiles=(32, 64, 4, 3))
    assert [entry[1:3] for entry in tuned.levels] == [(32, 1), (32, 1)], "tiles apply to all"


# -- larger shapes on a GPU -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_at_model_shapes():
    """Qwen3-4B-like heads (32 query / 8 KV heads of 128) in bf16 with long contexts; and the
    log-prob kernel with a 151k vocabulary."""
    from kernels.attention import paged_decode_attention

    torch.manual_seed(0)
    pages, page_size = 2048, 16
    k_cache = torch.randn(pages, page_size, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(16, 32, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, 200, (16,))
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int().cuda()
    kv_indices = torch.randperm(pages - 1)[: int(lengths.sum())].int().cuda() + 1
    last = torch.randint(1, page_size + 1, (16,), dtype=torch.int32, device="cuda")
    got, _ = paged_decode_attention(
        query, k_cache, v_cache, kv_indptr, kv_indices, last, backend="triton"
    )
    want, _ = paged_decode_attention(
        query, k_cache, v_cache, kv_indptr, kv_indices, last, backend="torch"
    )
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    hidden = torch.randn(3000, 2560, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (0.02 * torch.randn(151_936, 2560, device="cuda")).bfloat16().requires_grad_()
    targets = torch.randint(0, 151_936, (3000,), device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        lp, ent = token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
        grads = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight])
        results[backend] = (lp, ent, *grads)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs code the compiler rejects (a plain global read in a kernel broke
    every kernel on the first H200 run): compile each kernel to an sm_90 cubin here, at its
    launch tiles and warps, none of which may spill registers (ptxas' report)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--dtypes", "bf16,fp32"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "12 kernel variants, 0 failed, 0 spill registers (sm_90)" in result.stdout
    assert result.stdout.count(" registers, 0 bytes spilled") == 12, result.stdout
