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

import concurrent.futures
import json
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
from ray.experimental.internal_kv import (_internal_kv_del, _internal_kv_get, _internal_kv_initialized,
                                         _internal_kv_put)
from ray.util.metrics import Counter, Gauge, Histogram

from raymoe.model.config import ModelConfig
from raymoe.model.moe import swiglu_grouped
from raymoe.model.progress import LoadProgress
from raymoe.model.quant import check_quantization, stack_experts, weight_nbytes
from raymoe.model.torch_threads import on_passing_thread
from raymoe.model.weights import Checkpoint

from .direct import DirectServer, ExpertsNotLoaded
from .metrics import LATENCY_BUCKETS

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


def _as_numpy(a, dtype) -> np.ndarray:
    """An array or a tensor (any device or dtype) as a numpy array of `dtype`."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = (a.float() if a.is_floating_point() else a).numpy()
    return np.asarray(a, dtype=dtype)


def pack(x: torch.Tensor, rows, experts, weights) -> np.ndarray:
    """One layer's payload for one actor as a single byte array (one object per call is cheaper
    for Ray to serialise than four): int32 header [n, P] | int32 route [3, P] = (row into x,
    global expert id, router weight's float32 bits) | x [n, D] in the model dtype (4-byte aligned).
    rows, experts and weights: numpy arrays or CPU tensors (built in numpy: a torch op on a few
    dozen elements costs 5-10x a numpy one)."""
    n, p = x.shape[0], len(rows)
    xb = x.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
    buf = np.empty(8 + 12 * p + xb.size, dtype=np.uint8)
    head = buf[:8 + 12 * p].view(np.int32)
    head[0], head[1] = n, p
    route = head[2:].reshape(3, p)
    route[0], route[1] = _as_numpy(rows, np.int32), _as_numpy(experts, np.int32)
    route[2] = _as_numpy(weights, np.float32).view(np.int32)
    buf[8 + 12 * p:] = xb
    return buf


def unpack(payload: np.ndarray, dtype: torch.dtype, hidden: int | None = None,
           num_experts: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inverse of pack, zero-copy: x [n, D], rows [P] int32, experts [P] int32, weights [P] float32.
    With `hidden` and `num_experts`, every size and index is checked first (ValueError): a forged
    or corrupt payload must never reach a kernel, where an index out of range is a crash (on a GPU
    a device-side assert that takes the process with it) or a read of other memory."""
    buf = from_wire(payload, torch.uint8)
    if buf.numel() < 8:
        raise ValueError(f"payload of {buf.numel()} bytes has no header")
    n, p = buf[:8].view(torch.int32).tolist()
    if hidden is not None:
        item = torch.empty(0, dtype=dtype).element_size()
        if n < 0 or p < 0 or buf.numel() != 8 + 12 * p + n * hidden * item:
            raise ValueError(f"payload of {buf.numel()} bytes does not hold {n} rows × {hidden} and {p} pairs")
    route = buf[8:8 + 12 * p].view(torch.int32).view(3, p)
    x = buf[8 + 12 * p:].view(dtype).view(n, -1) if n else torch.empty(0, 0, dtype=dtype)
    rows, experts, weights = route[0], route[1], route[2].view(torch.float32)
    if num_experts is not None and p:  # checked in numpy: on so few elements a torch op costs 5-10x more
        check = route.numpy()
        if check[0].min() < 0 or check[0].max() >= n:
            raise ValueError(f"a pair's row is outside [0, {n})")
        if check[1].min() < 0 or check[1].max() >= num_experts:
            raise ValueError(f"a pair's expert id is outside [0, {num_experts})")
        if not np.isfinite(check[2].view(np.float32)).all():
            raise ValueError("a pair's router weight is not finite")
    return x, rows, experts, weights


class ExpertActor:
    """Hosts `experts` (global ids) for each of `layers`, or `assignment` {layer: experts} when the
    layers hold different experts; `hold` changes that while it serves (see ExpertPool.apply)."""

    def __init__(self, checkpoint: str, experts: Sequence[int], layers: Sequence[int], *, dtype: str = "float32",
                 device: str = "cpu", num_threads: int = 1, name: str = "",
                 assignment: dict[int, Sequence[int]] | None = None, quantization: str | None = None) -> None:
        torch.set_num_threads(max(1, num_threads))  # one process per core share: no oversubscription
        self.name = name
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        # "experts_int8": every copy this actor reads (at start, on hold) is quantized as it is read
        self.quantization = check_quantization(quantization)
        config = ModelConfig.from_file(Path(checkpoint) / "config.json")
        self.num_experts, self.hidden_size = config.num_local_experts, config.hidden_size
        # A restarted actor serves what it held last (hold() records it), not what it started with.
        held = _recorded_assignment() or assignment or {layer: experts for layer in layers}
        self.assignment = {int(layer): tuple(sorted(int(e) for e in ex)) for layer, ex in held.items()}
        self.experts = tuple(sorted({e for ex in self.assignment.values() for e in ex}))
        self.layers = tuple(sorted(self.assignment))
        # layer → (slot [E]: global expert id → row in the stacks, or -1; w13 [n, 2F, D]; w2 [n, D, F]),
        # replaced whole by hold(), so a layer call sees one consistent set
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._hold_lock = threading.Lock()
        # Weights load on a thread, so that Ray calls (progress, stats) answer while they do; a layer
        # call waits for them, and a checkpoint that cannot be read makes the load FAILED, not the actor.
        self.load = LoadProgress(0, what=name or "experts")
        self._loaded = threading.Event()
        self.tokens = 0  # (token, expert) pairs computed since this process started
        self.calls = 0
        self.busy_s = 0.0  # time spent inside forward (the rest of a call's latency is transport)
        self.cpu_s = 0.0  # CPU time of the computing thread inside forward: busy_s less its waits for a core
        # [L, E] pairs computed per (layer, expert) since this process started: the planner's load
        self.pairs = torch.zeros(config.num_hidden_layers, self.num_experts, dtype=torch.long)
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

        # With several torch threads on the CPU, every layer call computes on one thread, whichever
        # connection (one per front replica) or Ray call brought it: each thread that computes keeps an
        # OpenMP team of its own, and two live teams on the same cores make each step ~2x slower
        # (model/torch_threads.py). One thread, one team; calls from several replicas queue for it.
        self._compute_thread = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raymoe-expert-compute")
                                if self.device.type == "cpu" and torch.get_num_threads() > 1 else None)
        # Layer calls may also come over a socket (actors/direct.py); Ray still places, names and
        # restarts this actor and hands out the endpoint.
        self.direct = DirectServer(self.forward_timed, host=ray.util.get_node_ip_address())
        threading.Thread(target=self._load_weights, name="raymoe-expert-load", daemon=True).start()

    def __repr__(self) -> str:  # the Ray dashboard and log prefixes show this
        return f"ExpertActor({self.name})"

    def _load_weights(self) -> None:
        """Read this actor's experts (only theirs), straight into the serving dtype, then the device."""
        ckpt = None
        try:
            ckpt = Checkpoint(self.checkpoint)
            self.load.total_bytes = sum(ckpt.expert_nbytes([layer], ex) for layer, ex in self.assignment.items())
            self._load_total.set(self.load.total_bytes)
            self.quantization = self.quantization or ckpt.quantization  # implied by a pre-quantized checkpoint
            ckpt.progress = self.load
            for layer, experts in self.assignment.items():
                self.state[layer] = self._stack(layer, experts, *ckpt.experts(layer, experts, self.dtype,
                                                                               self.quantization))
            release_free_memory()
            self.load.done()
        except BaseException as e:  # noqa: BLE001 — reported by progress() and every call
            self.load.done(e)
        finally:
            if ckpt is not None:
                ckpt.close()
            self._loaded.set()

    def _stack(self, layer: int, experts: Sequence[int], w13, w2):  # tensors or Int8Stacks
        slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot[list(experts)] = torch.arange(len(experts))
        return slot, w13.to(self.device), w2.to(self.device)

    @ray.method(concurrency_group="control")
    def hold(self, assignment: dict[int, Sequence[int]]) -> dict[str, Any]:
        """Hold exactly `assignment` {layer: experts} from now on: read the copies not held yet (only
        those), keep the others without a copy, drop the rest; each layer switches at once, between
        two of its calls. Layer calls keep being answered meanwhile. Returns bytes read and seconds."""
        # The copies are read and stacked on a passing thread: the long-lived thread Ray runs this on
        # would otherwise keep an OpenMP team of its own beside the compute thread's (model/torch_threads.py).
        return on_passing_thread(lambda: self._hold(assignment), name="raymoe-expert-hold")

    def _hold(self, assignment: dict[int, Sequence[int]]) -> dict[str, Any]:
        self._loaded.wait()
        if self.load.state == "FAILED":
            raise ExpertsNotLoaded(f"{self.name}: loading the experts failed: {self.load.error}")
        t0 = time.perf_counter()
        target = {int(layer): tuple(sorted(int(e) for e in ex)) for layer, ex in assignment.items() if ex}
        with self._hold_lock:
            ckpt = Checkpoint(self.checkpoint)
            read = 0
            try:
                for layer, experts in target.items():
                    have = self.assignment.get(layer, ())
                    if have == experts:
                        continue
                    new = [e for e in experts if e not in have]
                    read += ckpt.expert_nbytes([layer], new)
                    w13_new, w2_new = ckpt.experts(layer, new, self.dtype, self.quantization) if new else (None, None)
                    parts13, parts2 = [], []
                    for e in experts:
                        if e in have:
                            slot, w13, w2 = self.state[layer]
                            parts13.append(w13[int(slot[e])])
                            parts2.append(w2[int(slot[e])])
                        else:
                            parts13.append(w13_new[new.index(e)].to(self.device))
                            parts2.append(w2_new[new.index(e)].to(self.device))
                    self.state[layer] = self._stack(layer, experts, stack_experts(parts13), stack_experts(parts2))
                    self.assignment[layer] = experts
                for layer in [x for x in self.assignment if x not in target]:
                    del self.state[layer], self.assignment[layer]
            finally:
                ckpt.close()
            self.experts = tuple(sorted({e for ex in self.assignment.values() for e in ex}))
            self.layers = tuple(sorted(self.assignment))
            _record_assignment(self.assignment)
        release_free_memory()
        return {"bytes_read": read, "seconds": time.perf_counter() - t0}

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
        if self._compute_thread is None:
            return self._forward_here(layer, payload)
        return self._compute_thread.submit(self._forward_here, layer, payload).result()

    def _forward_here(self, layer: int, payload: np.ndarray) -> tuple[np.ndarray, float]:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        x, rows, experts, weights = unpack(payload, self.dtype, self.hidden_size, self.num_experts)
        out = to_wire(self.compute(layer, x, rows, experts, weights))
        self.tokens += int(rows.shape[0])
        self.calls += 1
        busy = time.perf_counter() - t0
        self.busy_s += busy
        self.cpu_s += time.thread_time() - cpu0
        self.compute_hist.observe(busy)
        self.pairs_counter.inc(int(rows.shape[0]))
        return out, busy

    def compute(self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [n, D], rows [P] into x, experts [P] global ids, weights [P] float32 → [n, D] on CPU."""
        state = self.state.get(layer)
        if state is None:
            raise ValueError(f"{self.name}: layer {layer} is not hosted here (layers {self.layers})")
        slot, w13, w2 = state
        # The routing of a call's few dozen pairs in numpy: each torch op costs ~5-10 µs of dispatch
        # here, a numpy op on so few elements ~1 µs (the pairs are views of the payload either way).
        ex = experts.numpy()
        local = slot.numpy()[ex]  # [P]
        if (local < 0).any():
            raise ValueError(f"{self.name}: layer {layer}: experts {sorted(set(ex[local < 0].tolist()))} "
                             f"are not hosted here")
        self.pairs[layer] += torch.from_numpy(np.bincount(ex, minlength=self.num_experts))
        order = np.argsort(local, kind="stable")  # pairs grouped by expert
        counts = np.bincount(local, minlength=w13.shape[0]).tolist()
        row = torch.from_numpy(rows.numpy()[order].astype(np.int64)).to(self.device)
        w = torch.from_numpy(weights.numpy()[order]).to(self.device)  # float32, as in model.moe.combine
        xt = x.to(self.device, non_blocking=True)
        out_rows = swiglu_grouped(xt.index_select(0, row), counts, w13, w2)  # one matmul per expert over its rows
        return torch.zeros_like(xt).index_add_(0, row, (out_rows * w[:, None]).to(xt.dtype)).cpu()

    @ray.method(concurrency_group="control")
    def expert_load(self) -> list[list[int]]:
        """[L][E] (token, expert) pairs this process computed per layer and expert."""
        return self.pairs.tolist()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property warns about an API it calls internally
            warnings.simplefilter("ignore")
            reconstructed = bool(ctx.was_current_actor_reconstructed)
        weight_bytes = sum(weight_nbytes(w) for _, *pair in list(self.state.values()) for w in pair)
        return {"name": self.name, "experts": list(self.experts), "layers": list(self.layers),
                "assignment": {str(layer): list(ex) for layer, ex in self.assignment.items()},
                "weight_bytes": weight_bytes, "quantization": self.quantization or "", "tokens": self.tokens, "calls": self.calls, "busy_s": self.busy_s,
                "queued_s": self.direct.queued_s, "cpu_s": self.cpu_s,
                "device": str(self.device), "threads": torch.get_num_threads(), "node_id": ctx.get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid(), "load_s": round(self.load.seconds, 3),
                "state": self.load.state, "bytes_read": self.load.bytes_read, "total_bytes": self.load.total_bytes,
                "load_error": self.load.error, "reconstructed": reconstructed}

    @ray.method(concurrency_group="control")
    def ping(self) -> str:
        return self.name

    @ray.method(concurrency_group="control")
    def direct_endpoint(self) -> tuple[str, int, bytes]:
        """(host, port, token) of this process's direct-transport listener; a restart changes the token."""
        return self.direct.endpoint()


def release_free_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc keeps them otherwise): loading frees its
    read buffers and quantization temporaries, and the actor's resident memory should be its
    weights, not their high-water mark. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _assignment_key(actor_id: str | None = None) -> bytes:
    return f"raymoe-actor-holds/{actor_id or ray.get_runtime_context().get_actor_id()}".encode()


def forget_assignment(handle) -> None:
    """Drop what an actor recorded of its experts (when it is killed for good)."""
    _internal_kv_del(_assignment_key(handle._actor_id.hex()))


def _record_assignment(assignment: dict[int, tuple[int, ...]]) -> None:
    """Remember what this actor holds beyond its process (Ray's KV store, keyed by the actor id,
    which survives restarts), so that a restarted process reloads the same experts."""
    _internal_kv_put(_assignment_key(), json.dumps({str(k): list(v) for k, v in assignment.items()}).encode(),
                     overwrite=True)


def _recorded_assignment() -> dict[int, tuple[int, ...]] | None:
    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(_assignment_key())
    return None if raw is None else {int(k): tuple(v) for k, v in json.loads(raw).items()}
