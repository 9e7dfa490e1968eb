"""Allow-list parsing (one negative test per rule) and matching, with a dict resolver: no DNS."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from enclavekit.errors import AllowlistError
from enclavekit.vsock.proxy import (
    NOT_ALLOWED_MESSAGE,
    Allowlist,
    AllowlistEntry,
    DictResolver,
    IPFamily,
    check_allowlist,
    resolve_first,
)

AWS_SAMPLE = """\
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
- {address: 127.0.0.1, port: 9000}
"""

RESOLVER = DictResolver({
    "kms.us-east-1.amazonaws.com": ["52.46.145.233", "67.220.226.38"],
    "kms-fips.us-east-1.amazonaws.com": ["3.216.27.10"],
    "kms-alias.example": ["67.220.226.38"],
    "dual.example": ["2001:db8::1", "192.0.2.7"],
})


def test_parse_aws_sample() -> None:
    allowlist = Allowlist.parse(AWS_SAMPLE)
    assert allowlist.entries == (
        AllowlistEntry("kms.us-east-1.amazonaws.com", 443),
        AllowlistEntry("kms-fips.us-east-1.amazonaws.com", 443),
        AllowlistEntry("127.0.0.1", 9000),
    )


def test_parse_block_style_and_bytes() -> None:
    text = b"allowlist:\n  - address: localhost\n    port: 8080\n"
    assert Allowlist.parse(text).entries == (AllowlistEntry("localhost", 8080),)


def test_empty_list_parses_and_allows_nothing() -> None:
    allowlist = Allowlist.parse("allowlist: []\n")
    with pytest.raises(AllowlistError):
        check_allowlist(allowlist, "127.0.0.1", 9000, RESOLVER)


@pytest.mark.parametrize(("text", "rule"), [
    ("allowlist: [", "yaml"),
    ("- a\n- b\n", "top-level"),
    ("", "top-level"),
    ("other: []\n", "missing-key"),
    ("allowlist: []\nextra: 1\n", "unknown-key"),
    ("allowlist: {address: a, port: 1}\n", "not-a-list"),
    ("allowlist: [foo]\n", "entry-type"),
    ("allowlist: [{port: 443}]\n", "missing-field"),
    ("allowlist: [{address: a}]\n", "missing-field"),
    ("allowlist: [{address: a, port: 1, proto: tcp}]\n", "unknown-key"),
    ("allowlist: [{address: 10, port: 443}]\n", "address-type"),
    ("allowlist: [{address: '', port: 443}]\n", "address-type"),
    ("allowlist: [{address: ' a', port: 443}]\n", "address-type"),
    ("allowlist: [{address: null, port: 443}]\n", "address-type"),
    ("allowlist: [{address: a, port: '443'}]\n", "port-type"),
    ("allowlist: [{address: a, port: 4.5}]\n", "port-type"),
    ("allowlist: [{address: a, port: true}]\n", "port-type"),
    ("allowlist: [{address: a, port: 0}]\n", "port-range"),
    ("allowlist: [{address: a, port: 65536}]\n", "port-range"),
    ("allowlist: [{address: a, port: -1}]\n", "port-range"),
    ("allowlist: []\nallowlist: []\n", "duplicate-key"),
    ("allowlist: [{address: a, address: b, port: 1}]\n", "duplicate-key"),
])
def test_parse_rejects(text: str, rule: str) -> None:
    with pytest.raises(AllowlistError) as info:
        Allowlist.parse(text)
    assert info.value.rule == rule
    assert info.value.code == "E78"


def test_parse_rejects_oversize_and_long_address() -> None:
    with pytest.raises(AllowlistError) as info:
        Allowlist.parse("#" * (1 << 20 | 1))
    assert info.value.rule == "size"
    with pytest.raises(AllowlistError) as info:
        Allowlist.parse("allowlist: [{address: %s, port: 1}]\n" % ("a" * 254))
    assert info.value.rule == "address-type"


def test_parse_refuses_python_objects() -> None:
    with pytest.raises(AllowlistError) as info:
        Allowlist.parse("allowlist: !!python/object/apply:os.system ['true']\n")
    assert info.value.rule == "yaml"


# ---- matching (§4)


def test_exact_string_match() -> None:
    dest = check_allowlist(Allowlist.parse(AWS_SAMPLE), "kms.us-east-1.amazonaws.com", 443, RESOLVER)
    assert dest.ip == ipaddress.ip_address("52.46.145.233")  # the first record
    assert (dest.address, dest.port) == ("kms.us-east-1.amazonaws.com", 443)


def test_resolved_ip_match() -> None:
    # Not the same string, but its first IP is one of a listed name's IPs.
    dest = check_allowlist(Allowlist.parse(AWS_SAMPLE), "kms-alias.example", 443, RESOLVER)
    assert str(dest.ip) == "67.220.226.38"


def test_numeric_remote_is_not_looked_up() -> None:
    resolver = DictResolver({})
    dest = check_allowlist(Allowlist.parse(AWS_SAMPLE), "127.0.0.1", 9000, resolver)
    assert str(dest.ip) == "127.0.0.1"
    assert resolver.queries == []


def test_no_match_is_refused_with_nitros_message() -> None:
    with pytest.raises(AllowlistError) as info:
        check_allowlist(Allowlist.parse(AWS_SAMPLE), "127.0.0.1", 9001, RESOLVER)
    assert str(info.value) == NOT_ALLOWED_MESSAGE
    assert info.value.rule == "not-allowed"


def test_port_must_match_too() -> None:
    with pytest.raises(AllowlistError):
        check_allowlist(Allowlist.parse(AWS_SAMPLE), "kms.us-east-1.amazonaws.com", 80, RESOLVER)


def test_unresolvable_remote_is_refused() -> None:
    with pytest.raises(AllowlistError) as info:
        check_allowlist(Allowlist.parse(AWS_SAMPLE), "nowhere.example", 443, RESOLVER)
    assert info.value.rule == "remote-unresolved"


def test_unresolvable_listed_host_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    allowlist = Allowlist.parse("allowlist:\n- {address: gone.example, port: 443}\n"
                                "- {address: kms.us-east-1.amazonaws.com, port: 443}\n")
    with caplog.at_level(logging.WARNING, logger="enclavekit.vsock.proxy"):
        dest = check_allowlist(allowlist, "kms-alias.example", 443, RESOLVER)
    assert str(dest.ip) == "67.220.226.38"
    assert "Unable to resolve allow listed host" in caplog.text


def test_family_filter() -> None:
    assert str(resolve_first(RESOLVER, "dual.example")) == "2001:db8::1"
    assert str(resolve_first(RESOLVER, "dual.example", IPFamily.V4)) == "192.0.2.7"
    assert resolve_first(RESOLVER, "kms-fips.us-east-1.amazonaws.com", IPFamily.V6) is None
    with pytest.raises(AllowlistError) as info:
        check_allowlist(Allowlist.parse(AWS_SAMPLE), "kms.us-east-1.amazonaws.com", 443, RESOLVER, IPFamily.V6)
    assert info.value.rule == "remote-unresolved"


def test_resolver_junk_is_ignored() -> None:
    assert resolve_first(DictResolver({"x": ["not-an-ip", "10.0.0.1"]}), "x") == ipaddress.ip_address("10.0.0.1")


def test_bad_remote_port_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        check_allowlist(Allowlist.parse(AWS_SAMPLE), "127.0.0.1", 0, RESOLVER)
