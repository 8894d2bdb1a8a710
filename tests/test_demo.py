"""The demo model: the shipped checkpoint answers held-out additions, and the training path still trains.

The suite never retrains the shipped model; it scores the committed checkpoint and runs tiny
training runs (a few seconds) to keep `raymoe train-demo` working.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from raymoe.cli.main import main
from raymoe.model import demo
from raymoe.model.default import PACKAGED, default_checkpoint
from raymoe.model.weights import load_model

TINY = demo.Shape(hidden=32, intermediate=32, layers=2, heads=2, kv_heads=1)


def tiny_config(**kw) -> demo.TrainConfig:
    base = dict(seed=0, steps=30, batch_size=32, lr=3e-3, warmup=5, log_every=10, shape=TINY)
    return demo.TrainConfig(**{**base, **kw})


def test_demo_model_is_shipped_and_is_the_default():
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (PACKAGED / name).is_file(), f"model/demo_model/{name} is missing"
    assert default_checkpoint() == PACKAGED
    cfg = load_model(PACKAGED).cfg
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.num_hidden_layers >= 2
    assert cfg.num_parameters() <= 5_000_000
    size = sum(p.stat().st_size for p in PACKAGED.iterdir())
    assert size <= 10 * 2**20


def test_shipped_model_reaches_target_on_held_out_problems():
    result = demo.evaluate(PACKAGED, n=500)
    assert result.n == 500
    assert result.accuracy >= 0.95, f"accuracy {result.accuracy:.1%}; first errors {result.errors}"


def test_held_out_problems_never_appear_in_training():
    held = demo.eval_problems(500)
    assert all(demo.is_held_out(a, b) for a, b in held)
    assert held == demo.eval_problems(500)  # deterministic
    train = list(itertools.islice(demo.train_problems(0), 20000))
    assert not any(demo.is_held_out(a, b) for a, b in train)
    assert not set(held) & set(train)
    assert max(max(a, b) for a, b in train) >= 900 and min(min(a, b) for a, b in train) <= 9  # 1 to 3 digits


def test_evaluate_scores_any_generate_function():
    def oracle(prompts):
        return [f" {eval(p.rstrip('='))}" for p in prompts]  # noqa: S307 — our own "a+b=" strings

    right = demo.evaluate(n=50, generate=oracle)
    assert right.accuracy == 1.0 and right.correct == right.n == 50 and not right.errors
    assert right.answers == oracle([demo.prompt_text(a, b) for a, b in demo.eval_problems(50)])
    wrong = demo.evaluate(n=50, generate=lambda ps: ["0"] * len(ps))
    assert wrong.accuracy < 0.1 and wrong.errors


def test_short_training_run_lowers_the_loss(tmp_path):
    lines = []
    result = demo.train_demo(tmp_path / "ckpt", tiny_config(), log=lines.append)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert any(line.startswith("step    10/30") and "loss" in line and "steps/s" in line for line in lines)
    # The export is a loadable Hugging Face checkpoint that the evaluator can score.
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert 0.0 <= demo.evaluate(tmp_path / "ckpt", n=20).accuracy <= 1.0


def test_training_is_deterministic_from_its_seed(tmp_path):
    tc = tiny_config(steps=8)
    a = demo.train(tc, tmp_path / "a", log=None).losses
    b = demo.train(tc, tmp_path / "b", log=None).losses
    c = demo.train(dataclasses.replace(tc, seed=1), tmp_path / "c", log=None).losses
    assert a == b
    assert a != c


def test_cli_eval_demo_prints_accuracy(capsys):
    assert main(["eval-demo", "--n", "100"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "/100 held-out problems" in out


def test_cli_run_answers_with_the_default_model(capsys):
    assert main(["run", "--prompt", "123+456=", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == "579"


def test_cli_train_demo_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train-demo", "--out", str(out), "--steps", "2", "--log-every", "1", "--eval-n", "10"]) == 0
    text = capsys.readouterr().out
    assert "step     2/2" in text and "accuracy" in text
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--lr"])
def test_cli_train_demo_rejects_bad_values(tmp_path, capsys, flag):
    assert main(["train-demo", "--out", str(tmp_path / "x"), flag, "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
