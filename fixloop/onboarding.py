"""What the onboarding commands and the services share (composition root).

The case store the commands work on (``[notifier] store_url``, else the SQLite file of
:func:`case_store_path`), the claim key and fleet secret, the commands' report and output
streams, device broker accounts in the dynamic-security plugin, and the onboarding
routes a notifier serves (:func:`service_onboarding`, for ``fixloop notifier`` and
``fixloop up``). The commands themselves: :mod:`fixloop.registry_cli` (products, owners,
technicians, tokens, and the parsers) and :mod:`fixloop.device_cli` (devices).
"""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from diagnostics.product import load_products
from fixloop.config import FLEET_SECRET_FILE, ensure_fleet_secret, in_data_dir
from fixloop.dynsec import DynsecClient, generate_password
from fixloop.dynsec_cli import admin_client
from fixloop.settings import Settings
from notifier.admin import Onboarding
from notifier.postgres import PostgresStore
from notifier.registry import claim_key
from notifier.sqlite import SqliteStore
from notifier.store import CaseStore
from notifier.stores import case_store
from wire.protocol.credentials import device_password

__all__ = ["case_store_path", "service_onboarding"]

_LOG = logging.getLogger(__name__)


def case_store_path(settings: Settings) -> Path:
    """The SQLite case store: ``[notifier] db_path`` if set, else the stack's.

    The commands work on it unless ``[notifier] store_url`` names a PostgreSQL database.
    """
    return in_data_dir(settings).notifier.db_path


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201 - the commands' report


def _out(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the commands' output


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _key(settings: Settings) -> bytes:
    settings = ensure_fleet_secret(settings)
    assert settings.stack.fleet_secret is not None  # ensure_fleet_secret filled it in
    return claim_key(settings.stack.fleet_secret.get_secret_value())


def _fleet_secret(settings: Settings) -> str:
    settings = ensure_fleet_secret(settings)
    assert settings.stack.fleet_secret is not None
    return settings.stack.fleet_secret.get_secret_value()


def _now() -> datetime:
    return datetime.now(UTC)


async def _open(settings: Settings) -> SqliteStore | PostgresStore:
    if settings.notifier.store_url is not None:
        return await case_store(settings.notifier).open()
    path = case_store_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    return await SqliteStore(path).open()


# -- broker accounts --------------------------------------------------------------------------


@dataclass
class _Accounts:
    """Device broker accounts in the dynamic-security plugin, when the settings say so."""

    settings: Settings
    random: bool = False

    @property
    def enabled(self) -> bool:
        return self.settings.broker.accounts == "dynsec"

    def passwords(self, device_ids: Sequence[str]) -> dict[str, str]:
        if self.random:
            return {device_id: generate_password() for device_id in device_ids}
        secret = _fleet_secret(self.settings)
        return {device_id: device_password(secret, device_id) for device_id in device_ids}

    async def issue(self, device_ids: Sequence[str]) -> None:
        """Enable the devices' accounts with their derived passwords (a :class:`BrokerAccounts`)."""
        await self.issue_passwords(self.passwords(device_ids))

    async def issue_passwords(self, passwords: dict[str, str]) -> None:
        if not passwords:
            return
        timeout = self.settings.broker.control_timeout_s
        async with DynsecClient(admin_client(self.settings), timeout_s=timeout) as dynsec:
            await dynsec.ensure_devices(passwords)

    async def revoke(self, device_id: str) -> None:
        timeout = self.settings.broker.control_timeout_s
        async with DynsecClient(admin_client(self.settings), timeout_s=timeout) as dynsec:
            await dynsec.revoke_device(device_id, delete=True, missing_ok=True)


def service_onboarding(settings: Settings, store: CaseStore) -> Onboarding | None:
    """The onboarding routes for a notifier on ``store`` (``fixloop notifier``, ``fixloop up``).

    Claim codes need the fleet secret: from ``stack.fleet_secret`` or the data folder's
    ``fleet_secret`` file (never made here: a service must not invent a key the commands
    do not share); without it, claims answer 503. With ``[broker] accounts = "dynsec"``
    devices registered over the API get their broker accounts at once.
    """
    if not isinstance(store, SqliteStore | PostgresStore):
        return None
    secret = settings.stack.fleet_secret
    path = settings.stack.data_dir / FLEET_SECRET_FILE
    text = secret.get_secret_value() if secret is not None else None
    if text is None and path.is_file():
        text = path.read_text(encoding="utf-8").strip() or None
    if text is None:
        _LOG.warning(
            "no fleet secret (stack.fleet_secret, or %s): owners cannot claim devices here", path
        )
    accounts = _Accounts(settings)
    return Onboarding(
        registry=store.registry(),
        claim_key=None if text is None else claim_key(text),
        models=frozenset(load_products(settings.diagnostics.products_dir).products),
        accounts=accounts if accounts.enabled else None,
    )
