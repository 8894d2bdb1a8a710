"""Checkpoint → parameters: one mapping from Hugging Face tensor names to ours, for every process.

Reads safetensors only (a single `model.safetensors`, or shards listed in
`model.safetensors.index.json`), never pickle. Tensors are read one by one by name, so a caller
that asks for some experts opens only the files holding them and reads only their bytes; the
dense (non-expert) part can be loaded alone. Every read is recorded in `Checkpoint.reads`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .config import ModelConfig
from .transformer import ExpertsFactory, Mixtral

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file or tensor."""


class Checkpoint:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: checkpoint directory not found")
        self.config = ModelConfig.from_file(self.dir / "config.json")
        self.reads: list[str] = []
        self._handles: dict[str, object] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                self._files = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map; {e!r})") from None
        elif single.exists():  # opened through _handle, so a corrupt file is a CheckpointError
            self._files = {name: single.name for name in self._handle(single.name).keys()}
        else:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" \
                if pickles else ""
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")

    def has(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self._files:
            raise CheckpointError(f"{self.dir}: missing tensor {name}")
        try:
            t = self._handle(self._files[name]).get_tensor(name)
        except Exception as e:  # listed in the index but absent from (or unreadable in) its shard
            raise CheckpointError(f"{self.dir}: cannot read tensor {name} from {self._files[name]} ({e})") from None
        self.reads.append(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.dir}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(dtype)

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = self.dir / filename
            if not path.exists():
                raise CheckpointError(f"{self.dir}: shard {filename} listed in the index is missing")
            try:
                self._handles[filename] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[filename]

    # --- the name mapping -------------------------------------------------------------------

    def dense_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every non-expert parameter, under our names."""
        c = self.config
        d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        state = {"embed_tokens.weight": self.tensor("model.embed_tokens.weight", (c.vocab_size, d), dtype),
                 "norm.weight": self.tensor("model.norm.weight", (d,), dtype)}
        if not c.tie_word_embeddings:
            state["lm_head.weight"] = self.tensor("lm_head.weight", (c.vocab_size, d), dtype)
        for i in range(c.num_hidden_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            attn = hf + "self_attn."
            state[ours + "attn.wqkv.weight"] = torch.cat([
                self.tensor(attn + "q_proj.weight", (q, d), dtype),
                self.tensor(attn + "k_proj.weight", (kv, d), dtype),
                self.tensor(attn + "v_proj.weight", (kv, d), dtype)])
            state[ours + "attn.wo.weight"] = self.tensor(attn + "o_proj.weight", (d, q), dtype)
            state[ours + "input_layernorm.weight"] = self.tensor(hf + "input_layernorm.weight", (d,), dtype)
            state[ours + "post_attention_layernorm.weight"] = self.tensor(
                hf + "post_attention_layernorm.weight", (d,), dtype)
            state[ours + "moe.gate.weight"] = self.tensor(
                self._moe_prefix(i) + "gate.weight", (c.num_local_experts, d), dtype)
        return state

    def experts(self, layer: int, expert_ids: Iterable[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen experts of one layer as (w13 [n, 2F, D], w2 [n, D, F]); no other expert is read."""
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        prefix = self._moe_prefix(layer) + "experts."
        w13, w2 = [], []
        for e in expert_ids:
            if not 0 <= e < c.num_local_experts:
                raise CheckpointError(f"expert {e} does not exist (the model has {c.num_local_experts})")
            p = f"{prefix}{e}."
            w13.append(torch.cat([self.tensor(p + "w1.weight", (f, d), dtype),
                                  self.tensor(p + "w3.weight", (f, d), dtype)]))
            w2.append(self.tensor(p + "w2.weight", (d, f), dtype))
        return torch.stack(w13), torch.stack(w2)

    def _moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe."


def load_model(directory: str | Path | Checkpoint, *, dtype: torch.dtype = torch.float32,
               experts_factory: ExpertsFactory | None = None, device: str = "cpu") -> Mixtral:
    """Build a Mixtral from a checkpoint. Without a factory all experts load locally; with one, the
    factory supplies each layer's experts (e.g. remote) and only the dense part is read here."""
    ckpt = directory if isinstance(directory, Checkpoint) else Checkpoint(directory)
    cfg = ckpt.config
    with torch.device("meta"):
        model = Mixtral(cfg, experts_factory)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # materialising from meta unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    state = ckpt.dense_state(dtype)
    if experts_factory is None:
        every = range(cfg.num_local_experts)
        for i in range(cfg.num_hidden_layers):
            state[f"layers.{i}.moe.experts.w13"], state[f"layers.{i}.moe.experts.w2"] = ckpt.experts(i, every, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:  # a bug in the mapping, not in the checkpoint
        raise RuntimeError(f"name mapping out of date: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)
