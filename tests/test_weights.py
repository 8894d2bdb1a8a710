"""Checkpoint loading: only the requested experts are read, reduced precision, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raymoe.model.config import ConfigError
from raymoe.model.export import hf_state_dict, save_checkpoint
from raymoe.model.tokenizer import Tokenizer, TokenizerError
from raymoe.model.weights import Checkpoint, CheckpointError, load_model

LAYERS, EXPERTS = 2, 8  # the tiny preset


def expert_names(layer: int, e: int) -> set[str]:
    return {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")}


def file_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_experts_reads_only_requested(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    w13, w2 = ckpt.experts(1, [1, 3], torch.float32)
    assert set(ckpt.reads) == expert_names(1, 1) | expert_names(1, 3) and len(ckpt.reads) == 6
    raw = file_tensors(tiny_dir)
    for i, e in enumerate([1, 3]):
        p = f"model.layers.1.block_sparse_moe.experts.{e}."
        assert torch.equal(w13[i], torch.cat([raw[p + "w1.weight"], raw[p + "w3.weight"]]))
        assert torch.equal(w2[i], raw[p + "w2.weight"])
    with pytest.raises(CheckpointError, match="expert 8 does not exist"):
        ckpt.experts(0, [8], torch.float32)


def test_dense_state_reads_every_dense_tensor_and_no_expert(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    ckpt.dense_state(torch.float32)
    dense = {n for n in file_tensors(tiny_dir) if ".experts." not in n}
    assert set(ckpt.reads) == dense and len(ckpt.reads) == len(dense)


@pytest.fixture(scope="module")
def per_expert_dir(tmp_path_factory, model):
    """Each (layer, expert) in its own shard; then every shard except experts 1 and 3 is deleted."""
    out = tmp_path_factory.mktemp("per_expert")
    save_checkpoint(model, out)
    state = file_tensors(out)
    (out / "model.safetensors").unlink()
    weight_map, shards = {}, {"dense.safetensors": {}}
    for name, t in state.items():
        if ".experts." in name:
            layer, e = name.split(".")[2], name.split(".")[5]
            fname = f"expert-{layer}-{e}.safetensors"
        else:
            fname = "dense.safetensors"
        shards.setdefault(fname, {})[name] = t
        weight_map[name] = fname
    for fname, tensors in shards.items():
        save_file(tensors, str(out / fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for layer in range(LAYERS):
        for e in set(range(EXPERTS)) - {1, 3}:
            (out / f"expert-{layer}-{e}.safetensors").unlink()
    return out, state


def test_subset_loads_with_other_expert_shards_deleted(per_expert_dir, model):
    directory, state = per_expert_dir
    ckpt = Checkpoint(directory)
    for layer in range(LAYERS):
        w13, w2 = ckpt.experts(layer, [3, 1], torch.float32)
        experts = model.layers[layer].moe.experts
        assert torch.equal(w13, experts.w13[[3, 1]]) and torch.equal(w2, experts.w2[[3, 1]])
    assert all(".experts.1." in n or ".experts.3." in n for n in ckpt.reads)
    with pytest.raises(CheckpointError, match="expert-0-0.safetensors"):
        ckpt.experts(0, [0], torch.float32)


def test_dense_part_loads_alone(per_expert_dir, model):
    directory, _ = per_expert_dir
    ckpt = Checkpoint(directory)
    dense_only = load_model(ckpt, experts_factory=lambda layer: None)
    assert ckpt.reads and not any(".experts." in n for n in ckpt.reads)
    assert all(layer.moe.experts is None for layer in dense_only.layers)
    assert torch.equal(dense_only.layers[1].attn.wqkv.weight, model.layers[1].attn.wqkv.weight)
    assert torch.equal(dense_only.lm_head.weight, model.lm_head.weight)
    with pytest.raises(CheckpointError, match="expert-0-0.safetensors"):  # all experts need every shard
        load_model(directory)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_close_to_fp32(tmp_path, model, ref, dtype):
    save_checkpoint(model, tmp_path)
    low = load_model(tmp_path, dtype=dtype)
    assert low.dtype == dtype and low.layers[0].moe.experts.w13.dtype == dtype
    ids = [1] + list(range(100, 140, 2)) + [7, 300, 301, 302]
    exact, approx = ref.full_logits(load_model(tmp_path), ids), ref.full_logits(low, ids)
    assert approx.dtype == torch.float32 and torch.isfinite(approx).all()
    scale = exact.abs().max()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (approx - exact).abs().max() < tol * scale, ((approx - exact).abs().max(), scale)
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_bf16_checkpoint_loads_as_fp32(tmp_path, model):
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16).float())


# --- broken checkpoints ------------------------------------------------------------------------

@pytest.fixture
def broken(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


def edit_config(directory, **changes):
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps(raw))


def rewrite_tensors(directory, fn):
    state = file_tensors(directory)
    fn(state)
    save_file(state, str(directory / "model.safetensors"))


def test_missing_tensor(broken):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(broken, lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        load_model(broken)


def test_wrong_shape(broken):
    name = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    rewrite_tensors(broken, lambda s: s.__setitem__(name, torch.zeros(64, 100)))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(64, 100\), expected \(64, 128\)"):
        load_model(broken)


def test_unknown_model_type(broken):
    edit_config(broken, model_type="llama")
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_model(broken)


@pytest.mark.parametrize("field,value,message", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_parameters.rope_type 'yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.rope_type 'linear'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("hidden_size", None, "missing required field.*hidden_size"),
])
def test_unsupported_config(broken, field, value, message):
    raw = json.loads((broken / "config.json").read_text())
    if field == "rope_scaling":
        raw.pop("rope_parameters")
    raw[field] = value
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        Checkpoint(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(broken)


def test_pickle_checkpoint_rejected(broken):
    torch.save(file_tensors(broken), broken / "pytorch_model.bin")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as err:
        load_model(broken)
    assert "pickle" in str(err.value) and "safetensors" in str(err.value)


def test_corrupt_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(broken)


def test_missing_shard(tmp_path, model):
    save_checkpoint(model, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} listed in the index is missing"):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_missing_tokenizer(broken):
    (broken / "tokenizer.model").unlink()
    load_model(broken)  # the weights do not need it
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        Tokenizer(broken)


def test_export_round_trip(tmp_path, model):
    save_checkpoint(model, tmp_path, max_shard_bytes=200_000)
    again = load_model(tmp_path)
    assert hf_state_dict(again).keys() == hf_state_dict(model).keys()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_progress_counts_what_is_read(tmp_path, model):
    """A file may hold tensors nobody reads (a tied model's lm_head, old rotary buffers): the total
    the progress line shows is what the load reads, so a finished load shows 100%."""
    from raymoe.model.progress import LoadProgress

    save_checkpoint(model, tmp_path)
    state = file_tensors(tmp_path)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    progress = LoadProgress(total_bytes=0)
    load_model(tmp_path, progress=progress)
    assert progress.state == "READY" and progress.bytes_read == progress.total_bytes
    dense = LoadProgress(total_bytes=0)
    ckpt = Checkpoint(tmp_path)
    load_model(ckpt, experts_factory=lambda layer: None, progress=dense)
    assert dense.bytes_read == dense.total_bytes == sum(ckpt.nbytes(n) for n in ckpt.reads)
