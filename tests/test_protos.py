"""The committed gRPC stubs are exactly what grpcio-tools generates from protos/generator.proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "generator.proto", tmp_path / "protos")
    # The documented command (see protos/generator.proto and the README), run on a copy of the root.
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("generator_pb2.py", "generator_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_text()
        assert (ROOT / "protos" / name).read_text() == fresh, \
            f"protos/{name} is stale: regenerate it with the command at the top of protos/generator.proto"
    assert "from raymoe.protos import generator_pb2" in fresh


def test_api_names_are_stable():
    from raymoe.protos import generator_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Generator"]
    assert service.full_name == "raymoe.v1.Generator"
    assert {"Generate", "GenerateStream", "Tokenize", "ModelInfo"} <= set(service.methods_by_name)
    assert service.methods_by_name["GenerateStream"].server_streaming
    fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "stop_token_ids", "logprobs", "ignore_eos"} <= fields
    assert {"text", "token_ids", "logprobs", "finish_reason", "usage"} <= set(pb.GenerateResponse.DESCRIPTOR.fields_by_name)
