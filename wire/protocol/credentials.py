"""Secrets derived from one fleet secret, one key per purpose (the wire's auth side).

A fleet of thousands cannot hand-type passwords: the broker's password file and the
devices (or the simulator) both derive a device's password from the fleet secret, so a
device's credentials are useless for any other device id (the broker ACL pins topics to
the user name with ``%u``).

Every purpose has a key of its own, derived from the fleet secret with HKDF (RFC 5869,
SHA-256, the purpose as ``info``): device passwords, the local stack's service users and
the demo's API tokens. Before, all were one HMAC under the fleet secret itself, told
apart only by a prefix inside the message, so a device provisioned with the id
``service:fixloop-gateway`` (a valid device id) would have been handed the gateway's
broker password.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from typing import Final, Literal

__all__ = ["Purpose", "derive", "device_password", "purpose_key"]

Purpose = Literal[
    "device password", "service password", "demo api token", "demo ops password", "stack client id"
]
_SALT: Final = b"fixloop fleet secret v2"


@functools.lru_cache(maxsize=32)
def purpose_key(fleet_secret: str, purpose: Purpose) -> bytes:
    """The 32-byte key of one purpose, derived from the fleet secret (HKDF-SHA256)."""
    prk = hmac.new(_SALT, fleet_secret.encode(), hashlib.sha256).digest()
    return hmac.new(prk, f"fixloop {purpose}".encode() + b"\x01", hashlib.sha256).digest()


def derive(fleet_secret: str, purpose: Purpose, name: str) -> bytes:
    """The secret of ``name`` (a device id, a user) for one purpose: 32 bytes."""
    return hmac.new(purpose_key(fleet_secret, purpose), name.encode(), hashlib.sha256).digest()


def device_password(fleet_secret: str, device_id: str) -> str:
    """Return the broker password of ``device_id`` under ``fleet_secret``."""
    return base64.urlsafe_b64encode(
        derive(fleet_secret, "device password", device_id)[:18]
    ).decode()
