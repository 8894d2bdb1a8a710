"""The `raymoe` command line, in-process through `cli.main.main` and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymoe.cli.main import main
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams
from raymoe.model.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"prompt_ids", "token_ids", "logprobs", "text", "finish_reason"}


def run_json(capsys, *args) -> dict:
    assert main(["run", *args, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # exactly one JSON object, nothing else on stdout
    return json.loads(out[0])


def engine_greedy(model, prompt, **kw):
    [seq] = Engine(model, kv_cache_tokens=64).generate([prompt], SamplingParams(**kw))
    return seq


def assert_user_error(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("raymoe: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in err, err


def test_run_prompt_ids_json(capsys, tiny_dir, tiny_model, ref):
    result = run_json(capsys, "--checkpoint", str(tiny_dir), "--prompt-ids", "1,2,3", "--max-tokens", "8")
    assert KEYS <= result.keys()
    assert result["prompt_ids"] == [1, 2, 3]
    seq = engine_greedy(tiny_model, [1, 2, 3], max_tokens=8)
    assert result["token_ids"] == seq.output_ids and result["finish_reason"] == seq.finish_reason
    tokens, logits = ref.greedy(tiny_model, [1, 2, 3], 8)  # independent of the engine's cache
    assert result["token_ids"] == tokens[:len(result["token_ids"])]
    expected = [float(torch.log_softmax(lg, -1)[t]) for lg, t in zip(logits, result["token_ids"])]
    assert result["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert isinstance(result["text"], str)


def test_run_prompt_text_and_options(capsys, tiny_dir, tiny_model, tokenizer):
    text = "The cluster sends two numbers"
    result = run_json(capsys, "--checkpoint", str(tiny_dir), "--prompt", text, "--max-tokens", "6", "--ignore-eos",
                      "--logprobs", "2")
    prompt = tokenizer.encode(text)
    assert result["prompt_ids"] == prompt
    seq = engine_greedy(tiny_model, prompt, max_tokens=6, ignore_eos=True)
    assert result["token_ids"] == seq.output_ids and result["finish_reason"] == "length"
    assert result["text"] == tokenizer.decode(prompt + seq.output_ids)[len(tokenizer.decode(prompt)):]
    assert [row[0]["token_id"] for row in result["top_logprobs"]] == seq.output_ids
    assert all(len(row) == 2 for row in result["top_logprobs"])


def test_run_seeded_sampling_reproducible(capsys, tiny_dir):
    args = ["--checkpoint", str(tiny_dir), "--prompt-ids", "1,5,9", "--max-tokens", "6", "--temperature", "1.0",
            "--top-k", "50", "--seed", "3", "--ignore-eos"]
    assert run_json(capsys, *args)["token_ids"] == run_json(capsys, *args)["token_ids"]


def test_run_streams_text(capsys, tiny_dir):
    assert main(["run", "--checkpoint", str(tiny_dir), "--prompt", "hello", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_the_command_line_starts_without_torch_ray_or_grpc():
    """Parsing (and a bad flag's message) needs none of the heavy modules: the CLI imports them in the
    commands that use them (the one reason for function-local imports there)."""
    probe = ("import sys, raymoe.cli.main, raymoe.cli.commands, raymoe.cli.serve_flags; "
             "print(sorted(m for m in ('torch', 'ray', 'grpc', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_run_without_max_tokens_takes_the_default_of_every_door(capsys, tiny_dir, tiny_model):
    """One default for a request without max_tokens: `raymoe run`, the gRPC and HTTP doors
    (build_request) and SamplingParams; near the end of the context it shrinks instead of failing."""
    from raymoe.cluster.requests import build_request
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.sampling import DEFAULT_MAX_TOKENS

    result = run_json(capsys, "--checkpoint", str(tiny_dir), "--prompt-ids", "1,2,3", "--ignore-eos")
    assert len(result["token_ids"]) == DEFAULT_MAX_TOKENS == SamplingParams().max_tokens
    limits = ServeSettings().request_limits()
    assert build_request(tiny_model.cfg, limits, None, prompt_ids=[1, 2, 3]).params.max_tokens == DEFAULT_MAX_TOKENS
    ctx = tiny_model.cfg.max_position_embeddings
    assert build_request(tiny_model.cfg, limits, None, prompt_ids=[1] * (ctx - 5)).params.max_tokens == 5
    result = run_json(capsys, "--checkpoint", str(tiny_dir), "--prompt-ids", ",".join(["1"] * (ctx - 5)),
                      "--ignore-eos")
    assert len(result["token_ids"]) == 5


def test_run_without_checkpoint_uses_default(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("raymoe.model.default.PACKAGED", tmp_path / "no-demo")
    monkeypatch.setenv("RAYMOE_CACHE", str(tmp_path / "cache"))
    result = run_json(capsys, "--prompt-ids", "1,2", "--max-tokens", "2", "--ignore-eos")
    assert len(result["token_ids"]) == 2
    assert (tmp_path / "cache" / "default-tiny" / "config.json").exists()


@pytest.mark.parametrize("extra", [[], ["--old-config"], ["--shard-mb", "0.5"]], ids=["plain", "old-config", "sharded"])
def test_init_model(capsys, tmp_path, extra, tiny_model):
    out = tmp_path / "m"
    assert main(["init-model", "--preset", "tiny", "--out", str(out), *extra]) == 0
    assert str(out) in capsys.readouterr().out
    raw = json.loads((out / "config.json").read_text())
    assert ("rope_parameters" in raw) == ("--old-config" not in extra)
    assert ("rope_theta" in raw) == ("--old-config" in extra)
    if "--shard-mb" in extra:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.model").exists()
    model = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), name  # same preset and seed as the conftest checkpoint


def test_bad_input_nonexistent_checkpoint(capsys, tmp_path):
    assert_user_error(capsys, ["run", "--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "1,2"], "not found")


@pytest.mark.parametrize("args,fragments", [
    (["--prompt-ids", "1,x,3"], ["--prompt-ids", "integers"]),
    (["--prompt-ids", "1,2", "--temperature", "-1"], ["temperature"]),
    (["--prompt-ids", "1,2", "--top-p", "2"], ["top_p"]),
    (["--prompt-ids", "1,99999"], ["99999", "vocabulary"]),
    (["--prompt-ids", ","], ["empty"]),
    (["--prompt", ""], ["empty"]),
    (["--prompt-ids", "1,2", "--max-tokens", "5000"], ["context"]),
])
def test_bad_input_exits_2(capsys, tiny_dir, args, fragments):
    assert_user_error(capsys, ["run", "--checkpoint", str(tiny_dir), *args], *fragments)


def test_prompt_text_needs_tokenizer(capsys, tmp_path, tiny_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    assert_user_error(capsys, ["run", "--checkpoint", str(tmp_path), "--prompt", "hi"], "tokenizer.model")
    result = run_json(capsys, "--checkpoint", str(tmp_path), "--prompt-ids", "1,2", "--max-tokens", "2")
    assert result["text"] == ""  # ids work without a tokenizer; there is no text


def test_subprocess(tiny_dir, capsys):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "raymoe.cli.main", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})

    ok = cli("run", "--checkpoint", str(tiny_dir), "--prompt-ids", "1,2,3", "--max-tokens", "8", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == run_json(capsys, "--checkpoint", str(tiny_dir), "--prompt-ids", "1,2,3",
                                             "--max-tokens", "8")
    bad = cli("run", "--checkpoint", str(tiny_dir), "--prompt-ids", "1,2", "--temperature", "-1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("raymoe: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_expert_device_gpu_without_gpus_is_a_clear_error(tiny_dir):
    """Never a silent fallback to CPU: on a machine without GPUs, --expert-device gpu says so at once."""
    bad = subprocess.run([sys.executable, "-m", "raymoe.cli.main", "run", "--checkpoint", str(tiny_dir), "--prompt-ids",
                          "1,2", "--expert-actors", "1", "--expert-device", "gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"})
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("raymoe: ") and "no GPUs" in last and "--expert-device cpu" in last


@pytest.mark.parametrize("raw,want", [({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16"}, "float16"),
                                      ({"torch_dtype": "torch.bfloat16"}, "bfloat16"), ({}, "float32"),
                                      ({"torch_dtype": "auto"}, "float32"), ({"torch_dtype": "int8"}, "float32")])
def test_dtype_auto_is_the_checkpoints_own(tiny_dir, tmp_path, raw, want):
    from raymoe.model.config import ModelConfig, resolve_dtype

    cfg = json.loads((tiny_dir / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **raw}))
    parsed = ModelConfig.from_file(tmp_path / "config.json")
    assert resolve_dtype("auto", parsed) == want and resolve_dtype("float32", parsed) == "float32"


def test_dtype_auto_computes_in_float32_on_a_cpu_without_fast_bfloat16(monkeypatch, caplog):
    """An x86 CPU without AVX-512/AMX multiplies bfloat16 through a slow loop (measured ~100x slower
    than float32 on an AVX2 EPYC): "auto" then serves in float32, saying so; an explicit dtype is kept."""
    from raymoe.model import config
    from raymoe.model.config import ModelConfig, cpu_matmul_is_fast, resolve_dtype

    bf16 = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, torch_dtype="bfloat16")
    assert cpu_matmul_is_fast("float32")
    this_cpu = "bfloat16" if cpu_matmul_is_fast("bfloat16") else "float32"  # measured on this machine
    assert resolve_dtype("auto", bf16, "cpu") == this_cpu
    assert resolve_dtype("auto", bf16, "cuda") == resolve_dtype("auto", bf16) == "bfloat16"
    monkeypatch.setattr(config, "cpu_matmul_is_fast", lambda dtype: dtype == "float32")  # both branches here
    with caplog.at_level("WARNING", logger="raymoe"):
        assert resolve_dtype("auto", bf16, "cpu") == "float32"
    assert "no fast bfloat16 matmul" in caplog.text
    assert resolve_dtype("bfloat16", bf16, "cpu") == "bfloat16"


@pytest.mark.slow  # `ray start` and a command beside it: ~20 s
def test_beside_a_running_ray_cluster():
    """With `ray start --head` running on the machine, a command without --address starts its own
    private Ray instance instead of joining that cluster (and failing to ask it for CPUs)."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--block",
                             "--num-cpus=1", "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:  # the other cluster's GCS is up
            assert time.monotonic() < deadline and head.poll() is None, "ray start --head did not come up"
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "raymoe.cli.main", "run", "--expert-actors", "1", "--actor-cpus", "0.5",
                              "--prompt", "123+456=", "--max-tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                             timeout=180, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "579"
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops the processes it started
        head.wait(60)
        marker = Path("/tmp/ray/ray_current_cluster")  # what `ray start` left for later ray.init() calls
        if marker.exists() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()


def test_serve_settings_from_a_config_file_and_flags(tmp_path, capsys):
    """`raymoe serve --config FILE`: the file's settings, then the flags given; every ServeSettings
    field has a flag."""
    import dataclasses

    from raymoe.cli.main import build_parser
    from raymoe.cli.serve_flags import FLAGS, settings_from_args
    from raymoe.cluster.settings import ServeSettings

    config = tmp_path / "serve.yaml"
    config.write_text("expert_actors: 3\nreplicas: 2\nmax_queue: 9\nstream_interval_ms: 0\n")
    args = build_parser().parse_args(["serve", "--config", str(config), "--replicas", "4", "--http-host", "0.0.0.0",
                                      "--autoscale", "2:5"])
    s = settings_from_args(args)
    assert (s.expert_actors, s.max_queue, s.stream_interval_ms, s.http_host) == (3, 9, 0, "0.0.0.0")
    assert (s.replicas, s.autoscale_max_replicas) == (2, 5)  # --autoscale wins over --replicas
    flagged = {field for _, field, _, _ in FLAGS} | {"autoscale_max_replicas", "expert_autoscale_min",
                                                     "expert_autoscale_max"}
    unflagged = {f.name for f in dataclasses.fields(ServeSettings)} - flagged
    assert unflagged <= {"expert_resources", "replica_resources"}, unflagged  # dicts: --config only
    config.write_text("expert_actors: 3\nno_such_setting: 1\n")
    assert_user_error(capsys, ["serve", "--config", str(config)], "no_such_setting")
    assert_user_error(capsys, ["serve", "--autoscale", "3"], "--autoscale", "MIN:MAX")
    s = settings_from_args(build_parser().parse_args(["serve", "--expert-autoscale", "2:4"]))
    assert (s.expert_actors, s.expert_autoscale_min, s.expert_autoscale_max) == (2, 2, 4)
    assert_user_error(capsys, ["serve", "--expert-actors", "5", "--expert-autoscale", "1:3"], "expert autoscaling")


def test_app_names_and_route_prefixes(capsys):
    """A second server's name gives its HTTP prefix and its Serve config entry; bad ones are one line."""
    from raymoe.cli.main import build_parser
    from raymoe.cli.serve_flags import settings_from_args

    s = settings_from_args(build_parser().parse_args(["serve", "--app-name", "mixtral-b"]))
    assert s.http_route_prefix() == "/mixtral-b"
    entry = s.serve_config()["applications"][0]
    assert (entry["name"], entry["route_prefix"], entry["args"]["app_name"]) == ("mixtral-b", "/mixtral-b", "mixtral-b")
    assert settings_from_args(build_parser().parse_args(["serve"])).http_route_prefix() == "/"
    assert settings_from_args(build_parser().parse_args(["serve", "--app-name", "b", "--route-prefix", "/m/b"])
                              ).http_route_prefix() == "/m/b"
    assert_user_error(capsys, ["serve", "--app-name", "two words"], "app_name")
    assert_user_error(capsys, ["serve", "--route-prefix", "models/"], "route_prefix")
    assert_user_error(capsys, ["serve", "--app-name", "v1"], "hide the default application")


def test_serve_refuses_a_bad_checkpoint_before_starting_anything(capsys, tmp_path):
    """One line after 'starting the server' (it used to start Ray and Serve, then print Serve's traceback)."""
    for directory, fragment in ((tmp_path / "nope", "checkpoint directory not found"), (tmp_path, "config.json")):
        assert main(["serve", "--no-dashboard", "--checkpoint", str(directory)]) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 2 and lines[0] == "raymoe: starting the server", captured.err
        assert lines[1].startswith(f"raymoe: {directory}") and fragment in lines[1], captured.err
        assert "Traceback" not in captured.err + captured.out


def test_ctrl_c_while_the_server_starts_stops_it_at_once():
    """SIGINT while the replica (or a Mixtral's experts, for minutes) is still starting ends the
    command then, taking down what it started (it used to wait until the server was up)."""
    import signal
    import socket
    import time

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli.main", "serve", "--no-dashboard", "--grpc-port", str(ports[0]),
                             "--http-port", str(ports[1])], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # the deploy has begun: the handlers are in place, the replica is not up
            if "starting the front replica" in line or time.monotonic() > deadline:
                break
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "serving" not in out, (proc.returncode, out, err[-3000:])
        assert time.monotonic() - sent < 60  # shutting down Serve and Ray on a loaded 2-core machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_handled_signal_keeps_its_exit_status_under_python_m_even_after_an_eval_saw_it(tmp_path):
    """CI once saw `python -m raymoe.cli.main serve` die by SIGINT (-2) after handling Ctrl-C: CPython
    3.11 does so at exit once a KeyboardInterrupt went through an eval()/exec() of a string (Serve's
    deploy runs many), caught or not. The module's exit path keeps the status it returned."""
    (tmp_path / "interrupted_in_eval.py").write_text(
        "import sys\n"
        "from raymoe.cli.main import exit_process\n"
        "def boom():\n"
        "    raise KeyboardInterrupt\n"
        "try:\n"
        "    eval('boom()')\n"
        "except KeyboardInterrupt:\n"
        "    print('handled', flush=True)\n"
        "exit_process(int(sys.argv[1]))\n")
    for code in (130, 143):  # SIGINT, SIGTERM while `serve` starts
        done = subprocess.run([sys.executable, "-m", "interrupted_in_eval", str(code)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (code, "handled\n"), done.stderr


def test_paths_that_cannot_be_written_are_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(capsys, ["init-model", "--preset", "tiny", "--out", str(blocker / "ckpt")], str(blocker))


def test_max_batch_tokens_defaults_by_the_fronts_device_and_a_given_value_wins():
    """A CPU front steps at most 512 tokens by default (prompt chunks beside running streams stay
    short), a GPU front 2048; --max-batch-tokens N is N on both; a negative value is refused."""
    from raymoe.cli.main import build_parser
    from raymoe.cli.serve_flags import settings_from_args
    from raymoe.cluster.settings import ServeSettings

    s = ServeSettings()
    assert (s.effective_max_batch_tokens("cpu"), s.effective_max_batch_tokens("cuda")) == (512, 2048)
    given = settings_from_args(build_parser().parse_args(["serve", "--max-batch-tokens", "4096"]))
    assert (given.effective_max_batch_tokens("cpu"), given.effective_max_batch_tokens("cuda")) == (4096, 4096)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 0"):
        ServeSettings(max_batch_tokens=-1)
