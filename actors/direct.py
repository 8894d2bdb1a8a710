"""The direct transport: layer calls to an expert actor over one TCP connection per caller process.

Ray starts, places, names, watches and restarts the expert actors and carries their control calls
(`direct_endpoint`, `stats`); the data of a layer call — the `pack()` payload out, the [n, D]
partial sum back — can instead go over a plain socket that the actor listens on. An actor call
through Ray costs ≈0.8 ms of round trip and more of CPU on a 2-core machine (task submission,
scheduling, the object store for results); a socket round trip of the same bytes costs tens of
microseconds, which is what a decode step on fast experts (GPUs) needs. See docs/transport.md for
the measurements and the failure behaviour.

Frames (little-endian): a request is header (body bytes, call id, layer) + body (`pack()` bytes); a
reply is header (body bytes, call id, the actor's compute time in µs, or -1 for an error) + body
(the result, or the error's UTF-8 text). A connection starts with the actor's 16-byte token, which only Ray hands out (through
`direct_endpoint`), so nobody who merely reaches the port can use it; a new actor process has a new
token, which is how a caller tells a restarted actor from a slow one.

Each connection has a reader thread (so a caller's sends never wait on our replies: micro-batches
put two requests on one connection before reading either reply) and a worker thread that computes
and replies in order. Several front replicas each have their own connection: nobody waits for
anybody else's step.
"""

from __future__ import annotations

import hmac
import os
import queue
import select
import socket
import struct
import threading
from typing import Callable

import numpy as np

HEADER = struct.Struct("<QIi")  # body bytes, call id, layer (request) / compute µs or FAILED (reply)
TOKEN_BYTES = 16
FAILED = -1
FRAME_TIMEOUT_S = 30.0  # for the rest of a frame once its first bytes arrived

Handler = Callable[[int, np.ndarray], tuple[np.ndarray, float]]  # (layer, payload) → (result, compute s)


class ConnectionLost(ConnectionError):
    """The peer closed the connection or the socket failed."""


def recv_exactly(sock: socket.socket, n: int) -> np.ndarray:
    buf = np.empty(n, dtype=np.uint8)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionLost("connection closed by peer")
        got += k
    return buf


def send_frame(sock: socket.socket, a: int, b: int, body: np.ndarray | bytes) -> None:
    """Header and body in one system call where the kernel takes them at once (no concatenation)."""
    parts = [memoryview(HEADER.pack(len(body) if isinstance(body, bytes) else body.nbytes, a, b)),
             memoryview(body).cast("B")]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def recv_frame(sock: socket.socket) -> tuple[int, int, np.ndarray]:
    n, a, b = HEADER.unpack(recv_exactly(sock, HEADER.size).tobytes())
    return a, b, recv_exactly(sock, n)


class DirectServer:
    """Inside the expert actor: listens on the node's address, serves each connection on its own
    threads. `handler` is the actor's layer computation (the same one its Ray method runs)."""

    def __init__(self, handler: Handler, host: str) -> None:
        self.handler, self.token = handler, os.urandom(TOKEN_BYTES)
        self.sock = socket.create_server((host, 0), backlog=64)
        self.host, self.port = host, self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="raymoe-direct-accept", daemon=True).start()

    def endpoint(self) -> tuple[str, int, bytes]:
        return self.host, self.port, self.token

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="raymoe-direct-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if not hmac.compare_digest(recv_exactly(conn, TOKEN_BYTES).tobytes(), self.token):
                conn.close()
                return
        except (OSError, ConnectionLost):
            conn.close()
            return
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, args=(conn, inbox), name="raymoe-direct-work", daemon=True).start()
        try:
            while True:
                inbox.put(recv_frame(conn))
        except (OSError, ConnectionLost):
            inbox.put(None)

    def _work(self, conn: socket.socket, inbox: queue.SimpleQueue) -> None:
        try:
            while (item := inbox.get()) is not None:
                call_id, layer, payload = item
                try:
                    reply, seconds = self.handler(layer, payload)
                    status = min(int(seconds * 1e6), 2**31 - 1)
                except Exception as e:  # noqa: BLE001 — the caller raises it; this connection lives on
                    reply, status = f"{type(e).__name__}: {e}".encode(), FAILED
                send_frame(conn, call_id, status, reply)
        except OSError:
            pass
        finally:
            conn.close()


class DirectChannel:
    """The caller's end of one connection. Not thread-safe: one engine thread uses it."""

    def __init__(self, endpoint: tuple[str, int, bytes], timeout_s: float) -> None:
        host, port, self.token = endpoint
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(self.token)
        self.replies: dict[int, tuple[int, np.ndarray]] = {}  # received ahead of their caller
        self.broken = False

    def send(self, call_id: int, layer: int, payload: np.ndarray) -> None:
        try:
            send_frame(self.sock, call_id, layer, payload)
        except OSError as e:
            self.broken = True
            raise ConnectionLost(str(e)) from None

    def recv(self, call_id: int, timeout_s: float) -> tuple[np.ndarray, float]:
        """The reply to `call_id` and the actor's compute seconds. TimeoutError when no frame started within `timeout_s` (the
        connection stays usable); ConnectionLost when it broke (also mid-frame); RuntimeError
        carrying the actor's error."""
        while call_id not in self.replies:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
            if not ready:
                raise TimeoutError(f"no reply within {timeout_s:g} s")
            self.sock.settimeout(FRAME_TIMEOUT_S)  # the rest of a frame whose first bytes came
            try:
                got, status, body = recv_frame(self.sock)
            except (OSError, ConnectionLost) as e:
                self.broken = True
                raise ConnectionLost(str(e)) from None
            self.replies[got] = (status, body)
        status, body = self.replies.pop(call_id)
        if status == FAILED:
            raise RuntimeError(body.tobytes().decode(errors="replace"))
        return body, status / 1e6

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass
