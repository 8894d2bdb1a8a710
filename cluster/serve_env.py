"""Ray Serve settings raymoe runs with, as environment variables of every Ray process.

Serve reads them when its proxy and replicas start, so they must be in the environment of the
Ray nodes: `raymoe serve` (and every command that starts a private Ray instance) sets them before
it starts Ray; the k8s manifests put them on the head and front pods (tests/test_k8s.py keeps the
two equal).

The proxy talks to the replicas over gRPC instead of Ray actor calls (no Ray streaming generator,
ObjectRef and pickled gRPC context per streamed message), and the replica runs our async methods on
its own event loop instead of handing every call and every message across to a second thread.
Measured (docs/performance.md, `bench_serving`, `small` in bfloat16, 32 streams, median of 3):
served with local experts 790 against 695 tok/s, through 4 expert actors 586 against 540, CPU per
token 2.66 against 2.98 ms; TTFT p50 208 against 285 ms. An environment that sets either variable
keeps its own value.
"""

from __future__ import annotations

import os

SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def apply_serve_env() -> None:
    """Before this process starts Ray: the settings above, unless the environment says otherwise."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
