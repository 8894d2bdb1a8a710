"""Heavy torch work on a passing thread, so that the thread that steps the model owns the only
OpenMP team in its process.

torch's CPU kernels run their parallel regions in an OpenMP team, and libgomp keeps one team per
thread that has ever entered a parallel region, for as long as that thread lives. With two live
teams on a machine whose cores one team already fills, every parallel region of the busy team
runs about half as fast. Measured with torch 2.13 on a 2-core AVX-512 machine, the `small` preset
in bfloat16, one sequence decoding with 2 torch threads: 7.3 ms a step when the stepping thread's
team is the only one; 13.5 ms when the main thread had first run one 512x512 matmul (the model
loaded there) and the model then stepped on another thread, as a server's engine thread does.
Waiting policies (OMP_WAIT_POLICY, GOMP_SPINCOUNT) do not change it; a team whose thread has
ended is gone, and then the stepping thread runs at full speed.

So a process that steps a model on a thread of its own (the front replica's engine loop) loads it
on a passing thread: `on_passing_thread(load)`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[[], T], name: str = "raymoe-load") -> T:
    """fn() run on a new thread that ends when it returns; its result, or its exception raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as one:  # leaving the block ends the thread
        return one.submit(fn).result()
