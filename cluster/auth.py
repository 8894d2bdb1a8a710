"""Who is calling: every Generator call and every HTTP route but /health carries
`authorization: Bearer KEY` (gRPC metadata or HTTP header), which names a tenant
(cluster/tenants.py); the raymoe.v1.Experts service needs an admin tenant.

The keys reach a front replica as RAYMOE_API_KEY / RAYMOE_ADMIN_KEY in its environment (`raymoe
serve` puts them in the environment of the Ray instance it starts, or, joining a cluster, in the
replicas' runtime environment; Kubernetes takes them from a Secret) and from the tenants file.
Without any key, everyone who can reach the ports may generate and change the placement: see the
README's "What is exposed".
"""

from __future__ import annotations

from .failures import GRPC_KEY_HINT, HTTP_KEY_HINT, PermissionDenied, Unauthenticated
from .tenants import ADMIN_KEY_ENV, API_KEY_ENV, Tenant, Tenants

ENV = API_KEY_ENV
__all__ = ["ENV", "ADMIN_KEY_ENV", "Unauthenticated", "PermissionDenied", "grpc_tenant", "http_tenant"]


def _checked(tenant: Tenant | None, admin: bool, how: str) -> Tenant:
    if tenant is None:
        raise Unauthenticated(how)
    if admin and not tenant.admin:
        raise PermissionDenied(f"tenant {tenant.name!r} is not an admin: the Experts service (placement, scale, "
                               f"rebalance) needs an admin tenant's key")
    return tenant


def grpc_tenant(tenants: Tenants, grpc_context, admin: bool = False) -> Tenant:
    metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
    return _checked(tenants.identify(metadata.get("authorization")), admin, GRPC_KEY_HINT)


def http_tenant(tenants: Tenants, request, admin: bool = False) -> Tenant:
    return _checked(tenants.identify(request.headers.get("authorization")), admin, HTTP_KEY_HINT)
