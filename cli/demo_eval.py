"""Answer the demo's held-out problems through the distributed paths, for `raymoe eval-demo`.

model/demo.py scores any `prompts → answers` function; these are the two that leave the process:
a running gRPC server (`--target`) and experts on Ray actors (`--expert-actors`). All greedy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

GenerateFn = Callable[[list[str]], list[str]]
MAX_TOKENS = 6  # the longest answer (4 digits) plus EOS, with room to spare


def server_generate(target: str, concurrency: int = 32, timeout: float = 120.0,
                    api_key: str | None = None, app: str | None = None) -> GenerateFn:
    """Each prompt as its own Generate call, `concurrency` at a time (the server batches them)."""
    from raymoe.protos import generator_pb2 as pb

    from raymoe.cluster.client import Client

    def generate(prompts: list[str]) -> list[str]:
        import grpc

        with Client(target, api_key=api_key, app=app) as client, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            try:
                client.wait_ready(1.0)
            except TimeoutError:
                print(f"raymoe: waiting up to {timeout:g} s for {target} to serve", file=sys.stderr, flush=True)
                client.wait_ready(timeout)  # TimeoutError: one line (see run_command)
            try:
                return list(pool.map(lambda p: client.generate(
                    pb.GenerateRequest(prompt=p, max_tokens=MAX_TOKENS), timeout=timeout).text, prompts))
            except grpc.RpcError as e:
                raise UserError(f"{target}: {e.code().name}: {e.details()}") from None

    return generate


@contextlib.contextmanager
def remote_experts_generate(checkpoint: str | Path, args: argparse.Namespace,
                            batch_size: int = 64) -> Iterator[GenerateFn]:
    """The in-process engine with its experts on Ray actors (as `raymoe run --expert-actors N`)."""
    from raymoe.model.demo import local_generate

    from .ray_session import experts_factory_from_args

    with experts_factory_from_args(args, checkpoint) as factory:
        generate = local_generate(checkpoint, batch_size=batch_size, experts_factory=factory)
        if factory is not None:
            factory.wait_loaded()  # the expert actors loaded while the dense part did
        yield generate
