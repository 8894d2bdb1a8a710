"""Cache-aware routing across front replicas, through Ray Serve's request-router API.

Serve's proxies hand a request to a front replica before its body is read (HTTP: the body follows
the routing; gRPC: the proto, but not the caller's key, which is part of the prefix cache's salt),
so the replica a request first lands on (the door, chosen by power of two choices) parses it,
tokenizes it and computes its block hashes — the very hashes the engine's prefix cache names its
blocks by. The door asks this module's `PrefixAwareRouter` — the router (request_router_config) of
its handle to its own deployment, in the door's process — whether another replica holds a longer
prefix than the door's own cache (`holder_elsewhere`); if so, and that replica is not much busier,
it runs the sequence there through the handle (`Generator.routed_generate`), which the router sends
to that holder first, then by power of two choices among the other replicas — never back to the
door: a replica streaming to itself through a handle stalled under load (docs/prefix-cache.md).

What a replica holds is known exactly, not guessed from text: each replica reports the hashes of
its cached blocks in its routing stats (`record_routing_stats`, which Serve's controller polls every
`ROUTING_STATS_PERIOD_S` and pushes to every router). Between two reports the router also counts the
hashes of what it sent itself (recent guesses: a report may predate the prefill it would show;
they expire after GUESS_TTL_S). A replica that dies or restarts is dropped from the router's replica set by Serve; its
reported hashes go with it, and a restarted replica reports an empty cache: requests for its old
prefixes fall back to load balancing and warm another cache. Nothing else is lost (requests in
flight on a dead replica fail or resume as they always did).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

from raymoe.model.prefix_cache import BlockHash
from raymoe.model.sampling import SamplingParams

ROUTER_CLASS = "raymoe.cluster.prefix_router.PrefixAwareRouter"
ROUTING_STATS_PERIOD_S = 1.0
GUESS_TTL_S = 30.0
MAX_REPORTED_BLOCKS = 16384  # hashes a replica reports at most (its most recently used cached blocks)


def short_hash(h: BlockHash) -> int:
    """8 bytes of a block hash: what replicas report and routers compare (collisions only cost a
    worse routing choice, never a wrong answer: the engine compares full hashes)."""
    return int.from_bytes(h[:8], "little")


@dataclasses.dataclass
class RoutedRequest:
    """A parsed request, sent by the door replica to the replica the router picks."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    resume_ids: list[int]
    resume_text_bytes: int
    cache_salt: bytes
    route_hashes: list[int]  # short_hash of each full block of prompt + resume_ids, under the salt
    door: str = ""  # the replica (unique id) it entered by: never sent back there through the handle
    target: str = ""  # the replica the door chose (it holds the longest prefix), tried first


def routing_stats(engine) -> dict[str, Any]:
    """What a replica reports: its cached blocks' short hashes and its prefix cache counters."""
    pool = engine.cache.pool
    return {"blocks": [short_hash(h) for h in pool.cached_hashes(MAX_REPORTED_BLOCKS)],
            "prefix_cache": cache_counters(engine)}


def cache_counters(engine) -> dict[str, Any]:
    pool = engine.cache.pool
    return {"enabled": pool.enabled, "query_tokens": pool.queries_tokens, "hit_tokens": pool.hits_tokens,
            "cached_blocks": pool.num_cached, "evictions": pool.evictions}


STATS_MAX_AGE_S = 60.0  # published numbers older than this are a replica that is gone


def _stats_key(app_name: str, replica: str = "") -> str:
    return f"raymoe:{app_name}:prefix-cache:{replica}"


def publish_counters(app_name: str, replica: str, counters: dict[str, Any]) -> None:
    """Each replica's counters in Ray's GCS key-value store, where any replica answering ModelInfo
    (`raymoe status`) finds every replica's."""
    import json

    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_stats_key(app_name, replica),  # noqa: SLF001
                                 json.dumps({**counters, "replica": replica, "at": time.time()}).encode(),
                                 overwrite=True)


def unpublish_counters(app_name: str, replica: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_stats_key(app_name, replica))  # noqa: SLF001


def published_counters(app_name: str) -> list[dict[str, Any]]:
    """Every replica's last published counters (age_seconds added), those of live replicas only."""
    import json

    from ray.experimental import internal_kv

    out, now = [], time.time()
    for key in internal_kv._internal_kv_list(_stats_key(app_name)):  # noqa: SLF001
        raw = internal_kv._internal_kv_get(key)  # noqa: SLF001
        if raw is None:
            continue
        entry = json.loads(raw)
        entry["age_seconds"] = max(0.0, now - entry.pop("at", now))
        if entry["age_seconds"] < STATS_MAX_AGE_S:
            out.append(entry)
    return sorted(out, key=lambda e: e["replica"])


try:  # the router runs where Serve routes (proxies, handles); importing it needs Serve
    from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
    from ray.serve._private.request_router.request_router import RequestRouter
except ImportError:  # pragma: no cover — Serve's private paths moved: fall back to the default router
    RequestRouter = PowerOfTwoChoicesRequestRouter = None  # type: ignore[assignment,misc]


if RequestRouter is not None:
    class PrefixAwareRouter(PowerOfTwoChoicesRequestRouter):  # type: ignore[misc,valid-type]
        """Prefix holder first, balanced against load; power of two choices otherwise."""

        def initialize_state(self, min_match_blocks: int = 2, imbalanced_threshold: int = 32) -> None:
            """min_match_blocks: a shorter match is not worth a busier replica (load decides);
            imbalanced_threshold: the holder is skipped when it has this many more requests in
            flight than the least busy replica (Serve's count, which includes requests a door is
            relaying: half of the default max_running of 64, where continuous batching still
            serves a few more sequences nearly as fast and a miss on a long prefix costs more)."""
            self.min_match_blocks, self.imbalanced_threshold = min_match_blocks, imbalanced_threshold
            self._reported: dict[Any, tuple[int, frozenset]] = {}  # replica id → (id of its report, as a set)
            self._guessed: dict[Any, dict[int, float]] = {}  # replica id → {hash: when sent}
            self.decisions = {"holder": 0, "balanced": 0}  # for tests and logs
            # Registered in the imported module: Serve may unpickle this class by value, with globals of its own.
            from raymoe.cluster import prefix_router

            prefix_router._LOCAL_ROUTERS[(self._deployment_id.app_name, self._deployment_id.name)] = self

        def _known(self, replica) -> tuple[frozenset, dict[int, float]]:
            blocks = (replica.routing_stats or {}).get("blocks") or []
            cached = self._reported.get(replica.replica_id)
            if cached is None or cached[0] != id(blocks):
                cached = (id(blocks), frozenset(blocks))
                self._reported[replica.replica_id] = cached
            return cached[1], self._guessed.get(replica.replica_id, {})

        def _match(self, replica, hashes: list[int]) -> int:
            reported, guessed = self._known(replica)
            now = time.monotonic()
            n = 0
            for h in hashes:
                if h not in reported and now - guessed.get(h, -GUESS_TTL_S) >= GUESS_TTL_S:
                    break
                n += 1
            return n

        def holder_elsewhere(self, hashes: list[int], here: str, here_blocks: int) -> str | None:
            """The replica (unique id) a door should send a sequence to: the one holding a longer
            prefix of `hashes` than the door's own `here_blocks`, unless the match is short or it is
            much busier than the least busy replica; None: run it at the door. Called from the
            door's thread: reads only snapshots of the router's state."""
            if len(hashes) < 1:
                return None
            others = [r for r in list(self._replicas_list) if r.replica_id.unique_id != here]
            matches = {r.replica_id.unique_id: self._match(r, hashes) for r in others}
            best = max(matches.values(), default=0)
            if best <= here_blocks or best < min(self.min_match_blocks, len(hashes)):
                return None
            loads = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) or 0 for r in list(self._replicas_list)}
            lightest = min(loads.values(), default=0)
            holders = [r for r in others if matches[r.replica_id.unique_id] == best
                       and loads.get(r.replica_id, 0) - lightest <= self.imbalanced_threshold]
            if not holders:
                self.decisions["balanced"] += 1
                return None
            self.decisions["holder"] += 1
            return random.choice(holders).replica_id.unique_id

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            """The door's choice first (`RoutedRequest.target`), then power of two choices among
            the others — never the door itself while another replica is up: a replica streaming
            to itself through a handle can stall (see docs/prefix-cache.md)."""
            fallback = await super().choose_replicas(candidate_replicas, pending_request)
            routed = _routed(pending_request)
            if routed is None or not routed.door:
                return fallback
            elsewhere = [[r for r in rank if r.replica_id.unique_id != routed.door] for rank in fallback]
            elsewhere = [rank for rank in elsewhere if rank]
            if not elsewhere:  # P2C drew the door (and maybe it alone): any other replica instead
                elsewhere = [[r for r in candidate_replicas if r.replica_id.unique_id != routed.door]]
                if not elsewhere[0]:  # the door is the only replica left: it serves the request
                    return fallback
            target = [r for r in candidate_replicas if r.replica_id.unique_id == routed.target]
            return ([target] if target else []) + elsewhere

        def on_request_routed(self, pending_request, replica_id, result) -> None:
            routed = _routed(pending_request)
            if routed is not None and routed.route_hashes:
                guessed = self._guessed.setdefault(replica_id, {})
                now = time.monotonic()
                for h in routed.route_hashes:
                    guessed[h] = now
                if len(guessed) > MAX_REPORTED_BLOCKS:  # oldest guesses out
                    for h in sorted(guessed, key=guessed.get)[:len(guessed) - MAX_REPORTED_BLOCKS]:
                        del guessed[h]

        def on_replica_actor_died(self, replica_id) -> None:
            super().on_replica_actor_died(replica_id)
            self._reported.pop(replica_id, None)
            self._guessed.pop(replica_id, None)

        def update_replicas(self, replicas) -> None:
            super().update_replicas(replicas)
            live = {r.replica_id for r in replicas}
            for known in (self._reported, self._guessed):
                for rid in [rid for rid in known if rid not in live]:
                    del known[rid]


_LOCAL_ROUTERS: dict[tuple[str, str], Any] = {}  # (app, deployment) → the router of this process's handle


def local_router(app_name: str, deployment: str):
    """The prefix-aware router of a handle this process made to the deployment (None before one
    exists and Serve has sent it the deployment's config)."""
    return _LOCAL_ROUTERS.get((app_name, deployment))


def _routed(pending_request) -> RoutedRequest | None:
    """The request's RoutedRequest, if it is one. By attribute, not by type: Serve may load the router
    class apart from the module the handle's arguments were built with."""
    args = getattr(pending_request, "args", None) or ()
    return next((a for a in args if isinstance(getattr(a, "route_hashes", None), list)), None)
