"""The Experts gRPC service (raymoe.v1.Experts): the expert placement, and live changes to it.

The front replica is only the door: the server's pool host (actors/pool_host.py) owns the placement
and makes every change (actors/live.py), so whichever replica a call lands on, all replicas follow
one version. A change takes seconds (new copies load while the old placement serves), so the
replica awaits it without blocking its event loop; streams on it go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import ray

from raymoe.actors.errors import remote_cause
from raymoe.actors.live import PlacementFailed
from raymoe.actors.pool_host import ChangeBusy, pool_host
from raymoe.protos import generator_pb2 as pb

from .auth import grpc_tenant
from .failures import PermissionDenied, Unauthenticated

log = logging.getLogger("ray.serve")

CHANGE_TIMEOUT_S = 600.0  # a change of a 90 GB model's placement reads gigabytes


class ExpertsRoutes:
    """GetPlacement, ScaleExperts, RebalanceExperts; mixed into the front deployment (Generator)."""

    async def GetPlacement(self, request: pb.PlacementRequest, grpc_context=None) -> pb.PlacementResponse:
        if not self._admin(grpc_context):
            return pb.PlacementResponse()
        report = await self._ask_host(grpc_context, "placement", timeout_s=30.0)
        if report is None:
            return pb.PlacementResponse()
        return placement_message(report)

    async def ScaleExperts(self, request: pb.ScaleExpertsRequest, grpc_context=None) -> pb.PlacementChange:
        if not self._admin(grpc_context):
            return pb.PlacementChange()
        most = self.max_expert_actors()
        if not 1 <= request.actors <= most:  # at once: a planner given a million actors works for minutes
            return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                                f"actors must be between 1 and {most} (got {request.actors}); the server's "
                                f"bound is --max-expert-actors", pb.PlacementChange())
        entry = await self._ask_host(grpc_context, "scale", request.actors)
        return pb.PlacementChange() if entry is None else change_message(entry)

    async def RebalanceExperts(self, request: pb.RebalanceRequest, grpc_context=None) -> pb.PlacementChange:
        if not self._admin(grpc_context):
            return pb.PlacementChange()
        entry = await self._ask_host(grpc_context, "rebalance")
        return pb.PlacementChange() if entry is None else change_message(entry)

    def max_expert_actors(self) -> int:
        """--max-expert-actors, or by default the most actors that can all hold an expert."""
        s = self.settings
        return s.max_expert_actors or max(self.cfg.num_local_experts * max(1, s.expert_replicas), s.expert_actors,
                                          s.expert_autoscale_max)

    def _admin(self, grpc_context) -> bool:
        """Whether the caller is an admin tenant; if not, its status is set (UNAUTHENTICATED or
        PERMISSION_DENIED)."""
        try:
            grpc_tenant(self.tenants, grpc_context, admin=True)
            return True
        except (Unauthenticated, PermissionDenied) as e:
            self._fail(grpc_context, e, None)  # the status every door answers
            return False

    async def _ask_host(self, grpc_context, method: str, *args: Any, timeout_s: float = CHANGE_TIMEOUT_S):
        # looking the host up asks Ray's GCS: on a thread, never on the event loop streams share
        host = await asyncio.to_thread(pool_host, self.settings.app_name) if self.info["pool"] is not None else None
        if host is None:
            return self._refuse(grpc_context, grpc.StatusCode.FAILED_PRECONDITION,
                                "this server computes its experts inside the front replicas; start it with "
                                "--expert-actors N to place them on actors", None)
        try:
            return await asyncio.wait_for(getattr(host, method).remote(*args), timeout_s)
        except asyncio.TimeoutError:
            return self._refuse(grpc_context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the placement change did not finish within {timeout_s:g} s", None)
        except ray.exceptions.RayTaskError as e:
            cause = remote_cause(e)

            if isinstance(cause, ValueError):  # the planner refused: e.g. too few actors for the copies
                return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(cause).splitlines()[0], None)
            if isinstance(cause, (PlacementFailed, ChangeBusy)):
                return self._refuse(grpc_context, grpc.StatusCode.UNAVAILABLE, str(cause).splitlines()[0], None)
            log.error("placement %s failed", method, exc_info=e)
            return self._refuse(grpc_context, grpc.StatusCode.UNAVAILABLE,
                                f"the placement {method} failed ({type(cause).__name__}); the previous placement "
                                f"keeps serving; see the pool host's log", None)
        except ray.exceptions.RayError as e:
            log.error("the pool host did not answer", exc_info=e)
            return self._refuse(grpc_context, grpc.StatusCode.UNAVAILABLE, f"the pool host did not answer: "
                                f"{type(e).__name__}", None)

    def _refuse(self, grpc_context, code: grpc.StatusCode, message: str, response):
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(message)
        return response


def change_message(entry: dict[str, Any]) -> pb.PlacementChange:
    return pb.PlacementChange(
        version=entry["version"], from_version=entry["from_version"], kind=entry["kind"], moves=entry["moves"],
        retired=entry["retired"], started=entry["started"], stopped=entry["stopped"],
        seconds=entry.get("seconds", 0.0), imbalance_before=entry.get("imbalance_before", 0.0),
        imbalance_after=entry.get("imbalance_after", 0.0), at_unix=entry["at"])


def placement_message(report: dict[str, Any]) -> pb.PlacementResponse:
    actors = [pb.ExpertActorPlacement(
        id=a["id"], name=a["name"], node_id=a["node_id"], device=a["device"], state=a["state"], slots=a["slots"],
        layers=[pb.LayerExperts(layer=int(layer), experts=ex) for layer, ex in a["experts"].items()],
        pairs=a.get("pairs", 0), load=a["load"], weight_bytes=a.get("weight_bytes", 0),
        quantization=a.get("quantization", "")) for a in report["actors"]]
    return pb.PlacementResponse(
        version=report["version"], actors=actors, imbalance=report["imbalance"],
        copies=[pb.ExpertCopies(layer=i, copies=row) for i, row in enumerate(report["copies"])],
        history=[change_message(h) for h in report["history"]])
