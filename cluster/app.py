"""The Serve application: `build_app(args)` is the import path named in every Serve config.

`raymoe serve` and a Kubernetes RayService (serveConfigV2: import_path cluster.app:build_app)
both deploy through this one function, with the same ServeSettings.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .ingress import Generator
from .settings import DEPLOYMENT_NAME, ServeSettings


def build_app(args: dict[str, Any]) -> Application:
    settings = ServeSettings.from_dict(dict(args))
    deployment = serve.deployment(name=DEPLOYMENT_NAME)(Generator).options(**settings.deployment_options())
    return deployment.bind(settings.to_dict())
