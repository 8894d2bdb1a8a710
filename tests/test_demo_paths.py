"""The demo model gives the same answers in-process, with experts on Ray actors, and through gRPC."""

from __future__ import annotations

import argparse

import pytest

from raymoe.cli.demo_eval import remote_experts_generate, server_generate
from raymoe.model.default import PACKAGED, default_checkpoint
from raymoe.model.demo import evaluate, local_generate
from serving_helpers import running_server

N = 60  # held-out problems per path (the full 500 run in-process in test_demo.py)

pytestmark = [pytest.mark.skipif(not (PACKAGED / "config.json").exists(), reason="demo model not shipped"),
              pytest.mark.slow]  # the demo evaluated on every path: ~30 s


def test_same_answers_on_every_path():
    ckpt = default_checkpoint()
    local = evaluate(ckpt, n=N, generate=local_generate(ckpt))
    assert local.accuracy >= 0.95
    with running_server(checkpoint=None, expert_actors=2, expert_num_cpus=0.5) as client:
        served = evaluate(ckpt, n=N, generate=server_generate(client.target))
        args = argparse.Namespace(expert_actors=3, expert_replicas=1, actor_cpus=0.25, dtype="float32",
                                  expert_timeout=30.0, address=None)
        with remote_experts_generate(ckpt, args) as generate:
            remote = evaluate(ckpt, n=N, generate=generate)
    assert served.answers == local.answers
    assert remote.answers == local.answers
    assert served.accuracy == remote.accuracy == local.accuracy
