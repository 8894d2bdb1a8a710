"""Tenants without a server: the file's checks, the shorthands, identification and reloading."""

from __future__ import annotations

import hashlib
import os

import pytest

from raymoe.cluster.tenants import ANONYMOUS, Tenants, TenantsError, parse_tenants

GOOD = """
tenants:
  - {name: alice, key: alice-key, max_concurrent: 8, tokens_per_minute: 6000, weight: 2, priority: 1}
  - {name: ops, key_sha256: %s, admin: true}
""" % hashlib.sha256(b"ops-key").hexdigest()


def write(tmp_path, text: str):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return str(path)


def test_keys_name_tenants_and_unknown_or_missing_keys_name_none(tmp_path):
    t = Tenants(write(tmp_path, GOOD), api_key="", admin_key="")
    alice = t.identify("Bearer alice-key")
    assert (alice.name, alice.max_concurrent, alice.tokens_per_minute, alice.weight, alice.admin) == \
        ("alice", 8, 6000, 2.0, False)
    assert t.identify("bearer  ops-key ").admin
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic alice-key", "alice-key"):
        assert t.identify(bad) is None


def test_no_key_anywhere_is_open_and_one_api_key_is_also_the_admin(tmp_path):
    assert Tenants("", api_key="", admin_key="").identify(None) is ANONYMOUS
    one = Tenants("", api_key="k1", admin_key="")
    assert one.identify("Bearer k1").admin and one.identify(None) is None
    two = Tenants("", api_key="k1", admin_key="k2")
    assert not two.identify("Bearer k1").admin and two.identify("Bearer k2").admin
    with_file = Tenants(write(tmp_path, GOOD), api_key="k1", admin_key="")  # the file has an admin
    assert not with_file.identify("Bearer k1").admin


@pytest.mark.parametrize("text, fragment", [
    ("tenants: [{name: a}]", "exactly one of key and key_sha256"),
    ("tenants: [{name: a, key: '  '}]", "key must be a non-empty"),
    ("tenants: [{name: a, key_sha256: abc}]", "64 hex digits"),
    ("tenants: [{name: a, key: x}, {name: a, key: y}]", "used twice"),
    ("tenants: [{name: a, key: x}, {name: b, key: x}]", "the same key"),
    ("tenants: [{name: a, key: x, weight: 0}]", "weight"),
    ("tenants: [{name: a, key: x, max_concurrent: -1}]", "max_concurrent"),
    ("tenants: [{name: a, key: x, admin: 'yes'}]", "admin"),
    ("tenants: [{name: a, key: x, quota: 1}]", "unknown field"),
    ("tenants: [{name: 'a b', key: x}]", "name"),
    ("users: []", "tenants:"),
])
def test_a_bad_file_is_one_message_naming_the_entry(tmp_path, text, fragment):
    with pytest.raises(TenantsError, match=fragment):
        Tenants(write(tmp_path, text), api_key="", admin_key="")


def test_blank_shorthand_keys_are_refused_not_open():
    with pytest.raises(TenantsError, match="--api-key"):
        Tenants("", api_key="   ", admin_key="")
    with pytest.raises(TenantsError, match="differ"):
        Tenants("", api_key="same", admin_key="same")


def test_the_file_is_reloaded_on_change_and_a_broken_edit_keeps_the_old_tenants(tmp_path):
    now = [0.0]
    path = write(tmp_path, GOOD)
    t = Tenants(path, api_key="", admin_key="", clock=lambda: now[0])
    assert t.identify("Bearer bob-key") is None
    with open(path, "a") as f:
        f.write("  - {name: bob, key: bob-key}\n")
    os.utime(path, ns=(1, 10**18))
    now[0] += 1.0
    assert t.identify("Bearer bob-key") is None  # checked at most every RELOAD_CHECK_S
    now[0] += 2.0
    assert t.identify("Bearer bob-key").name == "bob"
    with open(path, "a") as f:
        f.write("  - {name: bob, key: other}\n")  # a duplicate name: refused
    os.utime(path, ns=(1, 2 * 10**18))
    now[0] += 3.0
    assert t.identify("Bearer bob-key").name == "bob" and t.identify("Bearer alice-key").name == "alice"


def test_parse_is_strict_about_shape():
    assert parse_tenants({"tenants": []}) == {}
    with pytest.raises(TenantsError):
        parse_tenants({"tenants": ["alice"]})
