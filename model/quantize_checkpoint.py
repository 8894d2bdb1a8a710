"""`raymoe quantize`: a checkpoint → the same checkpoint with int8 experts, loadable without re-quantizing.

The layout is compressed-tensors' int8 weight-only ("W8A16") as vLLM reads it: per expert linear
`weight_packed` (int32 [N, K/4]: the int8 values offset by 128 to unsigned, four per int32,
little-endian along K), `weight_scale` ([N, 1], one scale per output channel, in the checkpoint's
dtype) and `weight_shape` ([N, K]); config.json's `quantization_config` names the scheme
(pack-quantized, num_bits 8, symmetric, strategy channel, no activation quantization) and ignores
everything but the experts. Attention, router, norms, embeddings and lm_head are copied as they are.

Files are written as they are produced (one shard for the dense part, one per layer's experts), one
expert at a time, so the tool needs memory for one expert, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import resolve_dtype
from .progress import LoadProgress
from .safetensors_file import DTYPES
from .weights import Checkpoint, CheckpointError

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                    "dynamic": False, "actorder": None, "observer": "minmax"},
        "input_activations": None, "output_activations": None}},
    # everything but the experts' w1/w2/w3 stays in the checkpoint's dtype
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*block_sparse_moe\\.gate$"],
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COPIED = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json")

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def write_safetensors(path: Path, entries: list[Entry], tensors: Iterator[torch.Tensor]) -> int:
    """Write a safetensors file whose header is known up front, taking the tensors one at a time in
    the order of `entries` (so only one is in memory). Returns the bytes of tensor data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)  # a file under its name is always complete
    return offset


def quantize_checkpoint(src: str | Path, out: str | Path,
                        on_progress: Callable[[LoadProgress], None] | None = None) -> Path:
    """Write `src` with int8 experts to `out` (a new or empty directory)."""
    out = Path(out)
    ckpt = Checkpoint(src)
    try:
        if ckpt.quantization:
            raise CheckpointError(f"{ckpt.dir}: already quantized ({ckpt.quantization})")
        c = ckpt.config
        if c.hidden_size % 4 or c.intermediate_size % 4:
            raise CheckpointError("pack-quantized int8 needs hidden and intermediate sizes divisible by 4")
        if out.exists() and any(out.iterdir()):
            raise CheckpointError(f"{out}: exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, resolve_dtype("auto", c))  # scales in the checkpoint's own dtype
        progress = LoadProgress(ckpt.dense_nbytes() + ckpt.expert_nbytes(range(c.num_hidden_layers),
                                                                          range(c.num_local_experts)), what="quantize")
        ckpt.progress = progress
        shards = 1 + c.num_hidden_layers
        weight_map: dict[str, str] = {}
        total = 0

        def shard_name(i: int) -> str:
            return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"

        dense = [(name, *ckpt.info(name)[:2]) for name in ckpt.dense_names()]
        total += write_safetensors(out / shard_name(0), dense,
                                   (ckpt.tensor(name, shape, dt) for name, dt, shape in dense))
        weight_map.update({name: shard_name(0) for name, _, _ in dense})
        for layer in range(c.num_hidden_layers):
            entries, produce = _layer_experts(ckpt, layer, dtype)
            total += write_safetensors(out / shard_name(1 + layer), entries, produce())
            weight_map.update({name: shard_name(1 + layer) for name, _, _ in entries})
            if on_progress is not None:
                on_progress(progress)
        progress.done()
        if on_progress is not None:
            on_progress(progress)
        config = json.loads((ckpt.dir / "config.json").read_text())
        config["quantization_config"] = QUANTIZATION_CONFIG
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        for name in COPIED:
            if (ckpt.dir / name).exists():
                shutil.copyfile(ckpt.dir / name, out / name)
        return out
    finally:
        ckpt.close()


def _layer_experts(ckpt: Checkpoint, layer: int, dtype: torch.dtype):
    """Header entries and a generator of one layer's quantized expert tensors, one expert read at a time."""
    c = ckpt.config
    d, f = c.hidden_size, c.intermediate_size
    prefix = f"model.layers.{layer}.block_sparse_moe.experts."
    shapes = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
    entries: list[Entry] = []
    for e in range(c.num_local_experts):
        for w, (n, k) in shapes.items():
            p = f"{prefix}{e}.{w}."
            entries += [(p + "weight_packed", torch.int32, (n, k // 4)), (p + "weight_scale", dtype, (n, 1)),
                        (p + "weight_shape", torch.int64, (2,))]

    def produce() -> Iterator[torch.Tensor]:
        for e in range(c.num_local_experts):
            w13, w2 = ckpt.experts(layer, [e], dtype, "experts_int8")
            for q, scale in ((w13.q[0, :f], w13.scale[0, :f]), (w13.q[0, f:], w13.scale[0, f:]), (w2.q[0], w2.scale[0])):
                yield (q ^ -128).view(torch.int32)  # q + 128 as unsigned bytes, four per int32
                yield scale.reshape(-1, 1)
                yield torch.tensor(list(q.shape), dtype=torch.int64)

    return entries, produce
