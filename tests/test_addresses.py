"""Where a webhook may point: every spelling of an IPv4 address is judged as that address."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notifier.addresses import check_webhook_url, is_internal_ip, literal_ip
from notifier.errors import UnsafeAddressError


def _spellings(number: int) -> list[str]:
    octets = number.to_bytes(4, "big")
    return [
        str(ipaddress.IPv4Address(number)),
        str(number),
        hex(number),
        ".".join(f"0{b:o}" for b in octets),
        ".".join(hex(b) for b in octets),
        f"{octets[0]}.{int.from_bytes(octets[1:], 'big')}",
        f"{octets[0]}.{octets[1]}.{int.from_bytes(octets[2:], 'big')}",
        f"[::ffff:{ipaddress.IPv4Address(number)}]",
    ]


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_spelling_of_an_address_is_judged_alike(number: int) -> None:
    address = ipaddress.IPv4Address(number)
    for host in _spellings(number):
        parsed = literal_ip(host)
        seen = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else parsed
        assert seen == address, host
        url = f"https://{host}/hook"
        # an IPv4-mapped IPv6 address is refused whatever it carries: not a public form
        if is_internal_ip(address) or host.startswith("[::ffff:"):
            with pytest.raises(UnsafeAddressError):
                check_webhook_url(url)
        else:
            assert check_webhook_url(url).hostname is not None


@pytest.mark.parametrize("name", ["hooks.example.org", "example.com.", "xn--bcher-kva.example"])
def test_names_are_left_to_the_resolver(name: str) -> None:
    assert literal_ip(name) is None
    assert check_webhook_url(f"https://{name}/x").hostname == name.lower()


def test_public_addresses_pass() -> None:
    for host in ("8.8.8.8", "[2606:4700:4700::1111]", "93.184.215.14"):
        check_webhook_url(f"https://{host}/x")
