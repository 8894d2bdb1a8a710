"""Model configuration: one dataclass, read from (and written to) a Hugging Face `config.json`.

Both config styles are accepted: older files carry `rope_theta` (and `rope_scaling`) at the top
level, newer ones carry `rope_parameters: {"rope_type": "default", "rope_theta": ...}`. Anything
we cannot run faithfully (another rope type, another activation) is rejected with the field named.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json we cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int = 0  # 0 → hidden_size // num_attention_heads (resolved in __post_init__)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    torch_dtype: str = "float32"  # the weights' own dtype (config.json torch_dtype / dtype; absent → float32)

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads when head_dim is absent")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        checks = [
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (1 <= self.num_experts_per_tok <= self.num_local_experts,
             "num_experts_per_tok must be between 1 and num_local_experts"),
            (self.head_dim % 2 == 0, "head_dim must be even (rotary embedding)"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def num_parameters(self) -> int:
        """For reports (the demo's summary, the benchmarks)."""
        d, f, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        attn = d * self.num_attention_heads * self.head_dim * 2 + d * self.num_key_value_heads * self.head_dim * 2
        per_layer = attn + e * 3 * d * f + e * d + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + d

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        if raw.get("model_type") != "mixtral":
            raise ConfigError(f"config.json: model_type is {raw.get('model_type')!r}; raymoe serves 'mixtral'")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ConfigError(f"config.json: missing required field(s) {', '.join(missing)}")
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            num_local_experts=int(raw.get("num_local_experts", 8)),
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
            head_dim=int(raw.get("head_dim") or 0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=None if raw.get("sliding_window") is None else int(raw["sliding_window"]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            torch_dtype=_dtype_name(raw.get("dtype", raw.get("torch_dtype"))),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw)

    def to_hf_dict(self, *, new_style: bool = True, dtype: str = "float32") -> dict[str, Any]:
        """A config.json that transformers' MixtralForCausalLM loads (new or old rope style)."""
        out: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "torch_dtype": dtype,
        }
        if new_style:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None
        return out


SERVED_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *SERVED_DTYPES)  # what --dtype and ServeSettings.dtype take (auto: resolve_dtype)
# how experts may be stored (model/quant.py): int8 weight-only per output channel, vLLM's name
QUANTIZATIONS = ("experts_int8",)


def check_quantization(name: str | None) -> str | None:
    """None (or "" / "none") for unquantized, else a known name; anything else is a ValueError.
    Here, beside the names, so that the settings check it without importing torch (CLI start-up)."""
    if name in (None, "", "none"):
        return None
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {name!r})")
    return name


def _dtype_name(value: Any) -> str:
    """config.json's dtype ("bfloat16", "torch.bfloat16", absent) as one of SERVED_DTYPES; anything
    else (absent, "auto", a quantised type) serves in float32, as transformers loads it by default."""
    name = str(value or "float32").removeprefix("torch.")
    return name if name in SERVED_DTYPES else "float32"


def resolve_dtype(requested: str, cfg: ModelConfig, device: str | None = None) -> str:
    """The dtype to serve in: `requested`, or for "auto" the checkpoint's own, except that on a CPU
    (device "cpu") whose matmuls in that dtype are slow (no AVX-512/AMX on x86: torch then falls back
    to a loop ~100x slower than float32) "auto" computes in float32, as vLLM's CPU backend does."""
    if requested == "auto":
        if device == "cpu" and cfg.torch_dtype != "float32" and not cpu_matmul_is_fast(cfg.torch_dtype):
            logging.getLogger("raymoe").warning(
                "this CPU has no fast %s matmul: serving in float32 (--dtype %s forces it)",
                cfg.torch_dtype, cfg.torch_dtype)
            return "float32"
        return cfg.torch_dtype
    if requested not in SERVED_DTYPES:
        raise ConfigError(f"dtype must be auto or one of {', '.join(SERVED_DTYPES)} (got {requested!r})")
    return requested


@functools.cache
def cpu_matmul_is_fast(dtype: str) -> bool:
    """Whether this CPU multiplies in `dtype` at least a quarter as fast as in float32 (measured
    once per process on a small matmul; the slow fallback is ~100x, a fast kernel ~0.5-2x)."""
    import torch

    def seconds(dt) -> float:  # the fastest of five runs on one thread (this machine may be busy)
        a, b = torch.randn(16, 256, dtype=dt), torch.randn(256, 512, dtype=dt)
        a @ b  # warm-up (kernel selection)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return seconds(getattr(torch, dtype)) < 4 * seconds(torch.float32) + 1e-4
    finally:
        torch.set_num_threads(threads)


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None:
        field, spec = "rope_parameters", params
    elif scaling is not None:
        field, spec = "rope_scaling", scaling
    else:
        return float(raw.get("rope_theta", 1e6))
    if not isinstance(spec, dict):
        raise ConfigError(f"config.json: {field} must be an object")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"config.json: {field}.rope_type {kind!r} is not supported (only 'default')")
    return float(spec.get("rope_theta", raw.get("rope_theta", 1e6)))
