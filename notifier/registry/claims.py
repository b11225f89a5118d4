"""Claim codes, invite codes and API tokens, and their stored digests (notifier).

Claim codes are 12 characters of Crockford's base32 (60 random bits, shown as
``XXXX-XXXX-XXXX``), or the manufacturer's own; only an HMAC-SHA256 of the normalised
code is kept, under a key derived with HKDF from a server secret (:func:`claim_key`).
Invite codes and tokens are long random strings kept as SHA-256 digests; a token's id is
the first :data:`TOKEN_ID_CHARS` hex digits of its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from notifier.errors import InvalidRequestError

#: Crockford's base32: no I, L, O or U, so a code read off a label is not misread.
CLAIM_CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CODE_CHARS: Final = 12
_MIN_CODE_CHARS: Final = 8
_MAX_CODE_CHARS: Final = 64
#: Hex digits of a token's digest that name it (48 bits).
TOKEN_ID_CHARS: Final = 12
_SALT: Final = b"fixloop claim codes v1"


def claim_key(server_secret: str) -> bytes:
    """The 32-byte key claim codes are hashed under, derived from a server secret (HKDF).

    Args:
        server_secret: the install's secret (``fixloop`` uses the fleet secret).
    """
    if not server_secret:
        raise InvalidRequestError("the claim-code key needs a server secret")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"fixloop claim code")
    return hkdf.derive(server_secret.encode("utf-8"))


def new_claim_code() -> str:
    """A fresh claim code: 12 random base32 characters as ``XXXX-XXXX-XXXX``."""
    raw = "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(_CODE_CHARS))
    return "-".join(raw[i : i + 4] for i in range(0, _CODE_CHARS, 4))


def normalise_claim_code(code: str) -> str:
    """A claim code as it is hashed: upper case, without blanks and dashes, misreads mended.

    ``O`` reads as ``0`` and ``I`` or ``L`` as ``1`` (Crockford's rule), so a code typed
    from a label matches however it was read.

    Raises:
        InvalidRequestError: fewer than 8 or more than 64 letters and digits, or other
            characters.
    """
    text = re.sub(r"[\s-]+", "", code).upper().translate(str.maketrans("OIL", "011"))
    if not re.fullmatch(r"[A-Z0-9]+", text):
        raise InvalidRequestError("a claim code has only letters and digits (and dashes)")
    if not _MIN_CODE_CHARS <= len(text) <= _MAX_CODE_CHARS:
        raise InvalidRequestError(
            f"a claim code has {_MIN_CODE_CHARS} to {_MAX_CODE_CHARS} letters and digits"
        )
    return text


def claim_digest(key: bytes, code: str) -> str:
    """The stored form of a claim code: HMAC-SHA256 of its normalised text, hex."""
    return hmac.new(key, normalise_claim_code(code).encode("ascii"), hashlib.sha256).hexdigest()


def new_token() -> str:
    """A fresh API token or invite code (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def sha256_hex(text: str) -> str:
    """The hex SHA-256 of ``text`` (how invite codes are kept)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_id(token: str) -> str:
    """The id that names a token (the first hex digits of its stored digest)."""
    return sha256_hex(token)[:TOKEN_ID_CHARS]
