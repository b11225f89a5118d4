"""The device registry: product lines, devices, claim codes, invites (notifier; in the case store).

The manufacturer registers product lines (a product model: the name of a product file,
see :mod:`diagnostics.product`) and the devices it makes (model, serial, service region,
firmware, batch). Each device carries a claim code, printed on the appliance or its QR
label: an owner's app posts it to bind the device to the owner (:meth:`claim`), once, and
the owner releases it when selling it on (:meth:`release`). Ops invite owners (a one-time
invite code the owner's app exchanges for a token) and issue and revoke API tokens.

Where things are: :mod:`notifier.registry.model` (the records, the
:class:`DeviceRegistry` and :class:`BrokerAccounts` roles), :mod:`notifier.registry.claims`
(claim codes, invite codes, tokens and their digests), :mod:`notifier.registry.csvimport`
(checking a device to register, reading a device file), :mod:`notifier.registry.rows` (a
registered device's row, for both registries) and :mod:`notifier.registry.sqlite`
(:class:`SqliteRegistry`). The PostgreSQL registry imports the helpers it shares with
the SQLite one from those modules.

How it works:

* **Where.** The tables live in the case store, created by its migration step 5
  (:data:`REGISTRY_STEPS` for SQLite, from :data:`notifier.schema.STEPS`, which also
  registers every device an older store already knew, under a product line of its
  model). :class:`SqliteRegistry` runs its statements on the SQLite store's own
  connection and worker thread (:meth:`notifier.sqlite.SqliteStore.registry`), so a
  claim and the owner loop never see half of each other;
  :class:`notifier.postgres.PostgresRegistry` does the same in PostgreSQL with row
  locks (:meth:`notifier.postgres.PostgresStore.registry`).
* **Ownership.** The registry keeps what the factory knows; who owns a device is the case
  store's ``devices`` table, which the owner loop reads. A claim adds the device there (in
  the same transaction that checks the code), a release removes it.
* **Claim codes** are 12 characters of Crockford's base32 (60 random bits, shown as
  ``XXXX-XXXX-XXXX``), or the manufacturer's own. Only an HMAC-SHA256 of the normalised
  code is kept, under a key derived with HKDF from a server secret (:func:`claim_key`),
  so the table alone does not let anyone try codes offline. A code is looked up by that
  digest; it works while the device is unowned and not retired, so the label still works
  for the next owner after a release.
* **Release on resale.** The seller's cases of the device stay theirs, under an anonymous
  device id (``anon-`` and random hex, also where their evidence, trail, tasks and visit
  notes quote it), and any still open end ``dismissed`` (visits not yet started cancelled), so
  that nothing of theirs is reachable from the device's id by the next owner.
  Notifications and ratings belong to those cases and stay with them.
* **Invites and tokens.** Invite codes and tokens are kept as SHA-256 digests only (both
  are long random strings); an invite works once, until it expires. A token's id is the
  first 12 hex digits of its digest: enough to name it for revocation, useless to sign in.
* **Audit.** Claims, releases, retirements and imports are written to the case store's
  audit trail (no case; the owner's id in the evidence, which erasure removes).

Errors: :class:`~notifier.errors.NotFoundError` (no such device, code or invite),
:class:`~notifier.errors.ConflictError` (claimed already, retired, duplicate serial),
:class:`~notifier.errors.InvalidRequestError` (a value that breaks a rule).
"""

from notifier.registry.claims import (
    CLAIM_CODE_ALPHABET,
    TOKEN_ID_CHARS,
    claim_digest,
    claim_key,
    new_claim_code,
    new_token,
    normalise_claim_code,
    token_id,
)
from notifier.registry.csvimport import (
    DEVICE_COLUMNS,
    ParsedRow,
    check_firmware,
    check_new_device,
    device_from_fields,
    read_device_csv,
)
from notifier.registry.model import (
    BrokerAccounts,
    ClaimOutcome,
    DeviceRegistry,
    DeviceState,
    NewDevice,
    ProductLine,
    RegisteredDevice,
    ReleaseOutcome,
    RowOutcome,
    TokenInfo,
)
from notifier.registry.sqlite import REGISTRY_STEPS, SqliteRegistry

__all__ = [
    "CLAIM_CODE_ALPHABET",
    "DEVICE_COLUMNS",
    "REGISTRY_STEPS",
    "TOKEN_ID_CHARS",
    "BrokerAccounts",
    "ClaimOutcome",
    "DeviceRegistry",
    "DeviceState",
    "NewDevice",
    "ParsedRow",
    "ProductLine",
    "RegisteredDevice",
    "ReleaseOutcome",
    "RowOutcome",
    "SqliteRegistry",
    "TokenInfo",
    "check_firmware",
    "check_new_device",
    "claim_digest",
    "claim_key",
    "device_from_fields",
    "new_claim_code",
    "new_token",
    "normalise_claim_code",
    "read_device_csv",
    "token_id",
]
