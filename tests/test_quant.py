"""Int8 weight-only experts (`experts_int8`): kernels against a dequantized float reference, loading
(local, pre-quantized, on expert actors, on copies made while serving) and the settings and CLI."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from raymoe.model.moe import swiglu_grouped
from raymoe.model.quant import Int8Stack, check_quantization, quantize
from raymoe.model.quantize_checkpoint import quantize_checkpoint
from raymoe.model.weights import Checkpoint, CheckpointError, load_model

from expert_helpers import assert_same_generation, generate, write_checkpoint
import shared_ray


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt")


@pytest.fixture(scope="module")
def int8_want(ckpt):
    """The in-process engine with int8 local experts: what every other int8 path must give."""
    return generate(load_model(ckpt, quantization="experts_int8"))


def test_quantize_per_output_channel_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 24, generator=g) * torch.rand(3, 40, 1, generator=g) * 4  # rows of very different ranges
    w[1, 5] = 0  # an all-zero row must not divide by zero
    s = quantize(w, torch.float32)
    assert s.q.dtype == torch.int8 and s.scale.shape == (3, 40) and int(s.q.abs().max()) == 127
    step = s.scale[..., None]
    assert bool(((s.dequantize() - w).abs() <= step / 2 + 1e-7).all())
    assert s.nbytes == w.numel() + 3 * 40 * 4


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int8_grouped_swiglu_equals_dequantized_float_reference(dtype, tol):
    """The int8 kernel computes exactly the float SwiGLU over q·scale, up to the rounding of its dtype;
    experts without rows (counts 0) and uneven groups included."""
    g = torch.Generator().manual_seed(1)
    e, d, f = 5, 32, 48
    w13, w2 = quantize(torch.randn(e, 2 * f, d, generator=g), dtype), quantize(torch.randn(e, d, f, generator=g), dtype)
    counts = [3, 0, 1, 7, 2]
    xs = torch.randn(sum(counts), d, generator=g).to(dtype)
    got = swiglu_grouped(xs, counts, w13, w2)
    want = swiglu_grouped(xs.float(), counts, w13.dequantize(), w2.dequantize())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_local_int8_model_equals_its_dequantized_float_model(ckpt):
    """Quantized at load, tensor by tensor: logits equal those of a float model whose experts are the
    dequantized int8 weights; the experts take about a quarter of their float32 bytes."""
    q = load_model(ckpt, quantization="experts_int8")
    ref = load_model(ckpt)
    float_bytes = int8_bytes = 0
    for lq, lr in zip(q.layers, ref.layers):
        experts = lq.moe.experts
        assert isinstance(experts.w13, Int8Stack)
        float_bytes += lr.moe.experts.w13.numel() * 4 + lr.moe.experts.w2.numel() * 4
        int8_bytes += experts.w13.nbytes + experts.w2.nbytes
        with torch.no_grad():
            lr.moe.experts.w13.copy_(experts.w13.dequantize())
            lr.moe.experts.w2.copy_(experts.w2.dequantize())
    assert int8_bytes < 0.3 * float_bytes
    got, want = generate(q), generate(ref)
    assert_same_generation(got, want)


def test_prequantized_checkpoint_loads_without_requantizing(ckpt, tmp_path, int8_want):
    out = quantize_checkpoint(ckpt, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    c = Checkpoint(out)
    assert c.quantization == "experts_int8"  # implied: no flag needed
    name = "model.layers.0.block_sparse_moe.experts.3.w2."
    assert c.info(name + "weight_packed")[0] == torch.int32 and c.info(name + "weight_scale")[1] == (64, 1)
    model = load_model(c)
    assert not any(n.endswith("w1.weight") for n in c.reads)  # only int8 tensors and scales were read
    assert_same_generation(generate(model), int8_want)  # the same int8 values as quantizing at load
    w13, _ = c.experts(1, [2], torch.float32)
    w13_at_load, _ = Checkpoint(ckpt).experts(1, [2], torch.float32, "experts_int8")
    assert torch.equal(w13.q, w13_at_load.q) and torch.equal(w13.scale, w13_at_load.scale)
    expert_bytes = c.expert_nbytes(range(2), range(8))
    assert expert_bytes < 0.3 * Checkpoint(ckpt).expert_nbytes(range(2), range(8))
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again")
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(ckpt, out)


def test_unknown_quantization_is_refused_early(ckpt, tmp_path, capsys):
    from raymoe.cli.main import main
    from raymoe.cluster.settings import ServeSettings

    assert check_quantization("none") is None and ServeSettings(quantization="").quantization is None
    with pytest.raises(ValueError, match="quantization must be one of experts_int8"):
        ServeSettings(quantization="int4")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--quantization", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bad" / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="quantization_config is not one raymoe reads"):
        Checkpoint(tmp_path / "bad")


@pytest.fixture(scope="module")
def cluster():
    shared_ray.connect()  # the session's instance (tests/shared_ray.py); it outlives the module


def test_expert_actors_hold_int8_and_copies_load_int8(cluster, ckpt, int8_want):
    """Two actors quantize their own experts as they read them; a scale-out's new actor and the copies
    moved to the others load int8 too; every step gives the in-process int8 engine's answers."""
    from raymoe.actors.live import report, scale_pool
    from raymoe.actors.pool import ExpertPool, PoolConfig
    from raymoe.actors.remote_experts import remote_experts_factory

    with ExpertPool(ckpt, PoolConfig(num_actors=2, num_cpus=0.25, call_timeout_s=60,
                                     quantization="experts_int8")) as pool:
        model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
        assert_same_generation(generate(model), int8_want)
        stats = ray.get([a.stats.remote() for a in pool.group.live_actors()])
        c = ckpt_config = Checkpoint(ckpt).config
        per_expert = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * 4
        assert sum(s["weight_bytes"] for s in stats) == per_expert * c.num_local_experts * c.num_hidden_layers
        # loading progress counted the float32 bytes read from the file, not what is held
        assert sum(s["total_bytes"] for s in stats) == Checkpoint(ckpt).expert_nbytes(range(2), range(8))
        assert {s["quantization"] for s in stats} == {"experts_int8"}
        scale_pool(pool, 3)
        assert_same_generation(generate(model), int8_want)
        actors = report(pool)["actors"]
        assert len(actors) == 3 and {a["quantization"] for a in actors} == {"experts_int8"}
        assert sum(a["weight_bytes"] for a in actors) == per_expert * ckpt_config.num_local_experts * 2


def test_cli_quantize_then_run_implies_the_quantization(ckpt, tmp_path, capsys):
    """`raymoe quantize` → `raymoe run` on the result (nothing to say) answers as `raymoe run
    --quantization experts_int8` on the original; a config file may name the quantization."""
    from raymoe.cli.main import build_parser, main
    from raymoe.cli.serve_flags import settings_from_args

    assert main(["quantize", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q")]) == 0
    assert "wrote" in capsys.readouterr().out
    ask = ["--prompt-ids", "1,17,42,99", "--max-tokens", "6", "--ignore-eos", "--json"]
    assert main(["run", "--checkpoint", str(ckpt), "--quantization", "experts_int8", *ask]) == 0
    at_load = json.loads(capsys.readouterr().out)
    assert main(["run", "--checkpoint", str(tmp_path / "q"), *ask]) == 0
    assert json.loads(capsys.readouterr().out) == at_load
    (tmp_path / "serve.yaml").write_text("quantization: experts_int8\nexpert_actors: 2\n")
    s = settings_from_args(build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.yaml")]))
    assert s.quantization == "experts_int8" and s.pool_config("float32").quantization == "experts_int8"
    assert main(["quantize", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_experts_and_status_show_the_quantization_and_weight_bytes():
    from raymoe.cli.experts import render_placement
    from raymoe.cli.status import render
    from raymoe.protos import generator_pb2 as pb

    actor = dict(name="experts[0-3]", state="ALIVE", device="cpu", weight_bytes=3 << 20)
    placement = pb.PlacementResponse(version=1, actors=[pb.ExpertActorPlacement(
        id=0, slots=4, layers=[pb.LayerExperts(layer=0, experts=[0, 1, 2, 3])], quantization="experts_int8",
        **actor)])
    row = render_placement(placement).splitlines()[3]
    assert "3.0MB" in row and "experts_int8" in row
    info = pb.ModelInfoResponse(model="m", quantization="experts_int8", config=pb.ModelConfig(dtype="bfloat16"),
                                expert_actors=[pb.ExpertActorInfo(quantization="experts_int8", **actor)], state="READY")
    text = render(info)
    assert "bfloat16, experts experts_int8" in text and "3.0MB" in text
