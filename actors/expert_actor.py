"""The expert actor: one Ray process holding some experts of some layers, computing them on request.

It reads its own experts from the checkpoint path (every node must see the checkpoint at that
path), so weights never pass through the driver or the object store. `forward` is a pure function
of its arguments (no request state), which makes it safe to retry after a restart and lets any
number of callers share the actor. A payload is one numpy byte array (`pack`): it arrives
zero-copy (read-only) and `unpack` views it as tensors without a copy. The same `forward` also answers over the direct
transport (actors/direct.py), on the listener's threads.

Legend: n = distinct tokens sent to this actor, P = (token, expert) pairs routed here, D = hidden.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from model.config import ModelConfig
from model.moe import swiglu_grouped
from model.progress import LoadProgress

from .direct import DirectServer, ExpertsNotLoaded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy for the object store (bfloat16 travels as its int16 bit pattern)."""
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of to_wire, zero-copy; raw bytes (a uint8 array, as sockets deliver) are viewed as
    `dtype`. Arrays from the object store are read-only; callers only read the tensor (gather,
    index_add source), so torch's warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    if t.dtype == torch.uint8 or dtype == torch.bfloat16:
        return t.view(dtype)
    return t


def pack(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """One layer's payload for one actor as a single byte array (one object per call is cheaper
    for Ray to serialise than four): int32 header [n, P] | int32 route [3, P] = (row into x,
    global expert id, router weight's float32 bits) | x [n, D] in the model dtype (4-byte aligned)."""
    n, p = x.shape[0], rows.numel()
    xb = x.detach().contiguous().cpu().view(-1).view(torch.uint8)
    buf = torch.empty(8 + 12 * p + xb.numel(), dtype=torch.uint8)
    head = buf[:8 + 12 * p].view(torch.int32)
    head[0], head[1] = n, p
    route = head[2:].view(3, p)
    route[0], route[1], route[2] = rows, experts, weights.float().view(torch.int32)
    buf[8 + 12 * p:] = xb
    return buf.numpy()


def unpack(payload: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Inverse of pack, zero-copy: x [n, D], rows [P] int32, experts [P] int32, weights [P] float32."""
    buf = from_wire(payload, torch.uint8)
    n, p = buf[:8].view(torch.int32).tolist()
    route = buf[8:8 + 12 * p].view(torch.int32).view(3, p)
    x = buf[8 + 12 * p:].view(dtype).view(n, -1) if n else torch.empty(0, 0, dtype=dtype)
    return x, route[0], route[1], route[2].view(torch.float32)


class ExpertActor:
    """Hosts `experts` (global ids) for each of `layers`; see ExpertPool for how it is started."""

    def __init__(self, checkpoint: str, experts: Sequence[int], layers: Sequence[int], *, dtype: str = "float32",
                 device: str = "cpu", num_threads: int = 1, name: str = "") -> None:
        torch.set_num_threads(max(1, num_threads))  # one process per core share: no oversubscription
        self.name = name
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.experts, self.layers = tuple(experts), tuple(layers)
        self.num_experts = ModelConfig.from_file(Path(checkpoint) / "config.json").num_local_experts
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Weights load on a thread, so that Ray calls (progress, stats) answer while they do; a layer
        # call waits for them, and a checkpoint that cannot be read makes the load FAILED, not the actor.
        self.load = LoadProgress(0, what=name or "experts")
        self._loaded = threading.Event()
        # global expert id → slot in this actor's stacked weights (-1: not hosted here)
        self.slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        self.slot[list(self.experts)] = torch.arange(len(self.experts))
        self.tokens = 0  # (token, expert) pairs computed since this process started
        self.calls = 0
        self.busy_s = 0.0  # time spent inside forward (the rest of a call's latency is transport)
        from ray.util.metrics import Counter, Gauge, Histogram

        from .metrics import LATENCY_BUCKETS

        tags = {"actor": name}
        self.compute_hist = Histogram("raymoe_expert_compute_seconds", "Time an expert actor spends in one "
                                      "layer call", boundaries=LATENCY_BUCKETS, tag_keys=("actor",))
        self.compute_hist.set_default_tags(tags)
        self.pairs_counter = Counter("raymoe_expert_pairs", "(token, expert) pairs computed by an actor",
                                     tag_keys=("actor",))
        self.pairs_counter.set_default_tags(tags)
        load_bytes = Gauge("raymoe_expert_load_bytes", "Bytes of expert weights an actor has read (of "
                           "raymoe_expert_load_total_bytes)", tag_keys=("actor",))
        load_total = Gauge("raymoe_expert_load_total_bytes", "Bytes of expert weights an actor reads at start",
                           tag_keys=("actor",))
        for gauge in (load_bytes, load_total):
            gauge.set_default_tags(tags)
        self._load_total = load_total
        self.load.on_add = lambda p: load_bytes.set(p.bytes_read)


        # Layer calls may also come over a socket (actors/direct.py); Ray still places, names and
        # restarts this actor and hands out the endpoint.
        self.direct = DirectServer(self.forward_timed, host=ray.util.get_node_ip_address())
        threading.Thread(target=self._load_weights, args=(checkpoint,), name="raymoe-expert-load", daemon=True).start()

    def __repr__(self) -> str:  # the Ray dashboard and log prefixes show this
        return f"ExpertActor({self.name})"

    def _load_weights(self, checkpoint: str) -> None:
        """Read this actor's experts (only theirs), straight into the serving dtype, then the device."""
        from model.weights import Checkpoint

        ckpt = None
        try:
            ckpt = Checkpoint(checkpoint)
            self.load.total_bytes = ckpt.expert_nbytes(self.layers, self.experts)
            self._load_total.set(self.load.total_bytes)
            ckpt.progress = self.load
            for layer in self.layers:
                w13, w2 = ckpt.experts(layer, self.experts, self.dtype)
                self.weights[layer] = (w13.to(self.device), w2.to(self.device))
            self.load.done()
        except BaseException as e:  # noqa: BLE001 — reported by progress() and every call
            self.load.done(e)
        finally:
            if ckpt is not None:
                ckpt.close()
            self._loaded.set()

    @ray.method(concurrency_group="control")
    def progress(self) -> dict[str, Any]:
        """How far loading got: state LOADING | READY | FAILED, bytes read of total, seconds."""
        return self.load.snapshot()

    def forward(self, layer: int, payload: np.ndarray) -> np.ndarray:
        """payload (see `pack`) → [n, D] (wire format): per token, the router-weighted sum of its
        experts hosted here."""
        return self.forward_timed(layer, payload)[0]

    def forward_timed(self, layer: int, payload: np.ndarray) -> tuple[np.ndarray, float]:
        """`forward`, and the seconds it took here (the caller's wait minus this is transport)."""
        if not self._loaded.is_set():
            self._loaded.wait()  # the caller's own timeout bounds this (a restarted actor reloads)
        if self.load.state == "FAILED":
            raise ExpertsNotLoaded(f"{self.name}: loading the experts failed: {self.load.error}")
        t0 = time.perf_counter()
        x, rows, experts, weights = unpack(payload, self.dtype)
        out = to_wire(self.compute(layer, x, rows, experts, weights))
        self.tokens += int(rows.shape[0])
        self.calls += 1
        busy = time.perf_counter() - t0
        self.busy_s += busy
        self.compute_hist.observe(busy)
        self.pairs_counter.inc(int(rows.shape[0]))
        return out, busy

    def compute(self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [n, D], rows [P] into x, experts [P] global ids, weights [P] float32 → [n, D] on CPU."""
        if layer not in self.weights:
            raise ValueError(f"{self.name}: layer {layer} is not hosted here (layers {self.layers})")
        w13, w2 = self.weights[layer]
        local = self.slot[experts.long()]  # [P]
        if bool((local < 0).any()):
            raise ValueError(f"{self.name}: experts {sorted(set(experts[local < 0].tolist()))} are not hosted here")
        order = torch.argsort(local, stable=True)  # pairs grouped by expert
        counts = torch.bincount(local, minlength=len(self.experts)).tolist()
        row = rows.long()[order].to(self.device)
        w = weights[order].to(self.device)  # float32, as in model.moe.combine
        xt = x.to(self.device, non_blocking=True)
        out_rows = swiglu_grouped(xt[row], counts, w13, w2)  # one matmul per expert over its rows
        return torch.zeros_like(xt).index_add_(0, row, (out_rows * w[:, None]).to(xt.dtype)).cpu()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property warns about an API it calls internally
            warnings.simplefilter("ignore")
            reconstructed = bool(ctx.was_current_actor_reconstructed)
        weight_bytes = sum(t.numel() * t.element_size() for pair in list(self.weights.values()) for t in pair)
        return {"name": self.name, "experts": list(self.experts), "layers": list(self.layers),
                "weight_bytes": weight_bytes, "tokens": self.tokens, "calls": self.calls, "busy_s": self.busy_s,
                "device": str(self.device), "threads": torch.get_num_threads(), "node_id": ctx.get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid(), "load_s": round(self.load.seconds, 3),
                "state": self.load.state,
                "reconstructed": reconstructed}

    @ray.method(concurrency_group="control")
    def ping(self) -> str:
        return self.name

    @ray.method(concurrency_group="control")
    def direct_endpoint(self) -> tuple[str, int, bytes]:
        """(host, port, token) of this process's direct-transport listener; a restart changes the token."""
        return self.direct.endpoint()

