"""The front deployment: gRPC methods (named as the RPCs) over the engine loop.

Each method is thin: proto → domain (cluster/protocol.py), call, domain → proto. Errors become a
gRPC status with a message the client can act on; no traceback text ever reaches the client, and
a bad request never harms the replica or other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import AsyncIterator

from grpc_health.v1 import health_pb2

from raymoe.model.chat import ChatTemplate
from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GrammarCache
from raymoe.protos import generator_pb2 as pb

from . import protocol
from .auth import grpc_tenant
from .direct_ingress import ENV as DIRECT_INGRESS_ENV
from .direct_ingress import endpoints
from .failures import Unauthenticated, classify
from .openai_api import OpenAIRoutes
from .placement_api import ExpertsRoutes
from .quota import QuotaGate, close_lease
from .replica import PoolHealth, actor_infos, build_engine_loop
from .settings import DEPLOYMENT_NAME, ServeSettings
from .tenants import Tenants


def _calls(req, text: str) -> list[dict] | None:
    """The tool calls an answer makes, when the request offered tools."""
    from .tools import read_calls

    return read_calls(text) if req.tools.active else None


class StreamFailed(Exception):
    """Ends a stream whose status code has been set on the gRPC context."""


def _client_text(error: BaseException) -> str:
    """An error's first line without file paths or addresses (the whole is in the replica's log)."""
    import re

    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    line = re.sub(r"(?:/[\w.@+-]+){2,}/?", "<path>", line)
    return re.sub(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b", "<address>", line)


class Generator(OpenAIRoutes, ExpertsRoutes):
    """The front deployment: these gRPC methods, the Experts service's and the OpenAI-compatible
    HTTP routes it inherits."""

    def __init__(self, settings: dict) -> None:
        self.settings = ServeSettings.from_dict(settings)
        self.limits = self.settings.request_limits()
        self.tenants = Tenants(self.settings.tenants_file)  # a bad file or key: the replica fails to start
        self.loop, self.info = build_engine_loop(self.settings)
        self.quota = QuotaGate(self.settings.app_name, lease_s=self.settings.request_timeout_s + 60,
                               metrics=self.loop.metrics)
        if self.settings.ready_when_loaded or self.info["replacing"]:  # up for Serve only once it serves
            self.loop.wait_loaded()  # raises why the experts could not load: the replica fails to start
        # An actor that misses pings for this long (restarts take a few seconds) makes Check NOT_SERVING.
        self.pool_health = PoolHealth(self.info["pool"], stale_s=min(15.0, self.settings.expert_timeout_s))
        self.tokenizer = self.loop.tokenizer
        self.cfg = self.loop.engine.cfg
        self.chat = ChatTemplate.from_dir(self.info["checkpoint"]) if self.tokenizer is not None else None
        self.grammars = None if self.tokenizer is None else GrammarCache(
            self.tokenizer, self.cfg.vocab_size, self.cfg.eos_token_ids, self.settings.guided_limits())
        # what /v1/models and ModelInfo show and requests name: never the checkpoint's path
        self.model_id = self.settings.served_model_name or Path(self.info["checkpoint"]).name
        self.created = int(time.time())
        self._direct_cache: tuple[float, list[str]] = (float("-inf"), [])  # (when, the replicas' own gRPC ports)
        if self.settings.direct_ingress and os.environ.get(DIRECT_INGRESS_ENV) != "1":
            logging.getLogger("ray.serve").warning(
                "direct_ingress is set, but this node was started without %s=1: the replica serves only "
                "through the proxy", DIRECT_INGRESS_ENV)
        self._self_handle = None  # to this deployment, through the prefix-aware router (made on first use)
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def _parse(self, request: pb.GenerateRequest, grpc_context):
        """(the request, its Owner: the tenant's share and quota lease, which the caller closes)."""
        tenant = grpc_tenant(self.tenants, grpc_context)
        await self.quota.refuse_early(tenant)  # before parsing: an over-limit tenant's refusal stays cheap
        # Tokenizing a long prompt takes a while: never on the event loop other streams share.
        req = await asyncio.to_thread(protocol.parse_request, request, self.cfg, self.limits, self.tokenizer,
                                      self.grammars)
        left = req.params.max_tokens - len(req.resume_ids)  # a resumed request pays for what is left
        owner = await self.quota.owner(tenant, 1, len(req.prompt_ids) + left, left)
        return req, owner

    def generate(self, prompt_ids: list[int], params, stop: list[str], resume_ids: list[int] = (),
                 resume_text_bytes: int = 0, owner=None, cache_salt: bytes = b"") -> AsyncIterator:
        """Where every door runs a sequence (EngineLoop.generate's chunks): on this replica, or with
        prefix routing on another replica that holds a longer prefix of it (cluster/prefix_router.py)."""
        target, hashes = self._prefix_holder(list(prompt_ids) + list(resume_ids), cache_salt)
        if target is None:
            return self.loop.generate(prompt_ids, params, stop, resume_ids, resume_text_bytes, owner, cache_salt)
        from .prefix_router import RoutedRequest

        return self._forward(RoutedRequest(list(prompt_ids), params, list(stop), list(resume_ids), resume_text_bytes,
                                           cache_salt, hashes, door=self.replica_id, target=target), owner)

    def _prefix_holder(self, tokens: list[int], cache_salt: bytes) -> tuple[str | None, list[int]]:
        """(the other replica to run these tokens on, their block hashes), or (None, _): here. Cold
        prompts stay at the door Serve's proxy chose by load; a prefix this replica holds too."""
        if not self.settings.routes_by_prefix():
            return None, []
        from raymoe.model.prefix_cache import extend_hashes

        from .prefix_router import local_router, short_hash

        router = local_router(self.settings.app_name, DEPLOYMENT_NAME)
        if router is None:  # the handle's router appears once Serve has sent it the deployment
            self._routing_handle()
            return None, []
        full: list = []
        extend_hashes(full, tokens[:len(tokens) - 1], self.loop.engine.cache.block_size, cache_salt)
        here = len(self.loop.engine.cache.pool.match(full, len(full)))  # exact: this replica's own cache
        hashes = [short_hash(h) for h in full]
        return router.holder_elsewhere(hashes, self.replica_id, here), hashes

    def _routing_handle(self):
        from ray import serve

        if self._self_handle is None:
            self._self_handle = serve.get_deployment_handle(DEPLOYMENT_NAME, self.settings.app_name).options(
                method_name="routed_generate", stream=True)
            self._self_handle._init_router()  # noqa: SLF001 — builds its router now, not at the first forward
        return self._self_handle

    async def _forward(self, routed, owner=None) -> AsyncIterator:
        from raymoe.actors.errors import remote_cause

        response = self._routing_handle().remote(routed)
        finished, generated = False, 0
        try:
            async for chunk in response:
                finished = chunk.finish_reason is not None
                generated = chunk.completion_tokens - len(routed.resume_ids)
                yield chunk
        except Exception as e:  # noqa: BLE001 — the engine's own error, out of Ray's wrapper
            finished = True
            raise remote_cause(e) from None
        finally:
            if not finished:  # the client left: the sequence ends where it runs
                response.cancel()
            if owner is not None:  # the tenant's lease hears what the sequence generated, as locally
                owner.finished(max(0, generated), self.loop.metrics)

    async def routed_generate(self, routed) -> AsyncIterator:
        """A sequence a door (maybe on another replica) sent here through the prefix-aware router."""
        async with contextlib.aclosing(self.loop.generate(routed.prompt_ids, routed.params, routed.stop,
                                                          routed.resume_ids, routed.resume_text_bytes,
                                                          cache_salt=routed.cache_salt)) as stream:
            async for chunk in stream:
                yield chunk

    async def record_routing_stats(self) -> dict:
        """Polled by Serve's controller (request_router_config): the hashes of this replica's cached
        blocks for the routers, and its counters, also published for `raymoe status`."""
        from .prefix_router import publish_counters, routing_stats

        if self.settings.routes_by_prefix():
            self._routing_handle()  # the door's router learns the replicas before the first request
        stats = routing_stats(self.loop.engine)
        await asyncio.to_thread(publish_counters, self.settings.app_name, self.replica_id, stats["prefix_cache"])
        return stats

    def cache_salt(self, tenant: str, request_salt: str) -> bytes:
        """The prefix cache's salt of a request, the same through both doors: the caller's tenant
        (named by its key: tenants never share cached blocks, so none can time another's prompts)
        and the request's own cache_salt."""
        from raymoe.model.prefix_cache import salt_bytes

        return salt_bytes(tenant, request_salt)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        chunks, owner = [], None
        try:
            req, owner = await self._parse(request, grpc_context)
            async with contextlib.aclosing(self.generate(req.prompt_ids, req.params, req.stop, req.resume_ids,
                                                         req.resume_text_bytes, owner,
                                                         self.cache_salt(owner.tenant, req.cache_salt))) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
        except asyncio.CancelledError:
            self._count("cancelled")
            raise
        except Exception as e:  # noqa: BLE001 — every failure becomes a status
            return self._fail(grpc_context, e, pb.GenerateResponse())
        finally:
            close_lease(owner)
        self._count("ok")
        whole = protocol.merge_chunks(chunks)
        return protocol.chunk_response(whole, req.prompt_ids, req.params.logprobs > 0, req.params.seed,
                                       _calls(req, whole.text))

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        owner = None
        try:
            req, owner = await self._parse(request, grpc_context)
            first = True
            # aclosing: a client gone mid-stream aborts the sequence now, not when the GC gets to it
            async with contextlib.aclosing(self.generate(req.prompt_ids, req.params, req.stop, req.resume_ids,
                                                         req.resume_text_bytes, owner,
                                                         self.cache_salt(owner.tenant, req.cache_salt))) as stream:
                text = []
                async for chunk in stream:
                    text.append(chunk.text)
                    calls = _calls(req, "".join(text)) if chunk.finish_reason else None
                    yield protocol.chunk_response(chunk, req.prompt_ids if first else None, req.params.logprobs > 0,
                                                  req.params.seed if first else None, calls)
                    first = False
        except (asyncio.CancelledError, GeneratorExit):
            self._count("cancelled")
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(grpc_context, e, None)
            # A stream carries its status only when it ends in an exception; the code and details set
            # above are what the client sees (Serve keeps a status set before the raise).
            raise StreamFailed(str(grpc_context.details() if grpc_context else e)) from None
        finally:
            close_lease(owner)
        self._count("ok")

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        try:
            grpc_tenant(self.tenants, grpc_context)
        except Unauthenticated as e:
            return self._fail(grpc_context, e, pb.TokenizeResponse())
        if self.tokenizer is None:
            return self._fail(grpc_context, InvalidRequest("this model has no tokenizer", "text"),
                              pb.TokenizeResponse())
        if len(request.text) > 64 * self.cfg.max_position_embeddings:
            return self._fail(grpc_context, InvalidRequest(f"text is too long ({len(request.text)} characters)",
                                                           "text"), pb.TokenizeResponse())
        def tokenize() -> pb.TokenizeResponse:  # a long text's answer takes a while: off the event loop
            ids = self.tokenizer.encode(request.text, bos=request.add_bos)
            return pb.TokenizeResponse(token_ids=ids, pieces=[self.tokenizer.piece(i) for i in ids])

        return await asyncio.to_thread(tokenize)

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfoResponse:
        try:
            grpc_tenant(self.tenants, grpc_context)
        except Unauthenticated as e:
            return self._fail(grpc_context, e, pb.ModelInfoResponse())
        engine = self.loop.engine
        actors = await actor_infos(self.info["pool"])
        prefix_cache, replicas = await self._prefix_cache_stats()
        return pb.ModelInfoResponse(
            model=self.model_id, config=protocol.config_message(engine.cfg, self.info["dtype"]),
            expert_actors=[pb.ExpertActorInfo(**a) for a in actors],
            max_batch_tokens=engine.max_batch_tokens, max_running=engine.max_running,
            kv_cache_tokens=engine.cache.capacity_tokens,
            load=pb.Load(running=self.loop.num_running, waiting=self.loop.num_waiting,
                         kv_cache_used_tokens=engine.cache.used_blocks * engine.cache.block_size),
            routing=[pb.LayerRouting(layer=i, tokens_per_expert=row) for i, row in enumerate(self._routing())],
            expert_calls=self._expert_calls(), state=self._state(),
            load_error="" if self.loop.load_error is None else _client_text(self.loop.load_error),
            quantization=self.info.get("quantization", ""), prefix_cache=prefix_cache,
            replica_prefix_caches=replicas, direct_grpc_targets=await self._direct_targets())

    async def _direct_targets(self) -> list[str]:
        """The replicas' own gRPC endpoints (direct ingress; cluster/direct_ingress.py), asked of
        Serve's controller at most every 5 s and within 2 s (else the last answer)."""
        if not self.settings.direct_ingress:
            return []
        when, targets = self._direct_cache
        if time.monotonic() - when < 5.0:
            return targets
        s = self.settings
        try:
            found = await asyncio.wait_for(asyncio.to_thread(endpoints, s.app_name, (s.grpc_port, s.http_port)), 2.0)
            targets = list(found.grpc)
        except Exception:  # noqa: BLE001 — a slow or restarting controller: ModelInfo still answers
            pass
        self._direct_cache = (time.monotonic(), targets)
        return targets

    async def _prefix_cache_stats(self):
        """(this replica's prefix cache counters, every replica's as last published)."""
        from .prefix_router import cache_counters, publish_counters, published_counters

        own = {**cache_counters(self.loop.engine), "replica": self.replica_id}
        app = self.settings.app_name
        try:
            # bounded: ModelInfo (raymoe status, health tooling) must answer even if the GCS is slow
            await asyncio.wait_for(asyncio.to_thread(publish_counters, app, self.replica_id, own), 2.0)
            others = await asyncio.wait_for(asyncio.to_thread(published_counters, app), 2.0)
        except Exception as e:  # noqa: BLE001 — the GCS unreachable: this replica's own numbers still answer
            logging.getLogger("ray.serve").warning("prefix cache stats: %s", e)
            others = [{**own, "age_seconds": 0.0}]
        return pb.PrefixCacheStats(**own), [pb.PrefixCacheStats(**o) for o in others]

    def _state(self) -> str:
        return "FAILED" if self.loop.load_error is not None else "LOADING" if self.loop.loading else "READY"

    def _expert_calls(self) -> pb.ExpertCalls | None:
        pool = self.info["pool"]
        if pool is None:
            return None
        m = pool.metrics
        return pb.ExpertCalls(layer_calls=m.layer_calls, wall_seconds=m.layer_wall_s,
                              slowest_compute_seconds=m.slowest_compute_s, transport=pool.config.transport)

    def _routing(self) -> list[list[int]]:
        m = self.loop.metrics
        return [] if m is None else m.counts.tolist()

    def _count(self, status: str) -> None:
        if self.loop.metrics is not None:
            self.loop.metrics.requests.inc(tags={"status": status})

    def check_health(self) -> None:
        """Serve's own health check: a replica whose engine thread died (or whose experts could not
        be loaded) is replaced."""
        if self.loop.load_error is not None:
            raise RuntimeError(f"the expert actors could not load: {self.loop.load_error}")
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    async def settings_dict(self) -> dict:
        """The settings this replica runs with (deploy rolls a failed replacement back to them)."""
        return self.settings.to_dict()

    async def wait_loaded(self) -> None:
        """Return once this replica serves (its expert actors loaded); raise why they could not."""
        await asyncio.to_thread(self.loop.wait_loaded)

    @property
    def serving(self) -> bool:
        """Loaded, stepping, and every expert actor answering (the health checks' SERVING)."""
        return self.loop.alive and not self.loop.loading and self.pool_health.ok

    async def Check(self, request, grpc_context=None):
        serving = self.serving  # NOT_SERVING while loading, or while its experts do not answer
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
        health = getattr(self, "pool_health", None)
        if health is not None:
            health.stop()
        if getattr(self, "replica_id", None):
            import contextlib

            from .prefix_router import unpublish_counters

            with contextlib.suppress(Exception):  # a replica going away: its numbers leave raymoe status
                unpublish_counters(self.settings.app_name, self.replica_id)

    def _fail(self, grpc_context, error: BaseException, response):
        failure = classify(error)
        self._count(failure.grpc_code.name.lower())
        if grpc_context is not None:
            grpc_context.set_code(failure.grpc_code)
            grpc_context.set_details(failure.message)
            if failure.retry_after_s is not None:
                grpc_context.set_trailing_metadata([("retry-after", str(failure.retry_after_s))])
        return response
