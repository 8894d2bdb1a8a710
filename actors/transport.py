"""How a layer call reaches an expert actor: through Ray's object store, or over a direct socket.

Both transports take the same payload (`expert_actor.pack`) and give back the same bytes, so the
numbers cannot depend on the choice; they differ in cost and in how they notice failures:

- `RayCalls` ("ray"): `actor.forward.remote(layer, payload)`, awaited with `ray.get`. Ray retries
  a call whose actor died once the actor has restarted (max_task_retries=-1).
- `DirectCalls` ("direct", the default): one TCP connection per (caller thread, actor), opened
  with the endpoint and token the actor gives through Ray. A broken connection, or a silence after
  which Ray reports a new actor process (a new token), makes it reconnect to the restarted actor
  and send the call again (a layer call is a pure function of its payload, so this is safe).

Either way every wait is bounded by the caller's deadline, and `Unreachable` names the actors that
did not answer; RemoteExperts turns that into ExpertsUnavailable for the layer. A reply carries
the actor's own compute time, so the caller can tell transport from math.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from .direct import ConnectionLost, DirectChannel, ExpertsNotLoaded
from .errors import brief

if TYPE_CHECKING:
    from .actor_group import ActorGroup

from . import TRANSPORTS
Reply = tuple[np.ndarray, float]  # an actor's partial sum (wire bytes) and its compute seconds
STALL_S = 1.0  # a direct call silent this long makes us ask Ray whether its actor is still the same
# A spare call (its experts have other copies) whose actor not even Ray hears from for this long is
# given up (a lost node closes no connection); long enough that a busy 2-core machine is no reason.
SPARE_SILENCE_S = 3.0


class Unreachable(Exception):
    def __init__(self, actors: list[int], reason: str) -> None:
        super().__init__(reason)
        self.actors, self.reason = actors, reason


class RayCalls:
    def __init__(self, group: "ActorGroup") -> None:
        self.group = group

    def submit(self, actor: int, layer: int, payload: np.ndarray, spare: bool = False) -> ray.ObjectRef:
        return self.group.actors[actor].forward_timed.remote(layer, payload)

    def gather(self, calls: list[ray.ObjectRef], actors: list[int], timeout_s: float,
               spare: frozenset = frozenset()) -> list[Reply | None]:
        """The replies in order; None for a call to a `spare` actor that is dead for good (Ray
        retries a restarting actor's call itself, so over Ray a restart is waited for)."""
        if any(a in spare for a in actors):
            return self._gather_each(calls, actors, timeout_s, spare)
        try:
            return ray.get(calls, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            _, late = ray.wait(calls, num_returns=len(calls), timeout=0)
            for r in late:  # best effort: do not leave retries queued behind a dead node forever
                try:
                    ray.cancel(r)
                except Exception:  # noqa: BLE001
                    pass
            raise Unreachable([actors[calls.index(r)] for r in late], f"no answer within {timeout_s:g} s") from None
        except ExpertsNotLoaded as e:  # a RayTaskError wrapping it: alive, but it can never answer
            failed = [a for r, a in zip(calls, actors) if _failed(r)] or list(actors)
            raise Unreachable(failed, brief(e)) from None
        except ray.exceptions.RayActorError as e:  # dead for good, or unreachable without retries
            failed = [a for a in actors if self.group.actor_id(a) == e.actor_id] or \
                [a for r, a in zip(calls, actors) if _failed(r)] or list(actors)
            raise Unreachable(failed, brief(e)) from None


    def _gather_each(self, calls, actors, timeout_s: float, spare: frozenset) -> list[Reply | None]:
        deadline, out = time.monotonic() + timeout_s, []
        for ref, actor in zip(calls, actors):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                late = [a for r, a in zip(calls[len(out):], actors[len(out):]) if not ray.wait([r], timeout=0)[0]]
                raise Unreachable(late or [actor], f"no answer within {timeout_s:g} s") from None
            except (ray.exceptions.RayActorError, ExpertsNotLoaded) as e:
                if actor not in spare:
                    raise Unreachable([actor], brief(e)) from None
                out.append(None)
        return out


def _failed(ref: ray.ObjectRef) -> bool:
    """Whether a finished call raised (calls still running are not counted as failed)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:  # noqa: BLE001
        return True


@dataclasses.dataclass
class DirectCall:
    actor: int
    layer: int
    payload: np.ndarray
    id: int
    channel: DirectChannel | None = None  # where it was sent (None: not yet, or that one broke)
    spare: bool = False  # its experts have other copies: on failure, give up at once (failover)
    lost: bool = False  # it was sent, or about to be, on a connection that broke


class DirectCalls:
    def __init__(self, group: "ActorGroup") -> None:
        self.group = group
        self._local = threading.local()  # channels per caller thread: a channel has one reader
        self._ids = itertools.count()

    def _channels(self) -> dict[int, DirectChannel]:
        if not hasattr(self._local, "channels"):
            self._local.channels = {}
        return self._local.channels

    def submit(self, actor: int, layer: int, payload: np.ndarray, spare: bool = False) -> DirectCall:
        call = DirectCall(actor, layer, payload, next(self._ids) & 0xFFFFFFFF, spare=spare)
        channel = self._channels().get(actor)
        if channel is not None and channel.broken:
            call.lost = True
        elif channel is not None:
            try:
                channel.send(call.id, layer, payload)
                call.channel = channel
            except ConnectionLost:
                call.lost = True  # sent again by `gather` after reconnecting, or failed over if spare
        return call

    def gather(self, calls: list[DirectCall], actors: list[int], timeout_s: float,
               spare: frozenset = frozenset()) -> list[Reply | None]:
        """The replies in order; None for a spare call whose connection broke or whose actor Ray
        reports gone or new (its pairs can go to the other copies at once)."""
        deadline = time.monotonic() + timeout_s
        for call in calls:  # every call is on the wire before we wait for the first
            if call.spare and (call.lost or (call.channel is not None and call.channel.broken)):
                self._drop(call.actor, call.channel)
                call.channel, call.lost = None, True
                continue
            try:
                self._send(call, deadline, timeout_s)
            except Unreachable:
                if not call.spare:
                    _abandon(c for c in calls if c is not call)
                    raise
                call.lost = True  # Ray says the actor is gone: its copies take the pairs
        replies: list[Reply | None] = []
        for call in calls:
            if call.spare and call.lost:
                replies.append(None)
                continue
            try:
                replies.append(self._result(call, deadline, timeout_s))
            except Unreachable as e:
                if e.reason.startswith("no answer"):  # the deadline passed: name every call still open
                    late = [c.actor for c in calls[len(replies) + 1:] if not self._answered(c)]
                    _abandon(calls[len(replies) + 1:])  # replies that came will not be asked for either
                    for a in late:  # their late replies must not pile up on a kept channel
                        self._drop(a, self._channels().get(a))
                    raise Unreachable(sorted(set(late) | {call.actor}), e.reason) from None
                _abandon(calls[len(replies) + 1:])  # the caller sends these pairs again, elsewhere
                raise
        return replies

    def _answered(self, call: DirectCall) -> bool:
        """Whether the call's reply has arrived, without waiting (used once the deadline passed)."""
        channel = call.channel
        if channel is None or channel.broken:
            return False
        if call.id in channel.replies:
            return True
        try:
            channel.recv(call.id, 0.0)
            return True
        except Exception:  # noqa: BLE001 — not arrived, or the channel broke
            return False

    def _send(self, call: DirectCall, deadline: float, timeout_s: float) -> None:
        if call.channel is not None and call.channel.broken:  # sent on a channel that broke since
            call.channel = None
        while call.channel is None:
            channel = self._connect(call.actor, deadline, timeout_s)
            try:
                channel.send(call.id, call.layer, call.payload)
                call.channel = channel
            except ConnectionLost:
                self._drop(call.actor, channel)

    def _result(self, call: DirectCall, deadline: float, timeout_s: float) -> Reply | None:
        """The call's reply; for a spare call, None as soon as its actor is known gone or new."""
        probe, probed, asked = None, None, 0.0  # an outstanding "who are you now?", its channel, when
        while True:
            try:
                self._send(call, deadline, timeout_s)
            except Unreachable:
                if call.spare:
                    return None
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unreachable([call.actor], f"no answer within {timeout_s:g} s")
            channel = call.channel
            try:
                return channel.recv(call.id, min(remaining, STALL_S), frame_timeout_s=remaining)
            except ConnectionLost:  # the actor (or its node) went away: reconnect to its successor
                self._drop(call.actor, channel)
                call.channel = None
                if call.spare:
                    return None
            except ExpertsNotLoaded as e:  # alive, but it can never answer: its experts are unavailable
                if call.spare:
                    return None
                raise Unreachable([call.actor], str(e)) from None
            except TimeoutError:  # busy, or gone without closing the connection (a lost node)?
                if probe is None or probed is not channel:
                    probe, probed = self.group.actors[call.actor].direct_endpoint.remote(), channel
                    asked = time.monotonic()
                ready, _ = ray.wait([probe], timeout=0)
                if ready:
                    try:
                        endpoint = self._endpoint(probe, call.actor, 0, timeout_s)
                    except Unreachable:
                        if call.spare:
                            return None
                        raise
                    probe = None
                    if endpoint[2] != channel.token:  # a new process: the call died with the old one
                        self._drop(call.actor, channel)
                        call.channel = None
                        if call.spare:
                            return None
                elif call.spare and time.monotonic() - asked > SPARE_SILENCE_S:  # not even Ray hears from it
                    self._drop(call.actor, channel)
                    call.channel = None
                    return None

    def _connect(self, actor: int, deadline: float, timeout_s: float) -> DirectChannel:
        channels = self._channels()
        if actor in channels and not channels[actor].broken:
            return channels[actor]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unreachable([actor], f"no answer within {timeout_s:g} s")
            endpoint = self._endpoint(self.group.actors[actor].direct_endpoint.remote(), actor, remaining, timeout_s)
            try:
                channels[actor] = DirectChannel(endpoint, timeout_s=min(remaining, 10.0))
                return channels[actor]
            except OSError:  # it died between answering and our connect: ask again
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _endpoint(self, ref: ray.ObjectRef, actor: int, wait_s: float, timeout_s: float) -> Any:
        """Ray's answer to direct_endpoint (it waits for a restarting actor; retried by Ray)."""
        try:
            return ray.get(ref, timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            raise Unreachable([actor], f"no answer within {timeout_s:g} s") from None
        except ray.exceptions.RayActorError as e:
            raise Unreachable([actor], brief(e)) from None

    def _drop(self, actor: int, channel: DirectChannel | None) -> None:
        """Close `channel` (and forget it, if it is still this thread's channel to `actor`)."""
        if channel is None:
            return
        channels = self._channels()
        if channels.get(actor) is channel:
            del channels[actor]
        channel.close()


def _abandon(calls) -> None:
    """The replies of these direct calls will not be asked for: their channels drop them."""
    for c in calls:
        if c.channel is not None and not c.channel.broken:
            c.channel.abandon(c.id)


def make_transport(name: str, group: "ActorGroup") -> RayCalls | DirectCalls:
    if name not in TRANSPORTS:
        raise ValueError(f"expert transport must be one of {', '.join(TRANSPORTS)} (got {name!r})")
    return DirectCalls(group) if name == "direct" else RayCalls(group)
