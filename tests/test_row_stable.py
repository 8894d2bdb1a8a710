"""Row-stable float32 math (model/row_stable.py): a row's bits do not depend on the rows, keys or
sequences beside it. These check the kernels' behaviour the module relies on, on this machine, and
the engine-level consequence: a sequence's logprobs are the same alone, prefilled in chunks, after a
cache hit on keys of a longer or shorter prompt, and computed in query chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.model import layers, row_stable
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams


@pytest.mark.parametrize("threads", [1, 2])
def test_a_linear_row_is_the_same_for_any_row_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(96, 64, generator=g), torch.randn(80, 64, generator=g)
        alone = torch.cat([row_stable.linear(x[i:i + 1], w) for i in range(80)])
        for m in (2, 3, 5, 7, 11, 12, 16, 33, 80):
            for start in (0, 3):
                assert torch.equal(row_stable.linear(x[start:start + m], w), alone[start:start + m]), (m, start)
        # the plain kernel does differ for small row counts (else the padding would be a waste)
        plain = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(80)])
        assert not torch.equal(plain, torch.nn.functional.linear(x, w))
        with row_stable.fast_kernels():  # decode-only steps: the plain kernels
            assert torch.equal(torch.cat([row_stable.linear(x[i:i + 1], w) for i in range(80)]), plain)
        assert torch.equal(row_stable.linear(x[:1], w), alone[:1])
    finally:
        torch.set_num_threads(before)


def attention_inputs(b: int, q: int, keys: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, q, 16, generator=g), torch.randn(b, 2, keys, 16, generator=g),
            torch.randn(b, 2, keys, 16, generator=g))


def causal_mask(b: int, q: int, keys: int, cached: int) -> torch.Tensor:
    pos = cached + torch.arange(q)[:, None]
    return (torch.arange(keys)[None, :] <= pos).expand(b, 1, q, keys)


def test_an_attention_row_is_the_same_for_any_query_count_key_count_and_batch():
    """The last query of a 150-key sequence: computed with all 150 queries, with the last 5, alone,
    with the key run padded to 300 (a longer neighbour in the batch), and beside another sequence."""
    q, k, v = attention_inputs(1, 150, 150)
    full = row_stable.grouped_attention(q, k, v, causal_mask(1, 150, 150, 0))
    tail = row_stable.grouped_attention(q[:, :, -5:], k, v, causal_mask(1, 5, 150, 145))
    last = row_stable.grouped_attention(q[:, :, -1:], k, v, causal_mask(1, 1, 150, 149))
    assert torch.equal(tail, full[:, :, -5:]) and torch.equal(last, full[:, :, -1:])
    pad = torch.zeros(1, 2, 150, 16)
    longer = row_stable.grouped_attention(q[:, :, -1:], torch.cat([k, pad], 2), torch.cat([v, pad], 2),
                                          causal_mask(1, 1, 300, 149))
    assert torch.equal(longer, last)
    q2, k2, v2 = attention_inputs(1, 1, 150, seed=1)
    both = row_stable.grouped_attention(torch.cat([q[:, :, -1:], q2]), torch.cat([k, k2]), torch.cat([v, v2]),
                                        causal_mask(2, 1, 150, 149))
    assert torch.equal(both[:1], last)
    # the same math as torch's own attention, up to rounding
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=causal_mask(1, 150, 150, 0),
                                         enable_gqa=True)
    assert torch.allclose(full.double(), ref, atol=1e-5)


@pytest.mark.parametrize("queries", [1, 3])
def test_the_fast_path_attends_over_paged_keys_as_torch_does(queries):
    """layers.gathered_attention (decode steps outside the row-stable path) over keys scattered in a
    cache [slots, Hkv, Dh] stored head-major, as model/kv_cache.py stores them."""
    g = torch.Generator().manual_seed(queries)
    b, h, hkv, dh, keys, slots = 3, 4, 2, 16, 37, 200
    storage = torch.randn(2, hkv, slots, dh, generator=g, dtype=torch.float64)
    k_src, v_src = storage[0].transpose(0, 1), storage[1].transpose(0, 1)  # [slots, Hkv, Dh] views
    kv_index = torch.stack([torch.randperm(slots, generator=g)[:keys] for _ in range(b)])  # [B, L]
    q = torch.randn(b * queries, h, dh, generator=g, dtype=torch.float64)
    q_index = torch.arange(b * queries).view(b, queries)
    mask = causal_mask(b, queries, keys, keys - queries).clone()
    mask[1, :, :, :5] = False  # a sequence whose first keys are padding
    got = layers.gathered_attention(q, k_src, v_src, q_index, kv_index, mask)
    qb = q.view(b, queries, h, dh).transpose(1, 2)
    kb, vb = k_src[kv_index].transpose(1, 2), v_src[kv_index].transpose(1, 2)  # [B, Hkv, L, Dh]
    want = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
    want = want.transpose(1, 2).reshape(b * queries, h * dh)
    assert torch.allclose(got, want, atol=1e-6)  # its softmax is in float32, as the reference model's


def test_query_chunks_give_the_same_bits(monkeypatch):
    q, k, v = attention_inputs(2, 70, 70)
    mask = causal_mask(2, 70, 70, 0)
    whole = row_stable.grouped_attention(q, k, v, mask)
    monkeypatch.setattr(row_stable, "SCORES_MAX", 2 * 4 * 64 * 9)  # 9 queries per call
    assert torch.equal(row_stable.grouped_attention(q, k, v, mask), whole)


PARAMS = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True, logprobs=2)


def test_a_sequence_gives_the_same_bits_alone_chunked_and_after_a_hit(model):
    """float32: a 150-token prompt (block size 16) alone; prefilled in chunks of 48 tokens; and after
    a cache hit on 128 tokens whose keys a 140-token prompt computed: the same tokens and logprobs.
    Beside two other prompts: the same tokens, logprobs to rounding."""
    prompt = [1] + [(11 * i) % 490 + 5 for i in range(149)]

    def engine(**kw) -> Engine:
        return Engine(model, kv_cache_tokens=1024, block_size=16, max_running=4, **kw)

    alone = engine().generate([prompt], PARAMS)[0]
    batched = engine().generate([prompt[:37], prompt, prompt[:90] + [7, 8]], [PARAMS] * 3)[1]
    chunked = engine(max_batch_tokens=48).generate([prompt], PARAMS)[0]
    warm = engine()
    warm.generate([prompt[:140]], PARAMS)
    hit = warm.generate([prompt], PARAMS)[0]
    assert hit.cached_prompt_tokens == 128
    for other in (chunked, hit):
        assert other.output_ids == alone.output_ids
        assert other.logprobs == alone.logprobs and other.top_logprobs == alone.top_logprobs
    # beside other sequences the prompt is computed the same, but decoding three at a time takes
    # other kernels than one at a time (decode-only steps keep the fastest ones): equal to rounding
    assert batched.output_ids == alone.output_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


@pytest.mark.parametrize("out_features", [8, 768, 3584])
@pytest.mark.parametrize("rows", [1, 3, 8, 32, 40])
def test_bfloat16_linear_takes_any_path_to_the_same_product(out_features, rows):
    """bfloat16 on the CPU: few rows of a large weight go weights-first (and a single row gets a zero
    row), small weights (a router) and many rows go to F.linear; every path is the same product as
    float32's up to bfloat16 rounding, in the input's shape."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    w = (torch.randn(out_features, 512, generator=g) * 0.05).to(torch.bfloat16)
    got = row_stable.linear(x, w)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, atol=2e-2, rtol=2e-2)
