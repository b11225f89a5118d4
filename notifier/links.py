"""Signed one-tap action links (notifier: outbox -> push message -> owner API).

A push message's buttons (consent yes/no, a visit time, other times, a rating) carry a
link that works without signing in: the link itself is the credential, and it can do
exactly one thing, once, before it expires. The outbox signs each link with
:meth:`ActionLinks.url`; the owner API checks it with :meth:`ActionLinks.verify` and
marks it used in the case store (:meth:`~notifier.store.CaseStore.use_link`).

The link is ``{base}/cases/{case_id}/tap?action={action}&token={token}`` with the token
``{expires}.{nonce}.{mac}``: ``expires`` is Unix seconds, ``nonce`` is random (so that
every link is its own and a use is recorded for that link only), and ``mac`` is the
base64url HMAC-SHA256, under the notifier's link secret, of the case id, the action,
``expires`` and ``nonce`` (each part length-prefixed, so that no two different
combinations sign the same bytes). A token for another case or action, a changed
expiry or nonce, or another secret fails the check; the comparison takes the same time
wherever the MACs differ.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import quote, urlencode

from notifier.errors import ExpiredLinkError, InvalidLinkError
from wire.errors import ConfigError

__all__ = ["ActionLinks", "LinkGrant"]

_DOMAIN: Final = b"fixloop action link v1"
_TOKEN: Final = re.compile(r"(\d{1,12})\.([0-9a-f]{32})\.([A-Za-z0-9_-]{43})")
_MIN_SECRET_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """What a valid link allows.

    Attributes:
        case_id: the case.
        action: the one action (``accept_fix``, ``choose_slot:1`` ...).
        expires_at: when the link stops working (UTC).
        link_id: a stable id of this link (a hash of its token), to record its use.
    """

    case_id: str
    action: str
    expires_at: datetime
    link_id: str


def _part(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


class ActionLinks:
    """Makes and checks signed one-tap action links.

    Args:
        secret: the signing key (at least 16 bytes).
        ttl: how long a link works.

    Raises:
        ConfigError: a short secret or a ttl that is not positive.
    """

    def __init__(self, secret: str | bytes, *, ttl: timedelta = timedelta(days=7)) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < _MIN_SECRET_BYTES:
            raise ConfigError(f"the link secret needs at least {_MIN_SECRET_BYTES} bytes")
        if ttl <= timedelta(0):
            raise ConfigError("one-tap links need a positive lifetime")
        self._key = key
        self.ttl = ttl

    def _mac(self, case_id: str, action: str, expires: str, nonce: str) -> str:
        message = _DOMAIN + b"".join(_part(p) for p in (case_id, action, expires, nonce))
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def token(self, case_id: str, action: str, *, now: datetime) -> str:
        """A fresh token for one action on one case.

        Args:
            case_id: the case.
            action: the action id.
            now: the current time (UTC-aware); the token expires ``ttl`` later.

        Returns:
            ``{expires}.{nonce}.{mac}``.
        """
        expires = str(int((now + self.ttl).timestamp()))
        nonce = secrets.token_hex(16)
        return f"{expires}.{nonce}.{self._mac(case_id, action, expires, nonce)}"

    def url(self, base: str, case_id: str, action: str, *, now: datetime) -> str:
        """The link a button opens (or posts to).

        Args:
            base: the owner API's public address (``https://example.org/api/v1``).
            case_id: the case.
            action: the action id.
            now: the current time (UTC-aware).

        Returns:
            ``{base}/cases/{case_id}/tap?action=...&token=...``.
        """
        query = urlencode({"action": action, "token": self.token(case_id, action, now=now)})
        return f"{base.rstrip('/')}/cases/{quote(case_id, safe='')}/tap?{query}"

    def verify(self, token: str, case_id: str, action: str, *, now: datetime) -> LinkGrant:
        """Check a link's token for this case and action.

        Args:
            token: the link's ``token``.
            case_id: the case named in the link's path.
            action: the link's ``action``.
            now: the current time (UTC-aware).

        Returns:
            What the link allows.

        Raises:
            InvalidLinkError: the token is malformed, tampered with, or for another case
                or action.
            ExpiredLinkError: the token is genuine but past its expiry.
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidLinkError("this link is not valid: open the app instead")
        expires, nonce, mac = match.groups()
        expected = self._mac(case_id, action, expires, nonce)
        if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
            raise InvalidLinkError("this link is not valid: open the app instead")
        expires_at = datetime.fromtimestamp(int(expires), UTC)
        if now >= expires_at:
            raise ExpiredLinkError("this link has expired: open the app to answer")
        link_id = hashlib.sha256(token.encode("ascii")).hexdigest()
        return LinkGrant(case_id, action, expires_at, link_id)
