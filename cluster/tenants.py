"""Tenants: who a key belongs to, what it may do (admin or not) and what it may use.

Where keys come from (a replica reads all three; none on any command line):
- the tenants file (`--tenants FILE`, or `tenants_file` in --config / a Serve config; in Kubernetes
  a mounted Secret): YAML `tenants:` a list of {name, key | key_sha256, admin, max_concurrent,
  tokens_per_minute, weight, priority}. The file is reloaded when it changes: each replica looks
  at its modification time at most every RELOAD_CHECK_S, on the next request (no SIGHUP: the
  replicas are other processes, perhaps on other nodes). A file that no longer parses is logged
  and the tenants read before stay in force.
- RAYMOE_API_KEY (`raymoe serve --api-key`): one tenant, "default"; the admin too when no admin
  is configured otherwise (one key opens everything, as before tenants existed).
- RAYMOE_ADMIN_KEY (`--admin-key`): one admin tenant, "admin".

With no key at all the server is open and every caller is the tenant "anonymous", an admin with
no limits (local use, as before). Keys are kept only as SHA-256 digests; a key is matched by its
digest (the digest of a guess says nothing about how close it was).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

API_KEY_ENV = "RAYMOE_API_KEY"
ADMIN_KEY_ENV = "RAYMOE_ADMIN_KEY"
RELOAD_CHECK_S = 2.0
FIELDS = {"name", "key", "key_sha256", "admin", "max_concurrent", "tokens_per_minute", "weight", "priority"}

log = logging.getLogger("ray.serve")


class TenantsError(ValueError):
    """A tenants file or key that cannot be used (the message names the entry and the field)."""


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    max_concurrent: int = 0  # sequences in flight over the whole server; 0 = no limit
    tokens_per_minute: int = 0  # prompt + max_tokens charged at admission, refunded what was not generated; 0 = none
    weight: float = 1.0  # its share of the engine when others wait too (VTC)
    priority: int = 0  # lower is more important: admitted first, may preempt higher numbers (as vLLM)

    @property
    def limited(self) -> bool:
        return bool(self.max_concurrent or self.tokens_per_minute)


ANONYMOUS = Tenant("anonymous", admin=True)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _tenant(entry: Any, where: str) -> tuple[Tenant, bytes]:
    if not isinstance(entry, dict):
        raise TenantsError(f"{where}: each tenant must be a mapping")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise TenantsError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
        raise TenantsError(f"{where}: name must be 1-64 letters, digits, '_', '.', '@' or '-' (got {name!r})")
    where = f"{where} ({name})"
    if ("key" in entry) == ("key_sha256" in entry):
        raise TenantsError(f"{where}: give exactly one of key and key_sha256")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise TenantsError(f"{where}: key must be a non-empty string without surrounding spaces")
        digest = key_digest(key)
    else:
        hex_ = entry["key_sha256"]
        if not isinstance(hex_, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hex_):
            raise TenantsError(f"{where}: key_sha256 must be 64 hex digits (sha256sum of the key)")
        digest = bytes.fromhex(hex_)
    values: dict[str, Any] = {"name": name}
    for field, kind, low in (("max_concurrent", int, 0), ("tokens_per_minute", int, 0), ("priority", int, -1000)):
        value = entry.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= 10**12:
            raise TenantsError(f"{where}: {field} must be an integer >= {low} (got {value!r})")
        values[field] = value
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.001 <= weight <= 1000:
        raise TenantsError(f"{where}: weight must be a number in [0.001, 1000] (got {weight!r})")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise TenantsError(f"{where}: admin must be true or false (got {admin!r})")
    return Tenant(admin=admin, weight=float(weight), **values), digest


def parse_tenants(data: Any, where: str = "tenants") -> dict[bytes, Tenant]:
    """{key digest: tenant} from the parsed YAML ({"tenants": [...]})."""
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise TenantsError(f"{where}: expected a mapping with a `tenants:` list")
    book: dict[bytes, Tenant] = {}
    names: set[str] = set()
    for i, entry in enumerate(data["tenants"]):
        tenant, digest = _tenant(entry, f"{where}: tenants[{i}]")
        if tenant.name in names:
            raise TenantsError(f"{where}: tenants[{i}]: the name {tenant.name!r} is used twice")
        if digest in book:
            raise TenantsError(f"{where}: tenants[{i}] ({tenant.name}): the same key as {book[digest].name!r}")
        names.add(tenant.name)
        book[digest] = tenant
    return book


def read_tenants_file(path: str | Path) -> dict[bytes, Tenant]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TenantsError(f"{path}: {e}") from None
    return parse_tenants(data, str(path))


def shorthand_tenants(api_key: str | None, admin_key: str | None, admin_elsewhere: bool) -> dict[bytes, Tenant]:
    """The tenants of --api-key ("default") and --admin-key ("admin")."""
    book: dict[bytes, Tenant] = {}
    for key, flag in ((api_key, "--api-key"), (admin_key, "--admin-key")):
        if key is not None and key != "" and (not key.strip() or key != key.strip()):
            raise TenantsError(f"{flag}: a key must not be blank or have surrounding spaces")
    if admin_key:
        book[key_digest(admin_key)] = Tenant("admin", admin=True)
    if api_key:
        if key_digest(api_key) in book:
            raise TenantsError("--api-key and --admin-key must differ")
        book[key_digest(api_key)] = Tenant("default", admin=not (admin_key or admin_elsewhere))
    return book


class Tenants:
    """The replica's view: every source merged, the file re-read when it changes."""

    def __init__(self, tenants_file: str = "", api_key: str | None = None, admin_key: str | None = None,
                 clock=time.monotonic) -> None:
        self.file = tenants_file
        self.api_key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
        self.admin_key = os.environ.get(ADMIN_KEY_ENV, "") if admin_key is None else admin_key
        self._clock, self._lock = clock, threading.Lock()
        self._checked, self._mtime = 0.0, None
        self.book = self._build(read_tenants_file(tenants_file) if tenants_file else {})
        if tenants_file:
            self._mtime = self._stat()

    def _build(self, from_file: dict[bytes, Tenant]) -> dict[bytes, Tenant]:
        admin_in_file = any(t.admin for t in from_file.values())
        book = shorthand_tenants(self.api_key, self.admin_key, admin_in_file)
        clash = set(book) & set(from_file)
        if clash:
            raise TenantsError(f"{self.file}: a key of the file is also given as --api-key or --admin-key")
        names = {t.name for t in book.values()} & {t.name for t in from_file.values()}
        if names:
            raise TenantsError(f"{self.file}: the name(s) {sorted(names)} are taken by --api-key / --admin-key")
        return {**from_file, **book}

    @property
    def open(self) -> bool:
        """No key configured: everyone is ANONYMOUS."""
        return not self.book

    def _stat(self) -> float | None:
        try:
            return os.stat(self.file).st_mtime_ns
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = self._clock()
        if not self.file or now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            mtime = self._stat()
            if mtime == self._mtime:
                return
            self._mtime = mtime
            try:
                self.book = self._build(read_tenants_file(self.file))
                log.info("tenants reloaded from %s: %d tenants", self.file, len(self.book))
            except TenantsError as e:  # keep serving with the tenants read before
                log.error("tenants file not reloaded (the previous tenants stay): %s", e)

    def identify(self, authorization: str | None) -> Tenant | None:
        """The tenant an `authorization` value (header or metadata) names; None for a missing or
        unknown key (ANONYMOUS when the server is open)."""
        self._maybe_reload()
        if self.open:
            return ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return self.book.get(key_digest(token))

    def by_name(self) -> dict[str, Tenant]:
        return {t.name: t for t in self.book.values()}
