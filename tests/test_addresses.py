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


#: Every form of an internal address we know of, each as a push target must refuse it.
#: The HTTP client (aiohttp through yarl) maps a non-ASCII host through IDNA, so Unicode
#: digits and dots become an ASCII IP literal that never meets the checked resolver.
INTERNAL_FORMS = [
    # literal, decimal, octal, hex and short forms of loopback and the metadata address
    "https://127.0.0.1/x",
    "https://2130706433/x",
    "https://0177.0.0.1/x",
    "https://0x7f.0.0.1/x",
    "https://0x7f000001/x",
    "https://127.1/x",
    "https://0/x",
    "https://0.0.0.0/x",
    "https://169.254.169.254/latest",
    "https://2852039166/latest",
    "https://10.0.0.1/x",
    "https://192.168.1.1./x",
    # IPv6 forms, with and without an embedded IPv4 address
    "https://[::1]/x",
    "https://[0:0:0:0:0:0:0:1]/x",
    "https://[::]/x",
    "https://[::ffff:127.0.0.1]/x",
    "https://[::ffff:7f00:1]/x",
    "https://[::127.0.0.1]/x",
    "https://[64:ff9b::a9fe:a9fe]/x",
    "https://[2002:7f00:1::]/x",
    "https://[fe80::1%25eth0]/x",
    "https://[fc00::1]/x",
    # Unicode dots and digits (ideographic and full-width full stops, full-width digits)
    "https://127。0。0。1:8443/x",
    "https://127．0．0．1/x",
    "https://127｡0｡0｡1/x",
    "https://１６９.２５４.１６９.２５４/",
    "https://10．0．0．1/x",
    "https://１２７.０.０.１/x",
    "https://①②⑦.0.0.1/x",
    # names that mean this machine
    "https://localhost/x",
    "https://LOCALHOST./x",
    "https://api.localhost/x",
    "https://ｌｏｃａｌｈｏｓｔ/x",
    "https://localhost。/x",
    # user-info tricks: the host is what follows the last @
    "https://hooks.example.org@127.0.0.1/x",
    "https://user:pw@hooks.example.org/x",
    "https://hooks.example.org:443@10.0.0.1/x",
    # other schemes and ports
    "http://hooks.example.org/x",
    "file:///etc/passwd",
    "https://hooks.example.org:0/x",
]


@pytest.mark.parametrize("url", INTERNAL_FORMS)
def test_every_known_internal_form_is_refused(url: str) -> None:
    with pytest.raises(UnsafeAddressError):
        check_webhook_url(url)


@pytest.mark.parametrize(
    "url", ["https://hooks.example.org/x", "https://bücher.example/x", "https://8.8.8.8:8443/x"]
)
def test_public_targets_still_pass(url: str) -> None:
    assert check_webhook_url(url).hostname is not None
