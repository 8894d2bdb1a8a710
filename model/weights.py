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

from .config import ModelConfig
from .progress import LoadProgress
from .safetensors_file import SafetensorsError, SafetensorsFile
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
        self.progress: LoadProgress | None = None  # counts the bytes of every tensor read
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

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, in `dtype` (no copy when the file has it), or copied into `out` (no other copy
        is kept: loading stays near the size of what is loaded)."""
        if name not in self._files:
            raise CheckpointError(f"{self.dir}: missing tensor {name}")
        f = self._handle(self._files[name])
        if name not in f.tensors:  # listed in the index but absent from its shard
            raise CheckpointError(f"{self.dir}: cannot read tensor {name} from {self._files[name]} (not in that file)")
        file_dtype, file_shape, nbytes = f.info(name)
        if tuple(file_shape) != tuple(shape):
            raise CheckpointError(f"{self.dir}: tensor {name} has shape {tuple(file_shape)}, expected {tuple(shape)}")
        direct = out is not None and out.dtype == file_dtype and out.is_contiguous() and out.device.type == "cpu"
        try:
            t = f.read(name, out if direct else None)
        except (OSError, SafetensorsError) as e:
            raise CheckpointError(f"{self.dir}: cannot read tensor {name} from {self._files[name]} ({e})") from None
        self.reads.append(name)
        if self.progress is not None:
            self.progress.add(nbytes)
        if out is not None:
            return t if direct else out.copy_(t)
        return t.to(dtype)

    def nbytes(self, name: str) -> int:
        """Bytes of a tensor in its file, from the header (nothing is read)."""
        if name not in self._files:
            raise CheckpointError(f"{self.dir}: missing tensor {name}")
        f = self._handle(self._files[name])
        if name not in f.tensors:
            raise CheckpointError(f"{self.dir}: cannot read tensor {name} from {self._files[name]} (not in that file)")
        return f.info(name)[2]

    def expert_nbytes(self, layers: Iterable[int], expert_ids: Iterable[int]) -> int:
        ids = list(expert_ids)
        return sum(self.nbytes(f"{self._moe_prefix(layer)}experts.{e}.{w}.weight")
                   for layer in layers for e in ids for w in ("w1", "w2", "w3"))

    def dense_names(self) -> list[str]:
        """The checkpoint's names of what dense_state reads (not a tied lm_head a file may still
        hold, nor leftovers such as rotary inv_freq buffers)."""
        c = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
        for i in range(c.num_hidden_layers):
            attn = f"model.layers.{i}.self_attn."
            names += [attn + f"{w}_proj.weight" for w in "qkvo"]
            names += [f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
            names.append(self._moe_prefix(i) + "gate.weight")
        return names

    def dense_nbytes(self) -> int:
        return sum(self.nbytes(name) for name in self.dense_names())

    def close(self) -> None:
        """Close the files opened so far (a Checkpoint reopens them if it is used again)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = self.dir / filename
            if not path.exists():
                raise CheckpointError(f"{self.dir}: shard {filename} listed in the index is missing")
            try:
                self._handles[filename] = SafetensorsFile(path)
            except (OSError, SafetensorsError) as e:
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
            wqkv = torch.empty(q + 2 * kv, d, dtype=dtype)  # q, k, v read straight into the fused weight
            self.tensor(attn + "q_proj.weight", (q, d), dtype, out=wqkv[:q])
            self.tensor(attn + "k_proj.weight", (kv, d), dtype, out=wqkv[q:q + kv])
            self.tensor(attn + "v_proj.weight", (kv, d), dtype, out=wqkv[q + kv:])
            state[ours + "attn.wqkv.weight"] = wqkv
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
        ids = list(expert_ids)
        bad = [e for e in ids if not 0 <= e < c.num_local_experts]
        if bad:
            raise CheckpointError(f"expert {bad[0]} does not exist (the model has {c.num_local_experts})")
        w13 = torch.empty(len(ids), 2 * f, d, dtype=dtype)  # filled in place: one copy of the weights
        w2 = torch.empty(len(ids), d, f, dtype=dtype)
        for i, e in enumerate(ids):
            p = f"{prefix}{e}."
            self.tensor(p + "w1.weight", (f, d), dtype, out=w13[i, :f])
            self.tensor(p + "w3.weight", (f, d), dtype, out=w13[i, f:])
            self.tensor(p + "w2.weight", (d, f), dtype, out=w2[i])
        return w13, w2

    def _moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe."


def load_model(directory: str | Path | Checkpoint, *, dtype: torch.dtype = torch.float32,
               experts_factory: ExpertsFactory | None = None, device: str = "cpu",
               progress: LoadProgress | None = None) -> Mixtral:
    """Build a Mixtral from a checkpoint. Without a factory all experts load locally; with one, the
    factory supplies each layer's experts (e.g. remote) and only the dense part is read here.
    `progress` (its total set here) counts the bytes as they are read."""
    owned = not isinstance(directory, Checkpoint)
    ckpt = Checkpoint(directory) if owned else directory
    try:
        return _load(ckpt, dtype, experts_factory, device, progress)
    finally:
        if owned:
            ckpt.close()


def _load(ckpt: Checkpoint, dtype: torch.dtype, experts_factory: ExpertsFactory | None, device: str,
          progress: LoadProgress | None) -> Mixtral:
    cfg = ckpt.config
    if progress is not None:
        progress.total_bytes = ckpt.dense_nbytes() + (0 if experts_factory is not None else ckpt.expert_nbytes(
            range(cfg.num_hidden_layers), range(cfg.num_local_experts)))
        ckpt.progress = progress
    with torch.device("meta"):  # no memory: the loaded tensors become the parameters (assign)
        model = Mixtral(cfg, experts_factory)
    state = ckpt.dense_state(dtype)
    if experts_factory is None:
        every = range(cfg.num_local_experts)
        for i in range(cfg.num_hidden_layers):
            state[f"layers.{i}.moe.experts.w13"], state[f"layers.{i}.moe.experts.w2"] = ckpt.experts(i, every, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:  # a bug in the mapping, not in the checkpoint
        raise RuntimeError(f"name mapping out of date: missing {missing}, unexpected {unexpected}")
    model = model.to(device)
    if progress is not None:
        progress.done()
    return model.eval().requires_grad_(False)
