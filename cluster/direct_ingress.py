"""Where each front replica serves on its own (Ray Serve's direct ingress), beside Serve's proxy.

With RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the environment of the Ray nodes, every replica of an
application's ingress deployment starts a gRPC server (ports 40000-41000) and an HTTP server
(30000-31000) of its own, which run the same methods as the proxy's requests do (API keys and
limits included). A client connected there skips the proxy: no second process per message, no
proxy-to-replica hop. Measured (`small` in bfloat16, one replica, 32 streams of 64 tokens, three
alternating runs each through the proxy and through the replica's port of one deployment):

| experts | through the proxy | through the replica's port |
|---|---|---|
| in the replica | 745-819 tok/s, 2.32-2.51 CPU ms/token | 920-961 tok/s, 2.00-2.09 |
| on 4 expert actors | 478-592 tok/s, 2.57-3.13 | 590-636 tok/s, 2.32-2.52 |

One stream gains nothing measurable (53 against 53 tok/s): the proxy's cost is per message.

What it does not do: a client connected to one replica stays on it, so Serve's request routing
(load balancing, the prefix-aware router) does not apply; with several replicas the client spreads
its calls (`Client.direct`: round robin over every replica's port) or an external load balancer
does (as Serve's HAProxy mode does). The proxy stays the door that routes; direct ingress is a
door beside it.

Serve's controller knows the ports (it allocates them); `endpoints()` asks it. `raymoe serve`
prints them, ModelInfo lists them (`direct_grpc_targets`), and `Client.direct` and `raymoe
generate --direct` find them there.
"""

from __future__ import annotations

import dataclasses
import time

ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # how long a stopping replica stays open (Serve: 30 s)


@dataclasses.dataclass(frozen=True)
class Endpoints:
    grpc: tuple[str, ...]  # "host:port" of each running replica's own gRPC server
    http: tuple[str, ...]  # "http://host:port" of each one's HTTP server


def endpoints(app_name: str, proxy_ports: tuple[int, ...] = (), http_host: str = "0.0.0.0",
              timeout_s: float = 0.0) -> Endpoints:
    """The application's replicas' own gRPC and HTTP endpoints, waiting up to `timeout_s` for at least
    one gRPC endpoint (a replica allocates its ports as it starts); none where direct ingress is off.
    `proxy_ports`: the proxy's ports, which Serve lists instead while an application has no replica
    serving on its own. `http_host`: where the HTTP servers bind (Serve's HTTP options, as the
    proxy's): the URLs use it unless it is every interface (then the node's address)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while True:
        grpc, http = [], []
        for group in ray.get(controller.get_target_groups.remote(app_name=app_name)):
            for t in group.targets:
                if t.port in proxy_ports:
                    continue
                if group.protocol == RequestProtocol.GRPC:
                    grpc.append(f"{t.ip}:{t.port}")
                elif group.protocol == RequestProtocol.HTTP:
                    host = t.ip if http_host in ("0.0.0.0", "::", "") else http_host
                    http.append(f"http://{host}:{t.port}")
        if grpc or time.monotonic() >= deadline:
            return Endpoints(tuple(sorted(set(grpc))), tuple(sorted(set(http))))
        time.sleep(0.5)
