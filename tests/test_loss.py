"""Policy losses: the on-policy ratio, clipping rules, masking and aggregation."""

import pytest
import torch

from papo import loss


def _inputs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(n, generator=g)).requires_grad_()
    advantages = torch.randn(n, generator=g)
    mask = torch.tensor([True] * (n - 2) + [False, False])
    sample_index = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    return logprobs, advantages, mask, sample_index


def test_on_policy_ratio_is_one_with_the_gradient_of_logp():
    logprobs, adv, mask, _ = _inputs()
    out = loss.get("papo")(logprobs, adv, mask)
    assert out.loss.item() == pytest.approx(-(adv[mask]).mean().item(), abs=1e-6)
    out.loss.backward()
    expected = torch.where(mask, -adv / mask.sum(), 0.0)
    assert torch.allclose(logprobs.grad, expected)


def test_masked_tokens_get_no_gradient():
    logprobs, adv, mask, _ = _inputs()
    for name in ("papo", "ppo_clip", "sft"):
        logprobs.grad = None
        loss.get(name)(logprobs, adv, mask, old_logprobs=logprobs.detach() - 0.5).loss.backward()
        assert torch.all(logprobs.grad[~mask] == 0), name


def test_stale_batches_clip_but_never_structural_tokens():
    logprobs, adv, mask, _ = _inputs()
    adv = torch.ones_like(adv)
    old = logprobs.detach() - 1.0  # ratio e > 1 + 0.28: clipped for positive advantages
    structural = torch.zeros_like(mask)
    structural[0] = True
    out = loss.get("papo")(
        logprobs, adv, mask, old_logprobs=old, clip=(0.2, 0.28), structural=structural
    )
    out.loss.backward()
    assert logprobs.grad[0] != 0, "structural tokens keep their gradient"
    assert torch.all(logprobs.grad[1 : mask.sum()] == 0), "clipped tokens lose theirs"
    assert out.stats["clip_fraction"] == pytest.approx((mask.sum().item() - 1) / mask.sum().item())
    logprobs.grad = None
    loss.get("ppo_clip")(logprobs, adv, mask, old_logprobs=old).loss.backward()
    assert torch.all(logprobs.grad == 0), "ppo_clip clips every token"


def test_aggregations():
    values = torch.tensor([1.0, 3.0, 10.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    index = torch.tensor([0, 0, 1, 1])
    assert loss.aggregation("token-mean")(values, mask).item() == pytest.approx(14 / 3)
    assert loss.aggregation("seq-mean")(values, mask, index).item() == pytest.approx((2 + 10) / 2)
    assert loss.aggregation("token-mean")(values, mask, None, 7).item() == pytest.approx(2.0)
    with pytest.raises(KeyError, match="known"):
        loss.aggregation("sum")


def test_kl_term_is_zero_at_the_reference_and_positive_elsewhere():
    logprobs, adv, mask, _ = _inputs()
    same = loss.get("papo")(logprobs, adv, mask, ref_logprobs=logprobs.detach(), kl_coef=0.1)
    assert same.stats["kl"] == pytest.approx(0.0, abs=1e-7)
    other = loss.get("papo")(logprobs, adv, mask, ref_logprobs=logprobs.detach() - 0.3, kl_coef=0.1)
    assert other.stats["kl"] > 0
    assert other.loss.item() > same.loss.item()


def test_sft_is_negative_log_likelihood():
    logprobs, _, mask, index = _inputs()
    out = loss.get("sft")(logprobs, None, mask, aggregation="seq-mean", sample_index=index)
    per_sample = [-logprobs[:4][mask[:4]].mean(), -logprobs[4:][mask[4:]].mean()]
    assert out.loss.item() == pytest.approx(sum(per_sample).item() / 2, abs=1e-6)


def test_what_masked_tokens_hold_never_reaches_the_loss_or_gradient():
    """Masked-out tokens may hold unknown log-probs (NaN old ones of unscored engine-written
    tokens, -inf, a ratio that overflows): the loss and gradient are those of the masked-in
    tokens alone, not NaN."""
    logprobs, adv, mask, index = _inputs()
    clean = logprobs.detach().clone()
    old = clean - 0.1
    ref = clean + 0.1
    dirty_lp = torch.where(mask, clean, float("-inf")).requires_grad_()
    dirty_old = torch.where(mask, old, float("nan"))
    dirty_ref = torch.where(mask, ref, 500.0)
    for name in ("papo", "ppo_clip", "sft"):
        for aggregation in ("token-mean", "seq-mean"):
            options = dict(aggregation=aggregation, sample_index=index, kl_coef=0.1)
            if name == "papo":
                options["clip"] = (0.2, 0.28)
            expected_lp = clean.clone().requires_grad_()
            expected = loss.get(name)(
                expected_lp, adv, mask, old_logprobs=old, ref_logprobs=ref, **options
            )
            expected.loss.backward()
            dirty_lp.grad = None
            got = loss.get(name)(
                dirty_lp, adv, mask, old_logprobs=dirty_old, ref_logprobs=dirty_ref, **options
            )
            got.loss.backward()
            assert got.loss.item() == pytest.approx(expected.loss.item()), (name, aggregation)
            assert torch.equal(dirty_lp.grad, expected_lp.grad), (name, aggregation)
            assert got.stats == pytest.approx(expected.stats), (name, aggregation)


def test_clip_fraction_accepts_a_float_mask():
    logprobs, adv, mask, _ = _inputs()
    old = logprobs.detach() - 1.0
    as_bool = loss.get("ppo_clip")(logprobs, adv, mask, old_logprobs=old)
    as_float = loss.get("ppo_clip")(logprobs, adv, mask.float(), old_logprobs=old)
    assert as_float.stats == pytest.approx(as_bool.stats)
    assert as_float.loss.item() == pytest.approx(as_bool.loss.item())
