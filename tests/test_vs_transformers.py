"""Our Mixtral against Hugging Face `transformers.MixtralForCausalLM`, the independent reference.

Checkpoints are written by transformers itself (`save_pretrained`, which stores the per-expert
`block_sparse_moe.experts.E.w1/w2/w3` names), over expert counts, top-k, GQA ratios, explicit
head_dim, sliding windows shorter than the prompt, tied embeddings, both config.json rope styles,
sharded and single-file. We compare every position's logits (fp32, 1e-4) and 32 greedy tokens.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM  # noqa: E402

from raymoe.model.engine import Engine  # noqa: E402
from raymoe.model.presets import PRESETS, init_checkpoint, random_model  # noqa: E402
from raymoe.model.sampling import SamplingParams  # noqa: E402
from raymoe.model.weights import load_model  # noqa: E402

VOCAB, PROMPT_LEN, NEW_TOKENS, ATOL = 128, 20, 32, 1e-4


@dataclasses.dataclass(frozen=True)
class Shape:
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int | None = None  # None: hidden // heads
    sliding_window: int | None = None
    tie: bool = False
    theta: float = 1e6
    old_config: bool = False  # rewrite config.json with a top-level rope_theta
    shard: str | None = None  # max_shard_size for save_pretrained


SHAPES = {
    "e4-top1-mha-single": Shape(4, 1, 4, 4),
    "e8-top2-gqa4-headdim12-old-sharded": Shape(8, 2, 8, 2, head_dim=12, theta=1e4, old_config=True,
                                                shard="20KB"),
    "e6-top3-gqa2-window8-tied-sharded": Shape(6, 3, 4, 2, sliding_window=8, tie=True, theta=500.0,
                                               shard="30KB"),
    "e4-top2-mqa-headdim16-window8-tied-old": Shape(4, 2, 4, 1, head_dim=16, sliding_window=8, tie=True,
                                                    theta=1e4, old_config=True),
    "e8-top2-gqa2-old-sharded": Shape(8, 2, 4, 2, theta=2e3, old_config=True, shard="40KB"),
}


def hf_model(shape: Shape, seed: int) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k, max_position_embeddings=256,
        sliding_window=shape.sliding_window, tie_word_embeddings=shape.tie,
        rope_parameters={"rope_type": "default", "rope_theta": shape.theta},
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    # HF's own init (std 0.02, unit norms) gives near-constant greedy output; use livelier weights and
    # non-unit norm scales, so that a swapped or missing norm weight changes the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def write_old_style(directory, theta: float) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = theta
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from HF's checkpoint, shape)."""
    shape = SHAPES[request.param]
    seed = list(SHAPES).index(request.param)
    hf = hf_model(shape, seed)
    out = tmp_path_factory.mktemp("hf") / request.param
    hf.save_pretrained(out, max_shard_size=shape.shard or "1GB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if shape.shard:
        assert len(shards) > 2 and (out / "model.safetensors.index.json").exists(), shards
    else:
        assert shards == ["model.safetensors"]
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) if shape.shard else None
    if names is not None:  # the format this test is about: legacy per-expert tensors
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names
    if shape.old_config:
        write_old_style(out, shape.theta)
    return hf, load_model(out), shape


def prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def hf_greedy(hf: MixtralForCausalLM, ids: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # like ignore_eos: the model's default would stop at token 2
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), generation_config=gc, attention_mask=torch.ones(1, len(ids),
                                                                                                dtype=torch.long))
    new = out[0, len(ids):].tolist()
    assert len(new) == n, "transformers stopped early; the comparison needs exactly n tokens"
    return new


def test_config_read(pair):
    hf, ours, shape = pair
    c = ours.cfg
    assert (c.num_local_experts, c.num_experts_per_tok) == (shape.experts, shape.top_k)
    assert (c.num_attention_heads, c.num_key_value_heads) == (shape.heads, shape.kv_heads)
    assert c.head_dim == hf.model.layers[0].self_attn.head_dim == (shape.head_dim or 32 // shape.heads)
    assert c.rope_theta == pytest.approx(shape.theta)
    assert c.sliding_window == shape.sliding_window and c.tie_word_embeddings == shape.tie
    if shape.tie:
        assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()


def test_logits_match(pair, ref):
    hf, ours, shape = pair
    ids = prompt(0)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = ref.full_logits(ours, ids)
    assert expected.std() > 0.5  # not a degenerate model
    assert torch.allclose(got[-1], expected[-1], atol=ATOL, rtol=0), (got[-1] - expected[-1]).abs().max()
    # every position, including those past the sliding window
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


def test_greedy_continuation_matches(pair):
    hf, ours, shape = pair
    prompts = [prompt(1), prompt(2, 7)]
    engine = Engine(ours, kv_cache_tokens=256, block_size=8)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, seq in zip(prompts, seqs):
        expected = hf_greedy(hf, p, NEW_TOKENS)
        assert seq.output_ids == expected
        assert seq.finish_reason == "length"
    assert len(set(seqs[0].output_ids)) > 3  # a varied continuation, not one repeated token


def test_new_and_old_style_configs_give_the_same_model(pair, tmp_path):
    """The other config style, written over a copy of the checkpoint, loads to identical weights."""
    hf, ours, shape = pair
    out = tmp_path / "other"
    hf.save_pretrained(out)
    if not shape.old_config:
        write_old_style(out, shape.theta)
    other = load_model(out)
    assert other.cfg == ours.cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("new_style,shard_bytes", [(True, None), (False, 400_000)], ids=["new-single", "old-sharded"])
def test_our_export_loads_in_transformers(tmp_path, new_style, shard_bytes, ref):
    out = init_checkpoint("tiny", tmp_path / "tiny", seed=3, new_style_config=new_style,
                          max_shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes is not None)
    ours = load_model(out)
    hf, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.rope_parameters["rope_theta"] == pytest.approx(ours.cfg.rope_theta)
    ids = [1] + prompt(3, 15)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ref.full_logits(ours, ids), expected, atol=ATOL, rtol=0)
    in_memory = random_model(PRESETS["tiny"], seed=3)  # what init_checkpoint exported
    assert torch.allclose(ref.full_logits(in_memory, ids), expected, atol=ATOL, rtol=0)
    [seq] = Engine(ours, kv_cache_tokens=64).generate([ids], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert seq.output_ids == hf_greedy(hf, ids, NEW_TOKENS)
