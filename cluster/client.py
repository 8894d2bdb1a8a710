"""The Python client for raymoe's Generator service (used by `raymoe generate`, `eval-demo --target`,
the benchmarks and the tests), with streams that survive the loss of the replica serving them.

    from raymoe.cluster.client import Client
    with Client("127.0.0.1:9000") as client:
        for chunk in client.stream(pb.GenerateRequest(prompt="123+456=", max_tokens=8), timeout=60):
            print(chunk.text, end="", flush=True)

A stream that breaks for a reason that is not the request's own (its replica died or went away,
the connection dropped, the server was busy) is continued on another replica: the client sends the
same request again with the tokens and text bytes received so far (`resume_token_ids`,
`resume_text_bytes`) and the seed the first chunk carried, so the caller sees one uninterrupted
stream, no token twice and none missing. At most `retries` resumptions, with exponential backoff,
all within the caller's `timeout`. Errors that are the request's fault (INVALID_ARGUMENT,
UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ...) and a passed deadline are raised at once.
`AsyncClient` is the same over grpc.aio.

A target may list several servers, "HOST:PORT,HOST:PORT": the channel then spreads calls over them
round robin (gRPC's own `round_robin` policy), skipping one that is down, and a broken stream
resumes on the next. `Client.direct(PROXY)` is a client over the front replicas' own ports of a
server started with --direct-ingress (no proxy hop), as that server's ModelInfo lists them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from typing import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raymoe.protos import generator_pb2 as pb
from raymoe.protos import generator_pb2_grpc as pb_grpc

# What a broken stream can get from Serve's proxy when its replica dies or drains (INTERNAL with
# Ray's "actor died" text, UNAVAILABLE, UNKNOWN), from a dropped connection (UNAVAILABLE), or from a
# full server (RESOURCE_EXHAUSTED): none is the request's fault, so it is worth another replica.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
RETRIES = 5
BACKOFF_S = 0.2  # doubled per attempt, at most 5 s


class Resumer:
    """The state of one logical stream across attempts: what the caller has received."""

    def __init__(self, request: pb.GenerateRequest, timeout: float | None, retries: int) -> None:
        self.request, self.retries = request, retries
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # What the caller already has: a request may itself be a resumption (its own resume fields).
        self.token_ids: list[int] = list(request.resume_token_ids)
        self.text_bytes = request.resume_text_bytes
        self.seed: int | None = request.seed if request.HasField("seed") else None
        self.chunks = 0
        self.finished = False  # the last chunk (with finish_reason) arrived: nothing to resume
        self.attempts = 0  # resumptions so far

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def on_chunk(self, chunk: pb.GenerateResponse) -> pb.GenerateResponse:
        """Record a chunk; a resumed attempt's repeat of the first chunk's fields is dropped."""
        if self.chunks:
            chunk.ClearField("prompt_token_ids")
            chunk.ClearField("seed")
        elif chunk.HasField("seed"):
            self.seed = chunk.seed
        self.chunks += 1
        self.finished = self.finished or bool(chunk.finish_reason)
        self.token_ids.extend(chunk.token_ids)
        self.text_bytes += len(chunk.text.encode())
        return chunk

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before resuming, or re-raise when this error must reach the caller."""
        left = self.remaining()
        own_fault = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in (error.details() or "")
        if (error.code() not in RETRYABLE or own_fault or self.attempts >= self.retries
                or (left is not None and left <= 0)):
            raise error
        self.attempts += 1
        wait = min(5.0, BACKOFF_S * 2 ** (self.attempts - 1))
        return wait if left is None else min(wait, left)

    def next_request(self) -> pb.GenerateRequest:
        """The request that continues the stream from what was received."""
        if not self.chunks and not self.token_ids:  # nothing arrived: start again (a fresh seed is fine)
            return self.request
        resumed = pb.GenerateRequest()
        resumed.CopyFrom(self.request)
        del resumed.resume_token_ids[:]
        resumed.resume_token_ids.extend(self.token_ids)
        resumed.resume_text_bytes = self.text_bytes
        if self.seed is not None and not self.request.HasField("seed"):
            resumed.seed = self.seed
        return resumed


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata carrying the server's API key (the argument, else $RAYMOE_API_KEY; none: empty)."""
    key = api_key if api_key is not None else os.environ.get("RAYMOE_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


def call_metadata(api_key: str | None, app: str | None) -> tuple[tuple[str, str], ...]:
    """Every call's metadata: the API key (see auth_metadata) and, where several servers share the
    Ray cluster, the Serve application to reach (`application`, as Serve's gRPC proxy reads it)."""
    return auth_metadata(api_key) + ((("application", app),) if app else ())


# gRPC's own target forms (a name resolver's scheme): passed to gRPC as they are
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


class NoDirectIngress(LookupError):
    """The server lists no replica ports of their own (it was started without --direct-ingress)."""


def channel_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """gRPC's target and channel options for `target`: one address as it is; several ("HOST:PORT,
    HOST:PORT", IPv6 hosts in brackets) resolved to one address list under the `round_robin` policy
    (gRPC's ipv4:/ipv6: schemes take literal addresses, of one family). A target in one of gRPC's
    own forms ("dns:///…", "ipv4:…", "unix:…") is gRPC's to read."""
    if "://" in target or target.startswith(_SCHEMES):
        return target, []
    parts = [t.strip() for t in target.split(",") if t.strip()]
    if len(parts) < 2:
        return (parts[0] if parts else target), []
    by_family: dict[int, list[str]] = {}
    for part in parts:
        host, sep, port = part.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or (":" in host and not bracketed):
            raise ValueError(f"target {part!r} is not HOST:PORT (an IPv6 host in brackets)")
        host = host[1:-1] if bracketed else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a name: its first address
            try:
                ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
            except OSError as e:
                raise ValueError(f"target {part!r}: cannot resolve {host!r} ({e})") from None
        by_family.setdefault(ip.version, []).append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(by_family) > 1:
        raise ValueError(f"target {target!r} mixes IPv4 and IPv6 addresses; gRPC balances over one family")
    version, addresses = next(iter(by_family.items()))
    return f"ipv{version}:{','.join(addresses)}", [("grpc.lb_policy_name", "round_robin")]


class Client:
    def __init__(self, target: str, api_key: str | None = None, app: str | None = None) -> None:
        self.target = target
        self.metadata = call_metadata(api_key, app)  # sent with every call (`stub` calls made directly: add it)
        address, options = channel_target(target)
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.experts = pb_grpc.ExpertsStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.resumptions = 0  # streams continued (or unary calls made again) after a break, in all

    @classmethod
    def direct(cls, proxy: str, api_key: str | None = None, app: str | None = None,
               timeout: float = 30) -> "Client":
        """A client over the front replicas' own gRPC ports (a server started with --direct-ingress),
        as the server at `proxy` lists them now; calls go round robin over them. NoDirectIngress if it
        lists none (no direct ingress); a grpc.RpcError if `proxy` does not answer. Replicas added
        later are not seen until the next `direct` (one that goes away is skipped)."""
        return cls(",".join(direct_targets(proxy, api_key, app, timeout)), api_key=api_key, app=app)

    def wait_ready(self, timeout: float) -> None:
        """Block until the health service says SERVING (raises TimeoutError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=self.metadata).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} did not become ready within {timeout:.0f} s")
            time.sleep(0.5)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None,
                 retries: int = RETRIES) -> pb.GenerateResponse:
        """A whole completion; a call that failed for the server's reasons is made again (a unary
        call delivers nothing before it ends, so it starts over)."""
        state = Resumer(request, timeout, retries)
        while True:
            try:
                return self.stub.Generate(request, timeout=state.remaining(), metadata=self.metadata)
            except grpc.RpcError as e:
                time.sleep(state.retry_after(e))
                self.resumptions += 1

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None,
               retries: int = RETRIES) -> Iterator[pb.GenerateResponse]:
        """The chunks of one generation, resumed on another replica if its stream breaks."""
        state = Resumer(request, timeout, retries)
        current = request
        while True:
            try:
                for chunk in self.stub.GenerateStream(current, timeout=state.remaining(), metadata=self.metadata):
                    yield state.on_chunk(chunk)
                return
            except grpc.RpcError as e:
                if state.finished:  # it broke after its last chunk: the caller has everything
                    return
                time.sleep(state.retry_after(e))
                current = state.next_request()
                self.resumptions += 1

    def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def placement(self, timeout: float | None = None) -> pb.PlacementResponse:
        return self.experts.GetPlacement(pb.PlacementRequest(), timeout=timeout, metadata=self.metadata)

    def scale_experts(self, actors: int, timeout: float | None = None) -> pb.PlacementChange:
        return self.experts.ScaleExperts(pb.ScaleExpertsRequest(actors=actors), timeout=timeout, metadata=self.metadata)

    def rebalance_experts(self, timeout: float | None = None) -> pb.PlacementChange:
        return self.experts.RebalanceExperts(pb.RebalanceRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def direct_targets(proxy: str, api_key: str | None = None, app: str | None = None,
                   timeout: float = 30) -> list[str]:
    """The front replicas' own gRPC endpoints (HOST:PORT) that the server at `proxy` lists now
    (ModelInfo's direct_grpc_targets); NoDirectIngress if none."""
    with Client(proxy, api_key=api_key, app=app) as asking:
        targets = list(asking.model_info(timeout=timeout).direct_grpc_targets)
    if not targets:
        raise NoDirectIngress(f"the server at {proxy} serves through its proxy only (no --direct-ingress)")
    return targets


class AsyncClient:
    """`Client` over grpc.aio, for many concurrent streams from one thread (the benchmarks)."""

    def __init__(self, target: str, api_key: str | None = None, app: str | None = None) -> None:
        self.metadata = call_metadata(api_key, app)
        address, options = channel_target(target)
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.GeneratorStub(self.channel)

    async def stream(self, request: pb.GenerateRequest, timeout: float | None = None,
                     retries: int = RETRIES) -> AsyncIterator[pb.GenerateResponse]:
        state = Resumer(request, timeout, retries)
        current = request
        while True:
            try:
                async for chunk in self.stub.GenerateStream(current, timeout=state.remaining(),
                                                            metadata=self.metadata):
                    yield state.on_chunk(chunk)
                return
            except grpc.RpcError as e:
                if state.finished:
                    return
                await asyncio.sleep(state.retry_after(e))
                current = state.next_request()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def completion_json(responses: list[pb.GenerateResponse]) -> dict:
    """The same object `raymoe run --json` prints, from a unary response or a stream's chunks."""
    out = {"prompt_ids": list(responses[0].prompt_token_ids) if responses else [],
           "token_ids": [t for r in responses for t in r.token_ids],
           "logprobs": [lp for r in responses for lp in r.logprobs],
           "text": "".join(r.text for r in responses),
           "finish_reason": responses[-1].finish_reason if responses else None,
           # prompt tokens the server found in its prefix cache (every chunk carries the count)
           "cached_prompt_tokens": max((r.usage.cached_prompt_tokens for r in responses), default=0)}
    calls = [c for r in responses for c in r.tool_calls]
    if calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    top = [row for r in responses for row in r.top_logprobs]
    if top:
        out["top_logprobs"] = [[{"token_id": a.token_id, "logprob": a.logprob} for a in row.alternatives]
                               for row in top]
    return out
