"""Per-device broker credentials derived from one fleet secret (the wire's auth side).

A fleet of thousands cannot hand-type passwords: the broker's password file and the
devices (or the simulator) both derive a device's password from the fleet secret, so a
device's credentials are useless for any other device id (the broker ACL pins topics to
the user name with ``%u``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["device_password"]


def device_password(fleet_secret: str, device_id: str) -> str:
    """Return the broker password of ``device_id`` under ``fleet_secret``."""
    digest = hmac.new(fleet_secret.encode(), device_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()
