"""Where an owner's push targets may point (notifier: owner API and push senders -> here).

Owners give the URLs their messages go to (a webhook, an ntfy server, a browser's Web
Push endpoint), so none may become a way into our own network (server-side request
forgery). Two checks share this module:

* :func:`check_webhook_url`, when the owner registers a target (the owner API) and
  before every delivery (:class:`notifier.push.base.CheckedHttpSender`): the scheme is
  ``https`` (``http`` only where internal addresses are allowed), no user name or
  password, a port that is not 0, and a host that is not ``localhost`` (or a name under
  ``.localhost``, RFC 6761) nor a literal internal address, in any of the forms
  a URL parser or ``inet_aton`` accepts (``0x7f.1``, ``2130706433``, ``0177.0.0.1``,
  ``[::ffff:127.0.0.1]`` ...; WHATWG URL "IPv4 parser"). The host is judged as the HTTP
  client will connect to it: yarl (under aiohttp) maps a non-ASCII host through IDNA
  (UTS #46), which turns full-width digits, ideographic and full-width dots, circled
  digits and the like into ASCII, so ``https://127。0。0。1/`` *is* ``https://127.0.0.1/``
  to the connection and an IP literal skips the resolver below. Both the host as written
  and the host yarl makes of it must pass.
* :func:`resolve_public`, at connect time: the host name is resolved through the event
  loop's ``getaddrinfo`` under a deadline, and if *any* address is internal the
  connection is refused, which defeats a public name that points inside. The senders
  connect only to the addresses checked here (their resolver), so a name cannot change
  its answer between the check and the connection.

"Internal" (:func:`is_internal_ip`) is anything Python's :mod:`ipaddress` does not call
globally reachable, or calls private, loopback, link-local, multicast, reserved or
unspecified; an IPv6 address that carries an IPv4 one (IPv4-compatible, 6to4, Teredo,
NAT64 ``64:ff9b::/96``) is judged by that IPv4 address as well, and an IPv4-mapped one
(``::ffff:0:0/96``, never globally reachable as such) is refused whatever it carries.
Local installs and tests, whose receivers run on 127.0.0.1, switch the check off with
``allow_internal=True`` (``[notifier.push] webhook_allow_private``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Final
from urllib.parse import SplitResult, urlsplit

import yarl

from notifier.errors import UnsafeAddressError

__all__ = [
    "IPAddress",
    "check_webhook_url",
    "is_internal_ip",
    "literal_ip",
    "resolve_public",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64 or address in _V4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return found


def is_internal_ip(address: IPAddress) -> bool:
    """Whether an address is not one of the public internet's.

    Args:
        address: an IPv4 or IPv6 address.

    Returns:
        ``True`` for private, loopback, link-local, multicast, reserved, unspecified and
        other not globally reachable addresses, and for IPv6 addresses that carry such
        an IPv4 address.
    """
    if (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        return any(is_internal_ip(inner) for inner in _embedded_v4(address))
    return False


def _ipv4_number(part: str) -> int | None:
    """One dotted part as WHATWG's IPv4 number parser reads it (hex, octal or decimal)."""
    text = part.lower()
    if text.startswith("0x"):
        digits, base = text[2:], 16
    elif len(text) > 1 and text.startswith("0"):
        digits, base = text[1:], 8
    else:
        digits, base = text, 10
    if digits == "":
        return 0
    try:
        return int(digits, base) if digits.isalnum() and digits.isascii() else None
    except ValueError:
        return None


def _ends_in_number(parts: list[str]) -> bool:
    last = parts[-1].lower()
    if last and all(ch in "0123456789" for ch in last):
        return True
    return last.startswith("0x") and all(ch in "0123456789abcdef" for ch in last[2:])


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as an IPv4 address in any legacy form, ``None`` if it is a name.

    Raises:
        UnsafeAddressError: the host ends in a number but is no valid address.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot: a fully qualified name
    if not parts or not _ends_in_number(parts):
        return None
    numbers = [_ipv4_number(part) for part in parts]
    if len(parts) > 4 or any(n is None for n in numbers):
        raise UnsafeAddressError("the host is neither a host name nor an IP address")
    values = [n for n in numbers if n is not None]
    *head, last = values
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(values)):
        raise UnsafeAddressError("the host is neither a host name nor an IP address")
    number = last
    for index, value in enumerate(head):
        number += value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def literal_ip(host: str) -> IPAddress | None:
    """Read a URL's host as an IP address, if it is one in any form.

    Args:
        host: the host part of a URL (IPv6 with or without its brackets).

    Returns:
        The address, or ``None`` when ``host`` is a name.

    Raises:
        UnsafeAddressError: the host looks like a number but is no valid address.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError as exc:
            raise UnsafeAddressError("the host is not a valid IPv6 address") from exc
    return _legacy_ipv4(text)


def _is_localhost(host: str) -> bool:
    name = host.strip().lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def _connect_host(url: str) -> tuple[str, int | None]:
    """The host and port the HTTP client (aiohttp, through yarl) will connect to.

    Raises:
        UnsafeAddressError: yarl cannot read the URL or its host (so neither can aiohttp).
    """
    try:
        parsed = yarl.URL(url)
        host = parsed.raw_host
        port = parsed.explicit_port
    except (ValueError, UnicodeError) as exc:
        raise UnsafeAddressError("a push target must be a valid URL") from exc
    if not host:
        raise UnsafeAddressError("a push target must be a URL with a host")
    return host, port


#: A DNS host name as the connection will ask for it (after IDNA): letters, digits,
#: hyphens (and underscores, which some records carry), labels of 1 to 63.
_HOST_NAME: Final = re.compile(
    r"(?=.{1,253}\.?$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
    re.IGNORECASE,
)


def _judge_host(host: str) -> None:
    if _is_localhost(host):
        raise UnsafeAddressError("a push target must not point at localhost")
    address = literal_ip(host)
    if address is not None and is_internal_ip(address):
        raise UnsafeAddressError("a push target must not point at an internal address")


def check_webhook_url(url: str, *, allow_internal: bool = False) -> SplitResult:
    """Check that a push target URL (a webhook, an ntfy server, a Web Push endpoint) is public.

    Args:
        url: the owner's webhook URL.
        allow_internal: accept internal hosts (and plain ``http`` to any host): for local
            installs and tests only.

    Returns:
        The URL's parts.

    Raises:
        UnsafeAddressError: not ``https`` (``http`` where internal hosts are allowed), a
            user name or password in it, no host, port 0, or a host that is ``localhost``
            or a literal internal address as written or as the HTTP client reads it.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading the port refuses one that is not a number
    except ValueError as exc:
        raise UnsafeAddressError("a push target must be a valid URL") from exc
    schemes = ("http", "https") if allow_internal else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise UnsafeAddressError(f"a push target must be an {' or '.join(schemes)} URL with a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeAddressError("a push target URL must not carry a user name or password")
    host, port = _connect_host(url)
    if port == 0 or parts.port == 0:
        raise UnsafeAddressError("a push target must not use port 0")
    if allow_internal:
        literal_ip(parts.hostname)  # still refuses a host that is no address and no name
        if literal_ip(host) is None and _HOST_NAME.fullmatch(host) is None:
            raise UnsafeAddressError("the host is neither a host name nor an IP address")
        return parts
    _judge_host(parts.hostname)
    _judge_host(host)
    if literal_ip(host) is None and _HOST_NAME.fullmatch(host) is None:
        raise UnsafeAddressError("the host is neither a host name nor an IP address")
    return parts


async def resolve_public(
    host: str, port: int, *, timeout_s: float, allow_internal: bool = False
) -> list[tuple[socket.AddressFamily, str]]:
    """Resolve a host name and refuse it if any of its addresses is internal.

    Args:
        host: the host name (or a literal address).
        port: the port to connect to.
        timeout_s: the longest the lookup may take.
        allow_internal: accept internal addresses (local installs and tests).

    Returns:
        ``(family, address)`` for each distinct address, in the resolver's order.

    Raises:
        UnsafeAddressError: the name is ``localhost`` or an address is internal.
        TimeoutError: the lookup took longer than ``timeout_s``.
        OSError: the name does not resolve (:class:`socket.gaierror`).
    """
    if not allow_internal and _is_localhost(host):
        raise UnsafeAddressError("a push target must not point at localhost")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[tuple[socket.AddressFamily, str]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]
        if not allow_internal and is_internal_ip(ipaddress.ip_address(text)):
            raise UnsafeAddressError("the push target's host name resolves to an internal address")
        if (family, str(sockaddr[0])) not in found:
            found.append((family, str(sockaddr[0])))
    return found
