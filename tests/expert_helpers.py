"""Helpers shared by the expert-actor tests (single-node and multi-node): a lively tiny checkpoint,
the in-process reference generation, and the comparison rule (same greedy tokens, fp32 logprobs
within 1e-5)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from raymoe.model.engine import Engine
from raymoe.model.export import save_checkpoint
from raymoe.model.presets import PRESETS, random_model
from raymoe.model.sampling import SamplingParams
from raymoe.model.weights import load_model

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters: no token auth

PROMPTS = [[1, 17, 42, 99, 7, 300, 12], [1, 5], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 5]]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
LOGPROB_ATOL = 1e-5


def write_checkpoint(directory: Path, seed: int = 3) -> Path:
    """The tiny shape (8 experts, top-2, 2 layers) with std 0.15 weights: varied greedy continuations."""
    return save_checkpoint(random_model(PRESETS["tiny"], seed, std=0.15), directory)


def generate(model, prompts=PROMPTS, params=PARAMS, **engine_kwargs) -> list[tuple[list[int], list[float]]]:
    seqs = Engine(model, kv_cache_tokens=1024, **engine_kwargs).generate(prompts, params)
    return [(s.output_ids, s.logprobs) for s in seqs]


def reference(checkpoint: Path, prompts=PROMPTS, params=PARAMS):
    return generate(load_model(checkpoint), prompts, params)


def assert_same_generation(got, want) -> None:
    assert len(got) == len(want)
    for (ids, lps), (ref_ids, ref_lps) in zip(got, want):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=LOGPROB_ATOL, rtol=0)
