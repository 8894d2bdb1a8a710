"""What goes wrong at the Ray process boundary, and how a Ray error is shown in one line.

Its own module because every other module of actors/ (the pool, its transports, live placement)
and the serving side raise or read these: they depend on nothing here but model/.
"""

from __future__ import annotations

from typing import Sequence

from raymoe.model.errors import BackendUnavailable


class ExpertsUnavailable(BackendUnavailable):
    """Some experts could not be reached in time (actor dead, restarting with nowhere to go, hung)."""

    def __init__(self, layer: int | None, experts: Sequence[int], reason: str) -> None:
        self.layer, self.experts, self.reason = layer, sorted(set(experts)), reason
        where = "" if layer is None else f"layer {layer}: "
        super().__init__(f"{where}experts {self.experts} unavailable: {reason}")

    def __reduce__(self):  # across Ray (a remote error's cause) it is rebuilt from its parts
        return type(self), (self.layer, self.experts, self.reason)


def remote_cause(error: BaseException) -> BaseException:
    """The exception a remote call raised, out of Ray's wrapper (RayTaskError.cause), or `error`."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def brief(error: BaseException) -> str:
    """A Ray error's first and last lines: what happened, without the remote traceback between."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " … ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(error).__name__
