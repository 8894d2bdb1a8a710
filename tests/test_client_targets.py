"""cluster/client.py:channel_target: the gRPC target (and channel options) a Client builds from what a
user gives it. Several HOST:PORT → one round-robin channel over literal addresses; one address, or
one of gRPC's own target forms, as it is; malformed lists are a ValueError naming the bad part."""

from __future__ import annotations

import pytest

from raymoe.cluster.client import channel_target

ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]


def test_several_addresses_become_one_round_robin_channel():
    assert channel_target("10.0.0.1:5,10.0.0.2:6") == ("ipv4:10.0.0.1:5,10.0.0.2:6", ROUND_ROBIN)
    assert channel_target(" 10.0.0.1:5 , 10.0.0.2:6 ,") == ("ipv4:10.0.0.1:5,10.0.0.2:6", ROUND_ROBIN)
    assert channel_target("[::1]:5,[::1]:6") == ("ipv6:[::1]:5,[::1]:6", ROUND_ROBIN)
    # a name is resolved to its (first) address: IPv4 or IPv6, as this machine's resolver orders them
    target, options = channel_target("localhost:5,localhost:6")
    scheme, addresses = target.split(":", 1)
    assert options == ROUND_ROBIN and scheme in ("ipv4", "ipv6") and "localhost" not in target
    assert [a.rsplit(":", 1)[1] for a in addresses.split(",")] == ["5", "6"]


def test_one_address_and_grpcs_own_forms_pass_as_they_are():
    assert channel_target("example.org:443") == ("example.org:443", [])
    assert channel_target("127.0.0.1:9000,") == ("127.0.0.1:9000", [])
    assert channel_target(" 127.0.0.1:9000") == ("127.0.0.1:9000", [])
    for own in ("ipv4:1.2.3.4:5,1.2.3.5:6", "dns:///a.example:1", "unix:/tmp/a.sock", "ipv6:[::1]:5,[::1]:6"):
        assert channel_target(own) == (own, [])


@pytest.mark.parametrize("bad", ["10.0.0.1:5,[::1]:6", "10.0.0.1,10.0.0.2:6", "10.0.0.1:5,10.0.0.2:99999",
                                 "10.0.0.1:5,::1:6", "10.0.0.1:5,:6", "10.0.0.1:5,no-such-host.invalid:6"])
def test_a_malformed_list_is_a_value_error(bad):
    with pytest.raises(ValueError, match="target"):
        channel_target(bad)
