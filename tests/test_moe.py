"""The grouped expert kernels against a per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.model.moe import LocalExperts, route, sort_by_expert, swiglu_grouped


def per_token_reference(experts: LocalExperts, x, weights, idx):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up = F.linear(x[t], experts.w13[e]).chunk(2)
            out[t] += weights[t, k] * F.linear(F.silu(gate) * up, experts.w2[e])
    return out


@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 2), (40, 2), (64, 3), (200, 1)])
def test_local_experts_equal_per_token_math(tokens, top_k):
    g = torch.Generator().manual_seed(tokens)
    experts = LocalExperts(8, 16, 24)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=g))
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=g))
    x = torch.randn(tokens, 16, generator=g)
    weights, idx = route(x, torch.randn(8, 16, generator=g), top_k)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, idx), per_token_reference(experts, x, weights, idx),
                                   rtol=1e-5, atol=1e-4)


def test_padded_and_looped_kernels_agree():
    """Balanced routing takes the batched (padded) path; force the loop by making one expert empty."""
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(4, 20, 8, generator=g), torch.randn(4, 8, 10, generator=g)
    xs = torch.randn(12, 8, generator=g)
    balanced = swiglu_grouped(xs, [3, 3, 3, 3], w13, w2)  # padded path
    looped = torch.cat([swiglu_grouped(xs[3 * e:3 * e + 3], [0] * e + [3] + [0] * (3 - e), w13, w2)
                        for e in range(4)])  # one expert at a time: loop path
    torch.testing.assert_close(balanced, looped, rtol=1e-5, atol=1e-5)
    order, counts = sort_by_expert(torch.tensor([[3, 0], [1, 2], [0, 3]]), 4)
    assert counts == [2, 1, 1, 2] and order.tolist() == [1, 4, 2, 3, 0, 5]
