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
from .moe import Int8LocalExperts
from .progress import LoadProgress
from .quant import Int8Stack, check_quantization, quantize_rows_into
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
        # "experts_int8" when the file holds int8 experts (written by `raymoe quantize`): implied
        self.quantization = prequantized(json.loads((self.dir / "config.json").read_text()), self.dir)
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
        """Bytes of these experts' tensors in the files (what loading them reads)."""
        ids = list(expert_ids)
        parts = (".weight_packed", ".weight_scale") if self.quantization else (".weight",)
        return sum(self.nbytes(f"{self._moe_prefix(layer)}experts.{e}.{w}{part}")
                   for layer in layers for e in ids for w in ("w1", "w2", "w3") for part in parts)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(dtype, shape, bytes) of a tensor in its file, from the header."""
        self.nbytes(name)  # the same checks and errors
        return self._handle(self._files[name]).info(name)

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

    def experts(self, layer: int, expert_ids: Iterable[int], dtype: torch.dtype, quantization: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[Int8Stack, Int8Stack]:
        """The chosen experts of one layer as (w13 [n, 2F, D], w2 [n, D, F]); no other expert is read.
        With quantization "experts_int8" (or a pre-quantized checkpoint) they are Int8Stacks whose
        scales are in `dtype`, quantized tensor by tensor as they are read."""
        if check_quantization(quantization) or self.quantization:
            return self._experts_int8(layer, list(expert_ids), dtype)
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        prefix = self._moe_prefix(layer) + "experts."
        ids = list(expert_ids)
        self._check_ids(ids)
        w13 = torch.empty(len(ids), 2 * f, d, dtype=dtype)  # filled in place: one copy of the weights
        w2 = torch.empty(len(ids), d, f, dtype=dtype)
        for i, e in enumerate(ids):
            p = f"{prefix}{e}."
            self.tensor(p + "w1.weight", (f, d), dtype, out=w13[i, :f])
            self.tensor(p + "w3.weight", (f, d), dtype, out=w13[i, f:])
            self.tensor(p + "w2.weight", (d, f), dtype, out=w2[i])
        return w13, w2

    def _experts_int8(self, layer: int, ids: list[int], dtype: torch.dtype) -> tuple[Int8Stack, Int8Stack]:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        self._check_ids(ids)
        w13, w2 = (Int8Stack(torch.empty(len(ids), 2 * f, d, dtype=torch.int8), torch.empty(len(ids), 2 * f, dtype=dtype)),
                   Int8Stack(torch.empty(len(ids), d, f, dtype=torch.int8), torch.empty(len(ids), d, dtype=dtype)))
        buffers: dict[tuple, torch.Tensor] = {}  # one reused read buffer per (dtype, shape): never a whole share
        for i, e in enumerate(ids):
            p = f"{self._moe_prefix(layer)}experts.{e}."
            for name, q, scale in ((p + "w1", w13.q[i, :f], w13.scale[i, :f]), (p + "w3", w13.q[i, f:], w13.scale[i, f:]),
                                   (p + "w2", w2.q[i], w2.scale[i])):
                self._read_int8(name, q, scale, buffers)
        return w13, w2

    def _read_int8(self, name: str, q: torch.Tensor, scale: torch.Tensor, buffers: dict[tuple, torch.Tensor]) -> None:
        """One expert tensor into q [N, K] int8 and scale [N]: read as stored when pre-quantized,
        else read into a reused buffer in the file's dtype and quantized from there."""
        n, k = q.shape
        if self.quantization:
            self.tensor(name + ".weight_packed", (n, k // 4), torch.int32, out=q.view(torch.int32))
            q.bitwise_xor_(-128)  # stored as q + 128, four per int32 (compressed-tensors' unsigned packing)
            self.tensor(name + ".weight_scale", (n, 1), scale.dtype, out=scale.view(n, 1))
            return
        file_dtype = self.info(name + ".weight")[0]
        key = (file_dtype, n, k)
        if key not in buffers:
            buffers[key] = torch.empty(n, k, dtype=file_dtype)
        quantize_rows_into(self.tensor(name + ".weight", (n, k), file_dtype, out=buffers[key]), q, scale)

    def _check_ids(self, ids: list[int]) -> None:
        bad = [e for e in ids if not 0 <= e < self.config.num_local_experts]
        if bad:
            raise CheckpointError(f"expert {bad[0]} does not exist (the model has {self.config.num_local_experts})")

    def _moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe."


def prequantized(config: dict, where: Path) -> str | None:
    """The quantization a checkpoint's config.json says its experts are stored in: "experts_int8" for
    compressed-tensors' int8 per-channel symmetric weights (pack-quantized, as `raymoe quantize` writes
    them), None without a quantization_config; any other scheme is a CheckpointError."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    try:
        groups = list(qc["config_groups"].values())
        w = groups[0]["weights"]
        ok = (qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" and len(groups) == 1
              and w["num_bits"] == 8 and w["type"] == "int" and w["symmetric"] and w["strategy"] == "channel"
              and not groups[0].get("input_activations"))
    except (KeyError, TypeError, AttributeError, IndexError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: quantization_config is not one raymoe reads (it reads compressed-tensors "
                              f"pack-quantized int8 per-channel symmetric weights, as `raymoe quantize` writes)")
    return "experts_int8"


def load_model(directory: str | Path | Checkpoint, *, dtype: torch.dtype = torch.float32,
               experts_factory: ExpertsFactory | None = None, device: str = "cpu",
               progress: LoadProgress | None = None, quantization: str | None = None) -> Mixtral:
    """Build a Mixtral from a checkpoint. Without a factory all experts load locally (as int8 with
    quantization "experts_int8", implied by a pre-quantized checkpoint); with one, the factory
    supplies each layer's experts (e.g. remote) and only the dense part is read here.
    `progress` (its total set here) counts the bytes as they are read."""
    owned = not isinstance(directory, Checkpoint)
    ckpt = Checkpoint(directory) if owned else directory
    try:
        return _load(ckpt, dtype, experts_factory, device, progress, check_quantization(quantization))
    finally:
        if owned:
            ckpt.close()


def _load(ckpt: Checkpoint, dtype: torch.dtype, experts_factory: ExpertsFactory | None, device: str,
          progress: LoadProgress | None, quantization: str | None) -> Mixtral:
    cfg = ckpt.config
    int8 = experts_factory is None and bool(quantization or ckpt.quantization)
    if int8:
        experts_factory = lambda layer: Int8LocalExperts(  # noqa: E731 — filled from the state below
            cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, dtype)
    if progress is not None:
        progress.total_bytes = ckpt.dense_nbytes() + (0 if experts_factory is not None and not int8 else ckpt.expert_nbytes(
            range(cfg.num_hidden_layers), range(cfg.num_local_experts)))
        ckpt.progress = progress
    with torch.device("meta"):  # no memory: the loaded tensors become the parameters (assign)
        model = Mixtral(cfg, experts_factory)
    state = ckpt.dense_state(dtype)
    every = range(cfg.num_local_experts)
    for i in range(cfg.num_hidden_layers if experts_factory is None or int8 else 0):
        w13, w2 = ckpt.experts(i, every, dtype, quantization)
        names = {"w13": w13, "w2": w2} if not int8 else \
            {"w13_q": w13.q, "w13_scale": w13.scale, "w2_q": w2.q, "w2_scale": w2.scale}
        state.update({f"layers.{i}.moe.experts.{k}": v for k, v in names.items()})
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
