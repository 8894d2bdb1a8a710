"""Two servers (models) in one Ray cluster, as Serve applications of their own names: each answers
its own gRPC clients (the `application` metadata) and HTTP route prefix, each keeps its own expert
pool, and taking one down leaves the other serving."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from raymoe.cluster.client import Client, completion_json
from raymoe.cluster.settings import APP_NAME, ServeSettings
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

pytestmark = pytest.mark.slow  # three applications deployed and two failing ones given up on: ~1 min


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def first():
    """The demo model with one expert actor, served for the whole module: the other applications
    come and go beside it (each test checks that it still serves as before)."""
    with running_server(expert_actors=1, expert_num_cpus=0.25, replica_num_cpus=0.5) as client:
        yield client


def test_two_models_share_a_cluster_under_their_own_names(first, tiny_dir):
    from ray import serve

    from raymoe.actors.pool_host import pool_progress
    from raymoe.cluster.deploy import deploy, release_pool

    second = ServeSettings(app_name="second", checkpoint=str(tiny_dir), expert_actors=1, expert_num_cpus=0.25,
                           replica_num_cpus=0.5, grpc_port=int(first.target.rsplit(":", 1)[1]), http_port=first.http_port)
    deploy(second)
    try:
        target = first.target
        with Client(target, app=APP_NAME) as a, Client(target, app="second") as b:
            b.wait_ready(60)
            assert a.model_info().model != b.model_info().model == tiny_dir.name  # a name, never the path
            request = pb.GenerateRequest(prompt="123+456=", max_tokens=8)
            assert a.generate(request).text == "579"  # the demo model, still served
            got = completion_json(list(b.stream(pb.GenerateRequest(prompt="Hello", max_tokens=5, ignore_eos=True))))
            assert len(got["token_ids"]) == 5
            with Client(target, app="nope") as lost, pytest.raises(grpc.RpcError) as err:
                lost.model_info(timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        base = f"http://127.0.0.1:{first.http_port}"
        assert http_json(f"{base}/v1/models")["data"][0]["id"] != http_json(f"{base}/second/v1/models")["data"][0]["id"]
        pools = {app: pool_progress(app) for app in (APP_NAME, "second")}
        assert all(p and all(s["state"] == "READY" for s in p) for p in pools.values()), pools
    finally:
        serve.delete("second")
        release_pool(second)
    with Client(first.target, app=APP_NAME) as a:  # the first server is untouched
        assert a.generate(pb.GenerateRequest(prompt="123+456=", max_tokens=8), timeout=60).text == "579"
        info = a.model_info()
        assert info.state == "READY" and [actor.state for actor in info.expert_actors] == ["ALIVE"]
    assert pool_progress("second") == [] and pool_progress(APP_NAME)


def test_a_server_that_cannot_deploy_says_why_and_the_others_keep_serving(first, tmp_path):
    """A third server whose checkpoint the replicas cannot read: deploy raises the replicas' own
    error in one line, while the running server answers a stream started before it."""
    import threading

    from ray import serve

    from raymoe.cluster.deploy import DeployFailed, deploy

    bad = ServeSettings(app_name="bad", checkpoint=str(tmp_path / "missing"), grpc_port=int(first.target.rsplit(":", 1)[1]),
                        http_port=first.http_port, replica_num_cpus=0.5)
    done, results = threading.Event(), []

    def streams() -> None:  # one stream after another for as long as the failed deploy takes
        while not done.is_set():
            try:
                chunks = list(first.stream(pb.GenerateRequest(prompt="123+456=", max_tokens=64, ignore_eos=True)))
            except grpc.RpcError as e:  # kept for the assertion below: the thread must not die unseen
                results.append({"error": f"{e.code()}: {e.details()}"})
                return
            results.append(completion_json(chunks))

    worker = threading.Thread(target=streams)
    worker.start()
    try:
        with pytest.raises(DeployFailed) as err:
            deploy(bad)
    finally:
        done.set()
        serve.delete("bad")
        worker.join(120)
    message = str(err.value)
    assert "\n" not in message and "CheckpointError" in message and "missing" in message, message
    assert results and all(r.get("finish_reason") == "length" and len(r["token_ids"]) == 64 for r in results), results
    assert first.generate(pb.GenerateRequest(prompt="123+456=", max_tokens=8)).text == "579"


def test_a_failed_replacement_leaves_the_running_server_serving(first, tmp_path):
    """`raymoe serve --address` under the name of a running server, with a checkpoint its replicas
    cannot read: the command fails in one line, and takes down neither that server nor its pool."""
    import threading

    from raymoe.cli.errors import UserError
    from raymoe.cli.serve import _serve_until_stopped

    bad = ServeSettings(checkpoint=str(tmp_path / "missing"), grpc_port=int(first.target.rsplit(":", 1)[1]),
                        http_port=first.http_port)
    with pytest.raises(UserError) as err:
        _serve_until_stopped(bad, "auto", None, threading.Event(), threading.Event(), keyed=False)
    assert "CheckpointError" in str(err.value) and "runs on with its settings" in str(err.value)
    assert first.generate(pb.GenerateRequest(prompt="123+456=", max_tokens=8), timeout=60).text == "579"
