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
import time
from typing import Callable

import numpy as np

HEADER = struct.Struct("<QIi")  # body bytes, call id, layer (request) / compute µs or FAILED (reply)
TOKEN_BYTES = 16
FAILED, NOT_LOADED = -1, -2  # reply statuses: the call raised; the actor could not load its experts
FRAME_TIMEOUT_S = 30.0  # for the rest of a frame once its first bytes arrived
MAX_FRAME = 1 << 30  # a layer call's payload is tens of MB at most (2048 tokens × 4096 × 2 bytes)
HANDSHAKE_TIMEOUT_S = 5.0  # from accept to the whole token, however slowly its bytes trickle in
MAX_CONNECTIONS = 512  # per actor: front replica threads, each with one connection
# Connections that have not sent their token yet: a caller of ours sends it at once, so a few are
# plenty, and a stranger opening sockets can hold at most these (each for HANDSHAKE_TIMEOUT_S),
# never a slot of an authenticated caller.
MAX_UNAUTHENTICATED = 16


class ExpertsNotLoaded(RuntimeError):
    """The actor is alive but could not load its experts (its calls can never succeed)."""

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


def recv_by(sock: socket.socket, n: int, deadline: float) -> bytes:
    """n bytes, all of them by `deadline` (time.monotonic()): one bound for the whole read, not
    per recv, so a peer sending a byte at a time cannot stretch it."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionLost("handshake took too long")
        sock.settimeout(left)
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionLost("connection closed by peer")
        buf += got
    return bytes(buf)


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
    if n > MAX_FRAME:  # garbage, or a peer that is not ours: never allocate what it claims
        raise ConnectionLost(f"frame of {n} bytes announced (at most {MAX_FRAME})")
    return a, b, recv_exactly(sock, n)


def no_wakeup_preemption() -> None:
    """The calling thread as SCHED_BATCH (Linux): a frame that wakes it no longer preempts the
    sender. On a shared CPU the front's engine thread sends a layer's payloads to every actor in
    turn; each actor woken by its payload used to preempt it mid-dispatch (sendmsg took ~215 µs
    instead of ~30). Measured, `small` bf16, 4 actors on 2 cores, served-direct, alternating runs:
    32 streams 643/627 against 598/612 tok/s, layer call 8.6–9.1 against 9.3 ms; 1 stream 57.4
    against 55.0. The actor's own priority (nice) is unchanged; a no-op where unsupported."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class DirectServer:
    """Inside the expert actor: listens on the node's address, serves each connection on its own
    threads. `handler` is the actor's layer computation (the same one its Ray method runs)."""

    def __init__(self, handler: Handler, host: str) -> None:
        self.handler, self.token = handler, os.urandom(TOKEN_BYTES)
        self.connections = 0  # authenticated
        self.unauthenticated = 0  # accepted, token not yet received
        self.queued_s = 0.0  # summed over calls: from the frame's arrival to its computation's start
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # accepted connections not closed yet
        self.closed = False
        self.sock = socket.create_server((host, 0), backlog=64)
        self.host, self.port = host, self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="raymoe-direct-accept", daemon=True).start()

    def endpoint(self) -> tuple[str, int, bytes]:
        return self.host, self.port, self.token

    def close(self) -> None:
        """Stop listening and end every connection (their threads leave; a caller's next send or
        wait raises ConnectionLost). An expert actor's server lives as long as its process; tests
        and benchmarks that start servers in their own process close them."""
        with self._lock:
            self.closed = True
            conns = list(self._open)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not, on Linux)
        except OSError:
            pass
        self.sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self.closed:
                    conn.close()
                    return
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="raymoe-direct-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        no_wakeup_preemption()
        with self._lock:
            if self.unauthenticated >= MAX_UNAUTHENTICATED:
                self._open.discard(conn)
                conn.close()
                return
            self.unauthenticated += 1
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer is noticed
            token = recv_by(conn, TOKEN_BYTES, time.monotonic() + HANDSHAKE_TIMEOUT_S)
            authenticated = hmac.compare_digest(token, self.token)
        except (OSError, ConnectionLost):
            authenticated = False
        with self._lock:
            self.unauthenticated -= 1
            admitted = authenticated and self.connections < MAX_CONNECTIONS
            self.connections += admitted
        if not admitted:
            with self._lock:
                self._open.discard(conn)
            conn.close()
            return
        conn.settimeout(None)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, args=(conn, inbox), name="raymoe-direct-work", daemon=True).start()
        try:
            while True:
                frame = recv_frame(conn)
                inbox.put((*frame, time.perf_counter()))
        except Exception:  # noqa: BLE001 — any failure ends this connection, never the reader silently
            inbox.put(None)

    def _closed(self, conn: socket.socket) -> None:
        conn.close()
        with self._lock:
            self.connections -= 1
            self._open.discard(conn)

    def _work(self, conn: socket.socket, inbox: queue.SimpleQueue) -> None:
        no_wakeup_preemption()
        try:
            while (item := inbox.get()) is not None:
                call_id, layer, payload, arrived = item
                waited = time.perf_counter() - arrived  # behind this connection's earlier calls
                with self._lock:
                    self.queued_s += waited
                try:
                    reply, seconds = self.handler(layer, payload)
                    status = min(int(seconds * 1e6), 2**31 - 1)
                except Exception as e:  # noqa: BLE001 — the caller raises it; this connection lives on
                    reply = f"{type(e).__name__}: {e}".encode()
                    status = NOT_LOADED if isinstance(e, ExpertsNotLoaded) else FAILED
                send_frame(conn, call_id, status, reply)
        except OSError:
            pass
        finally:
            self._closed(conn)


class DirectChannel:
    """The caller's end of one connection. Not thread-safe: one engine thread uses it."""

    def __init__(self, endpoint: tuple[str, int, bytes], timeout_s: float) -> None:
        """timeout_s bounds the connect and every send (a peer whose node vanished stops reading)."""
        host, port, self.token = endpoint
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.send_timeout_s = timeout_s
        self.sock.sendall(self.token)
        self.replies: dict[int, tuple[int, np.ndarray]] = {}  # received ahead of their caller
        self.abandoned: set[int] = set()  # calls whose caller gave up: their replies are dropped
        self.broken = False
        self._poll = select.poll()  # not select(): descriptors past 1024 are common in big replicas
        self._poll.register(self.sock, select.POLLIN)

    def send(self, call_id: int, layer: int, payload: np.ndarray) -> None:
        if self.broken:
            raise ConnectionLost("connection already broken")
        try:
            self.sock.settimeout(self.send_timeout_s)
            send_frame(self.sock, call_id, layer, payload)
        except OSError as e:
            self.broken = True
            raise ConnectionLost(str(e)) from None

    def recv(self, call_id: int, timeout_s: float, frame_timeout_s: float = FRAME_TIMEOUT_S) -> tuple[np.ndarray, float]:
        """The reply to `call_id` and the actor's compute seconds. TimeoutError when no frame started
        within `timeout_s` (the connection stays usable); ConnectionLost when it broke (also
        mid-frame, or when the rest of a frame took longer than frame_timeout_s); ExpertsNotLoaded
        or RuntimeError carrying the actor's error."""
        while call_id not in self.replies:
            if self.broken:
                raise ConnectionLost("connection already broken")
            if not self._poll.poll(max(0.0, timeout_s) * 1000):
                raise TimeoutError(f"no reply within {timeout_s:g} s")
            self.sock.settimeout(max(0.001, frame_timeout_s))  # the rest of a frame whose first bytes came
            try:
                got, status, body = recv_frame(self.sock)
            except (OSError, ConnectionLost) as e:
                self.broken = True
                raise ConnectionLost(str(e)) from None
            if got in self.abandoned:
                self.abandoned.discard(got)
            else:
                self.replies[got] = (status, body)
        status, body = self.replies.pop(call_id)
        if status in (FAILED, NOT_LOADED):
            text = body.tobytes().decode(errors="replace")
            raise ExpertsNotLoaded(text) if status == NOT_LOADED else RuntimeError(text)
        return body, status / 1e6

    def abandon(self, call_id: int) -> None:
        """Nobody will ask for `call_id`'s reply: drop it (now, or when it comes)."""
        if self.replies.pop(call_id, None) is None:
            self.abandoned.add(call_id)

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass
