"""Sampling: greedy, temperature / top-k / top-p against softmax frequencies, logprobs, alternatives.

Every draw is seeded, so the frequency checks are deterministic (they cannot flake); their
tolerance (0.03 on 4000 draws, about 4 standard deviations) is loose enough for any torch build.
"""

from __future__ import annotations

import pytest
import torch

from raymoe.model.sampling import SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.0, -1.0, -3.0])
N = 4000


def draws(n: int, base: int = 0) -> tuple[list[int], list[int]]:
    """(seeds, positions) for n rows: a different seed per row, first output position."""
    return [base + i for i in range(n)], [0] * n


def frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = N) -> torch.Tensor:
    out = sample(logits.expand(n, -1).clone(), [params] * n, *draws(n))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[0]).float() / n


@pytest.fixture
def batch_logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 50, generator=g) * 3


def test_greedy_is_argmax(batch_logits):
    out = sample(batch_logits, [SamplingParams()] * 8, *draws(8))
    assert out.token_ids == batch_logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=5.0, top_k=1),
                                    SamplingParams(temperature=1.0, top_p=1e-6),
                                    SamplingParams(temperature=3.0, top_p=0.01, top_k=10)])
def test_degenerate_filters_equal_greedy(batch_logits, params):
    for base in range(5):
        out = sample(batch_logits, [params] * 8, *draws(8, base * 8))
        assert out.token_ids == batch_logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax(temperature):
    freq = frequencies(SamplingParams(temperature=temperature, seed=None))
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_renormalises_over_k_best():
    freq = frequencies(SamplingParams(temperature=1.0, top_k=3))
    expected = torch.zeros_like(LOGITS)
    expected[:3] = torch.softmax(LOGITS[:3], dim=-1)
    assert freq[3:].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, dim=-1)  # ≈ [.53, .24, .18, .07, .03, .003]
    p = float(probs[:2].sum()) + 0.01  # needs the third token to reach p
    freq = frequencies(SamplingParams(temperature=1.0, top_p=p))
    expected = torch.zeros_like(LOGITS)
    expected[:3] = probs[:3] / probs[:3].sum()
    assert freq[3:].sum() == 0
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_p_applies_after_temperature():
    freq = frequencies(SamplingParams(temperature=0.25, top_p=0.9))
    assert freq[0] == 1.0  # at T=0.25 the best token alone holds > 90% of the mass


def test_logprobs_are_log_softmax_of_raw_logits(batch_logits):
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8)] * 4
    out = sample(batch_logits, params, *draws(8))
    logp = torch.log_softmax(batch_logits, dim=-1)
    expected = logp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-6)


def test_top_alternatives_sorted_and_per_row(batch_logits):
    params = [SamplingParams(logprobs=n) for n in (0, 1, 5, 20)] * 2
    out = sample(batch_logits, params, *draws(8))
    logp = torch.log_softmax(batch_logits, dim=-1)
    for row, (p, top) in enumerate(zip(params, out.top)):
        assert len(top) == p.logprobs
        lps = [lp for _, lp in top]
        assert lps == sorted(lps, reverse=True)
        for tok, lp in top:
            assert lp == pytest.approx(float(logp[row, tok]), abs=1e-6)
        if top:
            assert {t for t, _ in top} == set(logp[row].topk(p.logprobs).indices.tolist())
            assert top[0][0] == out.token_ids[row]  # greedy: the chosen token is the best alternative


def test_each_row_depends_only_on_its_own_seed_and_position(batch_logits):
    params = SamplingParams(temperature=1.5)
    alone = [sample(batch_logits[i:i + 1], [params], [100 + i], [i]).token_ids[0] for i in range(8)]
    mixed = [params if i % 2 else SamplingParams() for i in range(8)]  # greedy rows draw nothing
    batch = sample(batch_logits, mixed, [100 + i for i in range(8)], list(range(8)))
    assert [t for i, t in enumerate(batch.token_ids) if i % 2] == [t for i, t in enumerate(alone) if i % 2]


def test_uniform_depends_only_on_seed_and_position():
    from raymoe.model.sampling import uniform

    assert uniform(7, 3) == uniform(7, 3)
    values = [uniform(7, p) for p in range(2000)] + [uniform(s, 0) for s in range(10_000, 12_000)]
    assert all(0 <= u < 1 for u in values) and len(set(values)) == len(values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02  # spread over [0, 1)
    assert uniform(2**64 - 1, 2**40) != uniform(0, 2**40)


def test_non_finite_row_fails_alone(batch_logits):
    logits = batch_logits.clone()
    logits[2, 5] = float("nan")
    logits[5] = float("inf")
    params = [SamplingParams(temperature=1.0, top_p=0.9, logprobs=2)] * 8
    out = sample(logits, params, *draws(8))
    assert out.failed == [2, 5]
    ok = [i for i in range(8) if i not in (2, 5)]
    alone = sample(batch_logits[ok], [params[i] for i in ok], [i for i in ok], [0] * len(ok))
    assert [out.token_ids[i] for i in ok] == alone.token_ids


@pytest.mark.parametrize("temperature", [1e-40, 1e-6, 99.0, 100.0])
def test_extreme_temperatures_sample_a_real_token(batch_logits, temperature):
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=3)
    params.validate()
    out = sample(batch_logits * 1e4, [params] * 8, *draws(8))
    assert not out.failed and all(0 <= t < 50 for t in out.token_ids)
    if temperature < 1e-5:  # greedy in all but name
        assert out.token_ids == (batch_logits * 1e4).argmax(-1).tolist()


@pytest.mark.parametrize("kwargs,field", [({"temperature": -0.1}, "temperature"),
                                          ({"temperature": float("inf")}, "temperature"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": float("nan")}, "top_p"),
                                          ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
                                          ({"logprobs": -1}, "logprobs"), ({"temperature": 101.0}, "temperature"),
                                          ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed")])
def test_validate(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()


def test_top_k_keeps_every_token_tied_with_the_kth():
    """By value, as transformers: with k=2 and three tokens tied for second place, all three stay."""
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0])
    freq = frequencies(SamplingParams(temperature=1.0, top_k=2), logits=logits)
    assert (freq[1:4] > 0.05).all() and freq[4] == 0
