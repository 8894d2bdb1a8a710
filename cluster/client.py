"""A small gRPC client for raymoe's Generator service (used by `raymoe generate`, eval and tests)."""

from __future__ import annotations

import time
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc


class Client:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_ready(self, timeout: float) -> None:
        """Block until the health service says SERVING (raises TimeoutError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} did not become ready within {timeout:.0f} s")
            time.sleep(0.5)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> pb.GenerateResponse:
        return self.stub.Generate(request, timeout=timeout)

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completion_json(responses: list[pb.GenerateResponse]) -> dict:
    """The same object `raymoe run --json` prints, from a unary response or a stream's chunks."""
    out = {"prompt_ids": list(responses[0].prompt_token_ids) if responses else [],
           "token_ids": [t for r in responses for t in r.token_ids],
           "logprobs": [lp for r in responses for lp in r.logprobs],
           "text": "".join(r.text for r in responses),
           "finish_reason": responses[-1].finish_reason if responses else None}
    top = [row for r in responses for row in r.top_logprobs]
    if top:
        out["top_logprobs"] = [[{"token_id": a.token_id, "logprob": a.logprob} for a in row.alternatives]
                               for row in top]
    return out
