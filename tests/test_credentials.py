"""Secrets derived from the fleet secret: one key per purpose, no crossing between them."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fixloop.demo import demo_token
from fixloop.stackaccounts import service_password
from wire.protocol import is_valid_device_id
from wire.protocol.credentials import device_password, purpose_key

SECRET = "a-fleet-secret-of-reasonable-length"


def test_purpose_keys_are_hkdf_sha256() -> None:
    for purpose in ("device password", "service password", "demo api token"):
        expected = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"fixloop fleet secret v2",
            info=f"fixloop {purpose}".encode(),
        ).derive(SECRET.encode())
        assert purpose_key(SECRET, purpose) == expected  # type: ignore[arg-type]


def test_a_device_named_like_a_service_user_gets_no_service_password() -> None:
    # before, a service password was the device password of "service:<user>"
    sneaky = "service:fixloop-gateway"
    assert is_valid_device_id(sneaky)
    assert device_password(SECRET, sneaky) != service_password(SECRET, "fixloop-gateway")


def test_tokens_and_passwords_do_not_derive_from_each_other() -> None:
    assert demo_token(SECRET, "o-1") != device_password(SECRET, "api:o-1")
    assert demo_token(SECRET, "o-1") not in {device_password(SECRET, "o-1"), SECRET}
    assert len({purpose_key(SECRET, p) for p in ("device password", "service password")}) == 2
    # each secret depends on the fleet secret
    assert device_password(SECRET, "dev-1") != device_password(SECRET + "x", "dev-1")
    assert device_password(SECRET, "dev-1") == device_password(SECRET, "dev-1")
