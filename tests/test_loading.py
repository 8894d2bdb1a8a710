"""Loading weights: the direct safetensors reader against the safetensors library, progress counted
byte for byte, expert actors that load in the background and report it, and a load that fails."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors import safe_open

from raymoe.model.progress import LoadProgress, progress_line
from raymoe.model.safetensors_file import SafetensorsError, SafetensorsFile
from raymoe.model.weights import Checkpoint, CheckpointError, load_model


def test_reader_equals_the_safetensors_library(tiny_dir):
    ours = SafetensorsFile(tiny_dir / "model.safetensors")
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as ref:
        assert sorted(ours.keys()) == sorted(ref.keys())
        for name in ref.keys():
            want = ref.get_tensor(name)
            got = ours.read(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
            out = torch.empty_like(want)
            assert ours.read(name, out) is out and torch.equal(out, want)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_files_are_checkpoint_errors(tiny_dir, tmp_path, damage):
    for f in tiny_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(SafetensorsError):
        SafetensorsFile(path)


def test_progress_counts_every_byte_read(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    progress = LoadProgress(ckpt.expert_nbytes([1], [2, 5]), what="experts[2,5]@layers[1]")
    ckpt.progress = progress
    w13, w2 = ckpt.experts(1, [2, 5], torch.float32)
    assert progress.bytes_read == progress.total_bytes == (w13.numel() + w2.numel()) * 4
    progress.done()
    snap = progress.snapshot()
    assert snap["state"] == "READY" and snap["bytes_read"] == snap["total_bytes"]
    whole = LoadProgress(0)
    load_model(tiny_dir, progress=whole)
    assert whole.state == "READY" and whole.bytes_read == whole.total_bytes > 0
    f = SafetensorsFile(tiny_dir / "model.safetensors")
    assert whole.total_bytes == sum(f.info(n)[2] for n in f.keys())  # the whole file: dense part and experts
    assert cfg.num_local_experts == 8


def test_progress_line_names_what_is_still_loading():
    parts = [{"what": "a", "state": "READY", "bytes_read": 2 << 30, "total_bytes": 2 << 30, "seconds": 2.0,
              "error": ""},
             {"what": "b", "state": "LOADING", "bytes_read": 1 << 30, "total_bytes": 2 << 30, "seconds": 2.0,
              "error": ""}]
    line = progress_line(parts)
    assert line.startswith("3.00 of 4.00 GB (75%), 1536 MB/s") and "b 50%" in line and "a " not in line


def test_actors_load_in_the_background_and_a_failed_load_is_named(tiny_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from raymoe.actors.errors import ExpertsUnavailable
    from raymoe.actors.pool import ExpertPool, PoolConfig
    import shared_ray

    shared_ray.connect()
    seen = []
    with ExpertPool(tiny_dir, PoolConfig(num_actors=2, num_cpus=0.25), on_progress=seen.append) as pool:
        final = ray.get([a.progress.remote() for a in pool.actors])
        assert all(s["state"] == "READY" and s["bytes_read"] == s["total_bytes"] > 0 for s in final)
        assert seen and len(seen[-1]) == 2
        assert [s["state"] for s in pool.stats()] == ["READY", "READY"]
    for f in tiny_dir.iterdir():  # a checkpoint whose expert bytes are cut short
        shutil.copy(f, tmp_path / f.name)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4096])
    with pytest.raises(ExpertsUnavailable, match="could not load its experts"):
        ExpertPool(tmp_path, PoolConfig(num_actors=1, num_cpus=0.25, start_timeout_s=30))


def test_status_shows_actors_loading():
    """`raymoe status` on a server whose expert actors are still loading (ModelInfo state LOADING)."""
    from raymoe.cli.status import render
    from raymoe.protos import generator_pb2 as pb

    info = pb.ModelInfoResponse(model="/m", state="LOADING", config=pb.ModelConfig(num_hidden_layers=2),
                                expert_actors=[
                                    pb.ExpertActorInfo(name="experts[0-3]@layers[0-1]", state="LOADING",
                                                       load_bytes_read=1 << 30, load_total_bytes=4 << 30,
                                                       load_seconds=2.0),
                                    pb.ExpertActorInfo(name="experts[4-7]@layers[0-1]", state="ALIVE",
                                                       load_bytes_read=4 << 30, load_total_bytes=4 << 30,
                                                       load_seconds=4.0)])
    text = render(info)
    assert "LOADING: expert actors read 5.00 of 8.00 GB (62%, 1280 MB/s); requests wait" in text
    assert "LOADING 25%" in text and "ALIVE" in text
    failed = render(pb.ModelInfoResponse(model="/m", state="FAILED", load_error="experts [7] unavailable: x"))
    assert "FAILED: experts [7] unavailable: x" in failed


@pytest.mark.slow  # a deployment that Serve gives up on: ~30 s
def test_a_server_whose_experts_cannot_load_says_why(tiny_dir, tmp_path):
    """A sharded checkpoint whose expert shard is damaged: the front replica loads its dense part
    (another shard) and comes up, the expert actors fail, and deploy() (so `raymoe serve`) raises
    one clear error naming the file, not a remote traceback."""
    pytest.importorskip("ray")
    import json

    from safetensors.torch import load_file, save_file

    from raymoe.cluster.deploy import deploy
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.errors import BackendUnavailable
    import shared_ray

    tensors = load_file(str(tiny_dir / "model.safetensors"))
    experts = {k: v for k, v in tensors.items() if ".block_sparse_moe.experts." in k and ".layers.1." in k}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in experts},
              "model-00002-of-00002.safetensors": experts}
    for name, part in shards.items():
        save_file(part, str(tmp_path / name), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    damaged = tmp_path / "model-00002-of-00002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    shared_ray.connect()
    settings = ServeSettings(checkpoint=str(tmp_path), expert_actors=2, expert_num_cpus=0.25, replica_num_cpus=0.5)
    settings = dataclasses.replace(settings, **shared_ray.serve_ports(settings))
    try:
        with pytest.raises(BackendUnavailable, match="could not load its experts") as err:
            deploy(settings)
        assert "model-00002-of-00002.safetensors" in str(err.value) and "Traceback" not in str(err.value)
    finally:
        shared_ray.clear_serve(settings)
