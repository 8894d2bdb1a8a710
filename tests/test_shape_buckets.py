"""Bucketed shapes for bfloat16 on the CPU (model/shape_buckets.py): the sizes, and that padding the
rows, sequences, queries and keys of a step changes no real row's math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.model import row_stable, shape_buckets
from raymoe.model.engine import Engine
from raymoe.model.moe import swiglu_grouped
from raymoe.model.sampling import SamplingParams
from raymoe.model.step import build_layout


def test_buckets_are_exact_up_to_16_then_at_most_an_eighth_larger():
    sizes = [shape_buckets.bucket(n) for n in range(1, 5000)]
    assert sizes[:16] == list(range(1, 17))
    assert all(n <= s <= n * 1.125 for n, s in zip(range(1, 5000), sizes))
    assert sizes == sorted(sizes)
    assert all(shape_buckets.bucket(s) == s for s in sizes)  # a bucket is its own bucket
    assert len(set(sizes[:4096])) == 80


def test_only_reduced_precision_on_the_cpu_is_bucketed():
    assert shape_buckets.applies(torch.zeros(1, dtype=torch.bfloat16))
    assert shape_buckets.applies(torch.zeros(1, dtype=torch.float16))
    assert not shape_buckets.applies(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 31, 33, 100, 513])  # up to 32 (bucketed) rows: weights-first
def test_bucketed_linear_gives_each_row_what_an_unpadded_matmul_does(rows, dtype):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 64, dtype=dtype), torch.randn(96, 64, dtype=dtype)
    out = row_stable.linear(x, w)
    assert out.shape == (rows, 96) and out.is_contiguous() and out.dtype == dtype
    assert torch.allclose(out.float(), F.linear(x.float(), w.float()), atol=0.3, rtol=0.02)


def test_padded_experts_match_the_per_expert_loop_in_bfloat16():
    torch.manual_seed(0)
    counts = [17, 20, 19, 23]  # every expert has rows, none more than twice its share: the batched path
    xs = torch.randn(sum(counts), 32, dtype=torch.bfloat16)
    w13, w2 = torch.randn(4, 96, 32, dtype=torch.bfloat16) * 0.2, torch.randn(4, 32, 48, dtype=torch.bfloat16) * 0.2
    start, expected = 0, []
    for e, n in enumerate(counts):
        gate, up = F.linear(xs[start:start + n].float(), w13[e].float()).chunk(2, dim=-1)
        expected.append(F.linear(F.silu(gate) * up, w2[e].float()))
        start += n
    assert torch.allclose(swiglu_grouped(xs, counts, w13, w2).float(), torch.cat(expected), atol=0.1, rtol=0.05)


def test_bucketed_layout_pads_sequences_queries_and_keys_and_skips_them():
    q_lens, cached = [3] * 15 + [5, 2], [30] * 15 + [0, 20]  # 17 sequences, Q 5, L 33
    tables = [[i, 17 + i, 34 + i] for i in range(17)]
    plain = build_layout(q_lens, cached, block_tables=tables, block_size=16)
    padded = build_layout(q_lens, cached, block_tables=tables, block_size=16, bucketed=True)
    [g], [p] = plain.groups, padded.groups
    assert g.mask.shape == (17, 1, 5, 33) and p.mask.shape == (18, 1, 5, 36)
    for field in ("positions", "write_slots", "last_index"):
        assert torch.equal(getattr(plain, field), getattr(padded, field))
    assert padded.unpad_index.shape == plain.unpad_index.shape
    assert not p.mask[:17, :, :, 33:].any()  # padding keys are never attended


def test_bucketed_steps_generate_what_plain_steps_do(model):
    """float32 forced through the bucketed layout: prompt steps are row-stable, so the same tokens
    and (to float32 rounding in the decode kernels) the same logprobs."""
    prompts = [[1] + list(range(40, 40 + n)) for n in (3, 16, 17, 33)] + [[7]] * 14  # 18 sequences
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
    plain = Engine(model, kv_cache_tokens=2048, block_size=4).generate(prompts, params)
    engine = Engine(model, kv_cache_tokens=2048, block_size=4, max_batch_tokens=20)
    engine._bucketed = True
    bucketed = engine.generate(prompts, params)
    for a, b in zip(plain, bucketed):
        assert a.output_ids == b.output_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_a_step_mixing_decodes_and_chunks_attends_in_two_groups_without_padding_decodes():
    q_lens, cached = [1, 1, 40, 1, 7], [9, 30, 0, 2, 16]
    tables = [[5 * s + b for b in range(4)] for s in range(5)]
    layout = build_layout(q_lens, cached, block_tables=tables, block_size=16)
    decodes, chunks = layout.groups
    assert decodes.mask.shape == (3, 1, 1, 31) and chunks.mask.shape == (2, 1, 40, 40)
    single = [build_layout([n], [c], block_tables=[t], block_size=16) for n, c, t in zip(q_lens, cached, tables)]
    assert torch.equal(layout.positions, torch.cat([s.positions for s in single]))
    assert torch.equal(layout.write_slots, torch.cat([s.write_slots for s in single]))
    # each token's output row holds its own query: the row's q_index is the token itself
    q_rows = torch.cat([g.q_index.reshape(-1) for g in layout.groups])
    assert torch.equal(q_rows[layout.unpad_index], torch.arange(sum(q_lens)))
