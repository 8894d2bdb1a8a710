"""The Serve application: `build_app(args)` is the import path named in every Serve config.

`raymoe serve` and a Kubernetes RayService (serveConfigV2: import_path raymoe.cluster.app:build_app)
both deploy through this one function, with the same ServeSettings.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .ingress import Generator
from .openai_api import app as openai_app
from .settings import DEPLOYMENT_NAME, ServeSettings


def build_app(args: dict[str, Any], env: dict[str, str] | None = None) -> Application:
    """env (e.g. the API keys, RAYMOE_API_KEY and RAYMOE_ADMIN_KEY) travels in the replicas' runtime
    environment."""
    settings = ServeSettings.from_dict(dict(args))
    options = settings.deployment_options()
    if env:
        options["ray_actor_options"] = {**options["ray_actor_options"], "runtime_env": {"env_vars": dict(env)}}
    # One deployment, two doors: the gRPC methods (named as the RPCs) and the OpenAI HTTP routes.
    front = serve.ingress(openai_app)(Generator)
    deployment = serve.deployment(name=DEPLOYMENT_NAME)(front).options(**options)
    return deployment.bind(settings.to_dict())
