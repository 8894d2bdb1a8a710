"""The direct transport's two ends on loopback, without Ray: frames, errors, and the queueing an
actor measures (the expert autoscaling signal beside busy time)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from raymoe.actors.direct import ConnectionLost, DirectChannel, DirectServer


def slow_double(layer: int, payload: np.ndarray):
    if layer < 0:
        raise ValueError("no such layer")
    time.sleep(0.2)
    return payload * 2, 0.2


def test_calls_behind_a_callers_earlier_call_count_as_queued():
    server = DirectServer(slow_double, "127.0.0.1")
    channel = DirectChannel(server.endpoint(), timeout_s=5)
    try:
        a, b = np.arange(8, dtype=np.uint8), np.arange(8, 16, dtype=np.uint8)
        channel.send(1, 0, a)
        channel.send(2, 0, b)  # a micro-batch pipelined behind the first: it waits ~0.2 s in the actor
        out_b, secs = channel.recv(2, timeout_s=5)
        out_a, _ = channel.recv(1, timeout_s=5)
        assert out_a.tolist() == (a * 2).tolist() and out_b.tolist() == (b * 2).tolist() and secs == 0.2
        assert 0.15 <= server.queued_s <= 1.0
        channel.send(3, -1, a)
        with pytest.raises(RuntimeError, match="no such layer"):
            channel.recv(3, timeout_s=5)
        channel.send(4, 0, a)  # the connection lives on after a failed call
        assert channel.recv(4, timeout_s=5)[0].tolist() == (a * 2).tolist()
    finally:
        channel.close()
        server.close()


def test_an_abandoned_calls_reply_is_dropped_whenever_it_comes():
    server = DirectServer(slow_double, "127.0.0.1")
    channel = DirectChannel(server.endpoint(), timeout_s=5)
    try:
        a = np.arange(4, dtype=np.uint8)
        for call_id in (1, 2, 3):
            channel.send(call_id, 0, a)
        channel.abandon(1)  # before its reply came
        assert channel.recv(3, timeout_s=5)[0].tolist() == (a * 2).tolist()  # 1 and 2 arrived meanwhile
        channel.abandon(2)  # after its reply came
        assert channel.replies == {} and channel.abandoned == set()
    finally:
        channel.close()
        server.close()


def test_strangers_sockets_hold_no_callers_slot_and_no_handshake_outlives_its_deadline(monkeypatch):
    """Sockets that never send the token (or trickle it a byte at a time) take at most
    MAX_UNAUTHENTICATED places, each only until the one handshake deadline; a caller with the
    token connects and is served meanwhile."""
    import socket

    from raymoe.actors import direct

    monkeypatch.setattr(direct, "HANDSHAKE_TIMEOUT_S", 1.5)
    server = DirectServer(slow_double, "127.0.0.1")
    host, port, _ = server.endpoint()
    strangers = [socket.create_connection((host, port)) for _ in range(3 * direct.MAX_UNAUTHENTICATED)]
    try:
        time.sleep(0.3)
        assert server.unauthenticated <= direct.MAX_UNAUTHENTICATED
        trickler = strangers[0]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # one byte every 0.2 s: a per-recv timeout would never fire
            try:
                trickler.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        assert time.monotonic() - t0 < 2.9  # the server closed it at the deadline
        channel = DirectChannel(server.endpoint(), timeout_s=5)
        a = np.arange(8, dtype=np.uint8)
        channel.send(1, 0, a)
        assert channel.recv(1, timeout_s=5)[0].tolist() == (a * 2).tolist()
        channel.close()
        assert server.unauthenticated == 0
    finally:
        for s in strangers:
            s.close()
        server.close()


def test_a_closed_server_ends_its_connections_and_threads():
    """close() stops the listener and every connection: the caller's wait raises ConnectionLost,
    a new caller is refused, and the server's threads are gone (the other tests here close theirs)."""
    import threading

    def serving_threads():
        return [t for t in threading.enumerate() if t.name.startswith("raymoe-direct")]

    server = DirectServer(slow_double, "127.0.0.1")
    channel = DirectChannel(server.endpoint(), timeout_s=5)
    try:
        channel.send(1, 0, np.arange(4, dtype=np.uint8))
        assert channel.recv(1, timeout_s=5)[0].tolist() == [0, 2, 4, 6]
        server.close()
        with pytest.raises(ConnectionLost):
            channel.recv(2, timeout_s=5)
        with pytest.raises(OSError):
            DirectChannel(server.endpoint(), timeout_s=1)
        deadline = time.monotonic() + 5
        while (serving_threads() or server.connections) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert serving_threads() == [] and server.connections == 0
    finally:
        channel.close()
        server.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_layer_calls_are_computed_on_threads_that_do_not_preempt_their_caller():
    """The actor's connection threads run SCHED_BATCH, so a payload that wakes them does not
    preempt the front's engine thread while it is still sending the layer's other payloads; the
    caller's own thread keeps its policy."""
    policies = []

    def record(layer: int, payload: np.ndarray):
        policies.append(os.sched_getscheduler(0))
        return payload, 0.0

    server = DirectServer(record, "127.0.0.1")
    channel = DirectChannel(server.endpoint(), timeout_s=5)
    try:
        channel.send(1, 0, np.arange(4, dtype=np.uint8))
        channel.recv(1, timeout_s=5)
        assert policies == [os.SCHED_BATCH]
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        channel.close()
        server.close()
