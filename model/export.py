"""Our parameters → a Hugging Face checkpoint directory (the inverse of model/weights.py's mapping).

Writes config.json (new or old rope style), model.safetensors or shards with an index, and copies
a tokenizer.model; transformers' MixtralForCausalLM loads the result as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .transformer import Mixtral


def hf_state_dict(model: Mixtral) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attn.wqkv.weight.split((q, kv, kv))
        out.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                    p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.attn.wo.weight,
                    p + "input_layernorm.weight": layer.input_layernorm.weight,
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                    p + "block_sparse_moe.gate.weight": layer.moe.gate.weight})
        experts = layer.moe.experts
        for e in range(cfg.num_local_experts):
            w1, w3 = experts.w13[e].chunk(2)
            out.update({f"{p}block_sparse_moe.experts.{e}.w1.weight": w1,
                        f"{p}block_sparse_moe.experts.{e}.w3.weight": w3,
                        f"{p}block_sparse_moe.experts.{e}.w2.weight": experts.w2[e]})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_checkpoint(model: Mixtral, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None,
                    new_style_config: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(new_style=new_style_config,
                                                                      dtype=dtype_name), indent=2) + "\n")
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(out / "model.safetensors"), metadata=meta)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out
