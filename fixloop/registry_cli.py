"""Onboarding by command: product lines, devices, owners, technicians, tokens (composition root).

``fixloop products add|list``, ``fixloop devices import|add|list|retire``, ``fixloop owners
invite|link-subject|unlink-subject|subjects``, ``fixloop technicians add`` and ``fixloop
tokens issue|revoke`` work on the configured case store (``[notifier] store_url`` when set,
else ``[notifier] db_path`` when set, else ``cases.sqlite3`` in ``stack.data_dir``, as
``fixloop up`` keeps it) through
:mod:`notifier.registry`, the same code the ops role's REST routes use. This module
parses them all and carries out all but the device commands (:mod:`fixloop.device_cli`);
what they share with the services is :mod:`fixloop.onboarding`.

* Claim codes are hashed under a key derived from the fleet secret
  (:func:`notifier.registry.claim_key`): the notifier that takes the claims must have
  the same one (``stack.fleet_secret``, or the ``fleet_secret`` file of the data folder).
* A code is shown once: ``devices add`` prints it; ``devices import`` writes
  ``device_id,model,serial,claim_code`` rows for the labels to ``--labels FILE`` (mode
  0600), or to stdout. Reports and progress go to stderr.
* ``devices import`` streams the file in chunks (each chunk one transaction), names each
  bad row by its line and column, and exits 1 when any row failed.
* With ``[broker] accounts = "dynsec"`` devices added or imported get their broker
  account at once, and a retired device's account is deleted (which disconnects it),
  through Mosquitto's dynamic-security plugin (:mod:`fixloop.dynsec`); passwords are
  those derived from the fleet secret, or with ``--random-passwords`` new ones written
  to the labels file (column ``mqtt_password``) for the factory to flash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from datetime import time, timedelta
from pathlib import Path
from typing import Any, Final

from diagnostics.product import load_products
from fixloop.device_cli import add_device, import_devices, list_devices, retire_device
from fixloop.onboarding import (
    _now,
    _open,
    _out,
    _say,
)
from fixloop.settings import Settings
from notifier.errors import ConflictError, NotFoundError
from notifier.model import Owner, Technician, Window
from notifier.registry import (
    ProductLine,
    new_token,
    token_id,
)
from notifier.store import PrincipalKind
from wire.errors import ConfigError

__all__ = [
    "COMMANDS",
    "add_device_parsers",
    "add_parsers",
    "add_product_parsers",
    "handles",
    "run",
]

_LOG = logging.getLogger(__name__)

#: Top-level commands of this module (``products`` and ``devices`` are shared).
COMMANDS: Final = frozenset(("owners", "technicians", "tokens"))
_PRODUCT_ACTIONS: Final = frozenset(("add", "list"))
_DEVICE_ACTIONS: Final = frozenset(("import", "add", "list", "retire"))
_CHUNK: Final = 500
_INVITE_TTL: Final = timedelta(days=14)
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LABEL_COLUMNS: Final = ("device_id", "model", "serial", "claim_code")
_MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0, 2: sub


# -- parsers ----------------------------------------------------------------------------------


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="the data folder whose case store to use (stack.data_dir)"
    )


def add_product_parsers(product_actions: Any) -> None:
    """Add ``add`` and ``list`` to ``fixloop products``."""
    add = product_actions.add_parser(
        "add", help="register a product line (a model with a product file) for devices"
    )
    add.add_argument("model", metavar="MODEL", help="the product model (its product file's)")
    add.add_argument("--name", help="its name for people (default: the model)")
    _data_dir(add)
    listing = product_actions.add_parser("list", help="the product lines and their devices")
    _data_dir(listing)


def add_device_parsers(device_actions: Any) -> None:
    """Add ``import``, ``add``, ``list`` and ``retire`` to ``fixloop devices``."""
    imp = device_actions.add_parser(
        "import", help="register devices from a CSV file (a report per row; 1 if any failed)"
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="CSV with model,serial,...")
    imp.add_argument(
        "--labels",
        type=Path,
        metavar="OUT.csv",
        help="write device_id,model,serial,claim_code here (default: stdout)",
    )
    imp.add_argument(
        "--random-passwords",
        action="store_true",
        help="with dynsec accounts: new random broker passwords, in the labels file",
    )
    imp.add_argument(
        "--progress", action="store_true", help="report progress on stderr even into a pipe"
    )
    _data_dir(imp)

    add = device_actions.add_parser("add", help="register one device; prints its claim code")
    add.add_argument("--model", required=True, help="its product line")
    add.add_argument("--serial", required=True, help="its serial number")
    add.add_argument("--device-id", help="its id on the wire (default MODEL-SERIAL)")
    add.add_argument("--region", help="its service region (default 'default')")
    add.add_argument("--firmware", help="the firmware it leaves the factory with")
    add.add_argument("--batch", help="its production batch")
    add.add_argument("--claim-code", help="its claim code (default: a new one)")
    add.add_argument(
        "--random-password",
        action="store_true",
        help="with dynsec accounts: a new random broker password, printed once",
    )
    _data_dir(add)

    listing = device_actions.add_parser("list", help="registered devices and their state")
    listing.add_argument("--model", help="only this product line")
    listing.add_argument(
        "--state", choices=["unclaimed", "claimed", "retired"], help="only devices in this state"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _data_dir(listing)

    retire = device_actions.add_parser(
        "retire", help="take a device out of service (its claim code and broker login stop)"
    )
    retire.add_argument("device_id", metavar="DEVICE_ID")
    _data_dir(retire)


def add_parsers(commands: Any) -> None:
    """Add ``owners``, ``technicians`` and ``tokens`` to the ``fixloop`` commands."""
    owners = commands.add_parser(
        "owners", help="device owners: invite one, link their identity-provider sign-ins"
    )
    owner_actions = owners.add_subparsers(dest="owners_command", required=True, metavar="ACTION")
    invite = owner_actions.add_parser(
        "invite", help="create an owner and a one-time invite code for their app"
    )
    invite.add_argument("--name", required=True, help="how messages address them")
    invite.add_argument("--language", default="en", help="message language (en)")
    invite.add_argument("--timezone", default="UTC", help="IANA time zone (UTC)")
    invite.add_argument("--region", default="default", help="service region (default)")
    invite.add_argument(
        "--consent",
        choices=["fix_and_tell", "ask_if_interrupting", "always_ask"],
        default="ask_if_interrupting",
        help="which remote fixes may run without asking",
    )
    invite.add_argument(
        "--token", action="store_true", help="also issue an API token now (printed once)"
    )
    _data_dir(invite)
    for action, words in (
        ("link-subject", "link a sign-in of the identity provider (its sub) to an owner"),
        ("unlink-subject", "unlink a sign-in of the identity provider from an owner"),
    ):
        link = owner_actions.add_parser(action, help=words)
        link.add_argument("owner_id", metavar="OWNER_ID")
        link.add_argument("subject", metavar="SUBJECT", help="the provider's sub for the person")
        link.add_argument(
            "--issuer",
            help="the provider, as its tokens' iss says (default [notifier.oidc] issuer)",
        )
        _data_dir(link)
    subjects = owner_actions.add_parser(
        "subjects", help="the identity-provider sign-ins linked to an owner"
    )
    subjects.add_argument("owner_id", metavar="OWNER_ID")
    _data_dir(subjects)

    technicians = commands.add_parser("technicians", help="service technicians: add one")
    tech_actions = technicians.add_subparsers(
        dest="technicians_command", required=True, metavar="ACTION"
    )
    add = tech_actions.add_parser("add", help="add (or change) a technician, with an API token")
    add.add_argument("--name", required=True, help="display name")
    add.add_argument("--region", required=True, help="the region they serve")
    add.add_argument("--skills", required=True, help="parts they service, comma separated")
    add.add_argument("--id", dest="technician_id", help="their id (default: a new one)")
    add.add_argument("--timezone", default="UTC", help="IANA time zone of their hours (UTC)")
    add.add_argument(
        "--hours",
        default="mon-fri 08:00-17:00",
        help="weekly hours, e.g. 'mon-fri 08:00-17:00, sat 09:00-12:00'",
    )
    add.add_argument("--no-token", action="store_true", help="issue no API token")
    _data_dir(add)

    tokens = commands.add_parser("tokens", help="API tokens: issue and revoke")
    token_actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    issue = token_actions.add_parser("issue", help="issue a token (printed once, on stdout)")
    issue.add_argument("--role", required=True, choices=["ops", "owner", "technician"])
    issue.add_argument(
        "--id", dest="principal_id", required=True, help="owner or technician id, or ops name"
    )
    _data_dir(issue)
    revoke = token_actions.add_parser("revoke", help="revoke a token by its id, or all of someone")
    revoke.add_argument("token_id", nargs="?", metavar="TOKEN_ID", help="the id issue printed")
    revoke.add_argument("--all-of", metavar="ROLE:ID", help="every token of ops:NAME, owner:ID ...")
    _data_dir(revoke)


# -- helpers ----------------------------------------------------------------------------------


def _hours(text: str) -> tuple[Window, ...]:
    """Parse ``mon-fri 08:00-17:00, sat 09:00-12:00`` into weekly windows."""
    windows: list[Window] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(
            r"([a-z]{3})(?:-([a-z]{3}))?\s+(\d{1,2}:\d{2})-(\d{1,2}:\d{2})", part.lower()
        )
        if match is None or match.group(1) not in _DAYS or (match.group(2) or "mon") not in _DAYS:
            raise ConfigError(f"--hours: {part!r} is not like 'mon-fri 08:00-17:00'")
        first = _DAYS.index(match.group(1))
        last = _DAYS.index(match.group(2)) if match.group(2) else first
        try:
            start = time.fromisoformat(match.group(3).zfill(5))
            end = time.fromisoformat(match.group(4).zfill(5))
        except ValueError as exc:
            raise ConfigError(f"--hours: {part!r} has a time that is not one") from exc
        if end <= start or last < first:
            raise ConfigError(f"--hours: {part!r} must end after it starts, within a week")
        windows += [Window(day, start, end) for day in range(first, last + 1)]
    return tuple(windows)


# -- products ---------------------------------------------------------------------------------


async def _products(args: argparse.Namespace, settings: Settings) -> int:
    models = load_products(settings.diagnostics.products_dir).products
    store = await _open(settings)
    try:
        registry = store.registry()
        if args.products_command == "add":
            if args.model not in models:
                raise ConfigError(
                    f"no product file describes {args.model!r} (known: {', '.join(sorted(models))})"
                    ": put its file in the products folder (diagnostics.products_dir) and "
                    "check it with `fixloop products check FILE`"
                )
            line = await registry.put_product_line(
                ProductLine(args.model, args.name or args.model, _now())
            )
            _out(f"product line {line.model} ({line.name}) registered; {line.devices} devices")
            return 0
        for line in await registry.product_lines():
            known = "" if line.model in models else "  (no product file here)"
            _out(f"{line.model}\t{line.name}\t{line.devices} devices{known}")
        return 0
    finally:
        await store.close()


# -- devices ----------------------------------------------------------------------------------

# -- owners, technicians, tokens --------------------------------------------------------------


async def _invite(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(args.timezone)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"--timezone: {args.timezone!r} is not an IANA time zone") from exc
    owner = Owner(
        owner_id=f"o-{new_token()[:16]}",
        name=args.name,
        language=args.language,
        timezone=args.timezone,
        region=args.region,
        consent=args.consent,
    )
    invite = new_token()
    expires_at = _now() + _INVITE_TTL
    store = await _open(settings)
    try:
        await store.put_owner(owner)
        await store.registry().add_invite(invite, owner.owner_id, expires_at)
        token = None
        if args.token:
            token = new_token()
            await store.add_token(token, ("owner", owner.owner_id))
    finally:
        await store.close()
    _out(f"owner\t{owner.owner_id}")
    _out(f"invite\t{invite}")
    if token is not None:
        _out(f"token\t{token}")
    _say(
        f"owner {owner.owner_id} invited: their app exchanges the invite for a token at "
        f"POST /api/v1/invites/accept until {expires_at:%Y-%m-%d %H:%M} UTC; shown only now"
    )
    return 0


async def _subjects(args: argparse.Namespace, settings: Settings) -> int:
    issuer = getattr(args, "issuer", None) or settings.notifier.oidc.issuer
    if args.owners_command != "subjects":
        if issuer is None:
            raise ConfigError("--issuer: needed, as [notifier.oidc] names no issuer")
        if not 0 < len(args.subject) <= _MAX_SUBJECT_CHARS or not args.subject.isprintable():
            raise ConfigError("SUBJECT: the provider's sub, 1 to 255 printable characters")
    store = await _open(settings)
    try:
        if await store.get_owner(args.owner_id) is None:
            raise ConfigError(f"OWNER_ID: there is no owner {args.owner_id}")
        if args.owners_command == "subjects":
            for found_issuer, subject in await store.subjects_of(args.owner_id):
                _out(f"{found_issuer}\t{subject}")
            return 0
        assert issuer is not None
        if args.owners_command == "link-subject":
            try:
                await store.link_subject(issuer, args.subject, args.owner_id)
            except ConflictError as exc:
                raise ConfigError(f"SUBJECT: {exc}") from exc
            _out(f"{args.subject} of {issuer} linked to owner {args.owner_id}")
            return 0
        if not await store.unlink_subject(issuer, args.subject, args.owner_id):
            _say(f"{args.subject} of {issuer} is not linked to owner {args.owner_id}")
            return 1
        _out(f"{args.subject} of {issuer} unlinked from owner {args.owner_id}")
        return 0
    finally:
        await store.close()


async def _technician(args: argparse.Namespace, settings: Settings) -> int:
    skills = frozenset(s.strip() for s in args.skills.split(",") if s.strip())
    if not skills or not all(re.fullmatch(r"[a-z][a-z0-9_]{0,39}", s) for s in skills):
        raise ConfigError("--skills: part names like bearing,drain_pump, comma separated")
    technician = Technician(
        technician_id=args.technician_id or f"t-{new_token()[:16]}",
        name=args.name,
        region=args.region,
        skills=skills,
        timezone=args.timezone,
        hours=_hours(args.hours),
    )
    store = await _open(settings)
    try:
        await store.put_technician(technician)
        token = None
        if not args.no_token:
            token = new_token()
            await store.add_token(token, ("technician", technician.technician_id))
    finally:
        await store.close()
    _out(f"technician\t{technician.technician_id}")
    if token is not None:
        _out(f"token\t{token}")
        _say(f"token id {token_id(token)} (to revoke it); the token is shown only now")
    return 0


_ROLES: Final[dict[str, PrincipalKind]] = {
    "ops": "ops",
    "owner": "owner",
    "technician": "technician",
}


async def _tokens(args: argparse.Namespace, settings: Settings) -> int:
    store = await _open(settings)
    try:
        if args.tokens_command == "issue":
            role = _ROLES[args.role]
            if role == "owner" and await store.get_owner(args.principal_id) is None:
                raise ConfigError(f"--id: there is no owner {args.principal_id}")
            if role == "technician" and await store.get_technician(args.principal_id) is None:
                raise ConfigError(f"--id: there is no technician {args.principal_id}")
            token = new_token()
            await store.add_token(token, (role, args.principal_id))
            _out(token)
            _say(
                f"{role} token for {args.principal_id} issued, id {token_id(token)} (to revoke "
                "it); the token above is shown only now"
            )
            return 0
        registry = store.registry()
        if args.all_of is not None:
            kind, _, principal = args.all_of.partition(":")
            if kind not in _ROLES or not principal:
                raise ConfigError("--all-of: ROLE:ID with ROLE ops, owner or technician")
            count = await registry.revoke_tokens_of(_ROLES[kind], principal)
            _out(f"{count} tokens of {kind} {principal} revoked")
            return 0
        if args.token_id is None:
            raise ConfigError("tokens revoke: give TOKEN_ID or --all-of ROLE:ID")
        try:
            kind, principal = await registry.revoke_token(args.token_id)
        except NotFoundError as exc:
            raise ConfigError(str(exc)) from exc
        _out(f"token {args.token_id} of {kind} {principal} revoked")
        return 0
    finally:
        await store.close()


# -- entry ------------------------------------------------------------------------------------


def handles(args: argparse.Namespace) -> bool:
    """Whether this module carries out the parsed command."""
    if args.command in COMMANDS:
        return True
    if args.command == "products":
        return getattr(args, "products_command", None) in _PRODUCT_ACTIONS
    if args.command == "devices":
        return getattr(args, "devices_command", None) in _DEVICE_ACTIONS
    return False


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Carry out one onboarding command; return the exit status.

    Raises:
        ConfigError: a wrong argument, an unreadable file, an unknown model or device.
        FixloopError: the case store or the broker failed.
    """
    if args.command == "products":
        return asyncio.run(_products(args, settings))
    if args.command == "devices":
        if args.devices_command == "import" and not args.file.is_file():
            raise ConfigError(f"{args.file}: no such file")
        action = {
            "import": import_devices,
            "add": add_device,
            "list": list_devices,
            "retire": retire_device,
        }
        return asyncio.run(action[args.devices_command](args, settings))
    if args.command == "owners":
        if args.owners_command == "invite":
            return asyncio.run(_invite(args, settings))
        return asyncio.run(_subjects(args, settings))
    if args.command == "technicians":
        return asyncio.run(_technician(args, settings))
    return asyncio.run(_tokens(args, settings))
