"""Shared fixtures: small checkpoints and models, and a cache-free reference decoder.

Everything here is tiny (hidden 64, 2 layers) so that the model's own tests take seconds on two CPU
cores; the suite's time goes to Ray: deploying servers, starting expert actors and replicas (each a
process that imports torch), and the fault, soak and demo tests. The modules that need Ray share one
private instance and one Serve (tests/shared_ray.py) instead of starting their own (about 20 of each
per run before). What the suite costs on 2 quiet cores (AVX-512, 2026-12-02): everything 10.7 min
(509 tests; 20.5 min before that sharing), the fast loop `-m "not slow"` 3.0 min (464 tests, three
runs 177-182 s). The two longest tests are slow-marked demonstrations: autoscaling (~100 s) and a
minute of faults (~95 s). Beside other work the same suite took two to four times as long.
Session-scoped fixtures are read-only: tests that modify a checkpoint copy it first.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from raymoe.cluster.serve_env import apply_serve_env
from raymoe.model.presets import PRESETS, init_checkpoint, random_model
from raymoe.model.step import build_layout
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.transformer import Mixtral
from raymoe.model.weights import load_model

torch.set_num_threads(1)  # tiny shapes gain nothing from threads; spinning ones slow a shared machine
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the tests' private Ray instances: no token auth
apply_serve_env()  # their Serve runs as raymoe serve's does

# Weights with std 0.15 give varied greedy continuations (std 0.02 quickly falls into loops).
ACTIVE_STD = 0.15


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_down_at_the_end():
    """The Ray instance the modules share (tests/shared_ray.py) goes down with the session."""
    yield
    shared = sys.modules.get("shared_ray")  # imported by the modules that use Ray
    if shared is not None:
        shared.leave()


_exit_status: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with the session's status once pytest has reported, without Python's
    teardown: in one of four runs on 2026-12-02 the interpreter's teardown segfaulted (exit 139)
    after every test had passed and the summary was printed — a thread of a C extension still
    running while modules were torn down (the tests leave daemon threads of in-process expert
    actors' socket servers, Serve's router loop and gRPC). Ray was shut down by the fixture above."""
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The `tiny` preset checkpoint exactly as `raymoe init-model` writes it (with tokenizer.model)."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return Tokenizer(tiny_dir)


def make_model(seed: int = 1, **overrides) -> Mixtral:
    """An in-memory tiny-shaped model with livelier weights; overrides replace config fields."""
    cfg = dataclasses.replace(PRESETS["tiny"], **overrides)
    return random_model(cfg, seed, std=ACTIVE_STD)


@pytest.fixture(scope="session")
def model():
    return make_model()


@pytest.fixture(scope="session")
def sliding_model():
    return make_model(seed=2, sliding_window=8)


def full_logits(model: Mixtral, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of every position, recomputed from scratch with no KV cache."""
    layout = build_layout([len(ids)], [0], sliding_window=model.cfg.sliding_window)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids, dtype=torch.long), layout))


def greedy_reference(model: Mixtral, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens, recomputing the whole sequence at every step; also each step's last logits."""
    ids, logits = list(prompt), []
    for _ in range(n):
        last = full_logits(model, ids)[-1]
        logits.append(last)
        ids.append(int(torch.argmax(last)))
    return ids[len(prompt):], logits


@pytest.fixture(scope="session")
def ref():
    """The reference helpers, as a fixture so tests need not import conftest."""
    class Ref:
        full_logits = staticmethod(full_logits)
        greedy = staticmethod(greedy_reference)
        make_model = staticmethod(make_model)
    return Ref


@pytest.fixture(scope="session")
def small_preset(tmp_path_factory):
    """(model, tokenizer) of the `small` preset exactly as `raymoe init-model --preset small` makes them
    (seed 0), kept in memory (writing the 95M parameters out and back would only add time)."""
    from raymoe.model.synthetic import corpus
    from raymoe.model.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus(0, 4000), tmp_path_factory.mktemp("small") / "tokenizer.model",
                          PRESETS["small"].vocab_size)
    return random_model(PRESETS["small"], 0), tok
