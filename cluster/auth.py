"""The optional API key: every Generator call and every HTTP route but /health needs
`authorization: Bearer KEY` (gRPC metadata or HTTP header), compared in constant time.

The key reaches a front replica as the environment variable RAYMOE_API_KEY: `raymoe serve --api-key`
puts it in the environment of the Ray instance it starts (or, joining a cluster, in the replicas'
runtime environment), and the Kubernetes manifests take it from a Secret. Without a key, everyone
who can reach the ports may generate: see the README's "What is exposed".
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV = "RAYMOE_API_KEY"


class ApiKey:
    def __init__(self, key: str | None = None) -> None:
        self.key = (key if key is not None else os.environ.get(ENV, "")).strip()

    @property
    def required(self) -> bool:
        return bool(self.key)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` value (header or metadata) carries the key."""
        if not self.key:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())

    def identity(self, authorization: str | None) -> str:
        """Who the caller is, as far as keeping prefix caches apart goes: a digest of the key it
        presented (never the key itself), "" on an open server. Callers with different identities
        never reuse each other's cached prompts, so none can time another's."""
        if not self.key:
            return ""
        _, _, token = (authorization or "").strip().partition(" ")
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]

    def allows_grpc(self, context) -> bool:
        if not self.key:
            return True
        metadata = dict(context.invocation_metadata()) if context is not None else {}
        return self.allows(metadata.get("authorization"))
