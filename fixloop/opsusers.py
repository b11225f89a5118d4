"""``fixloop ops-users add|passwd|remove|list``: the dashboard's ops users, by command.

Users live in the ops users file (:func:`ops_users_file`: ``dashboard.users_file`` when
set, else ``ops-users.json`` in ``stack.data_dir``;
:class:`~dashboard.users.OpsUsersFile`: scrypt hashes only, written atomically under a
lock); a running ``fixloop dashboard`` reads the file again when it changes and ends the
sessions of users removed or changed, and ``fixloop up`` takes the users of its data
folder's file when it has any (else it makes the demo's ``ops`` user).

A password is never taken from the command line (it would show in ``ps`` and the shell
history): it is asked for twice on a terminal, else read as the first line of standard
input (``fixloop ops-users add alice --role admin < password.txt``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import IO, Any, Final

from fixloop.settings import Settings

__all__ = ["OPS_USERS_FILE", "ROLES", "add_parser", "ops_users_file", "read_password", "run"]

#: The ops roles, lowest first (``dashboard.auth.ROLE_RANK``; named here so that building
#: the command line does not import the dashboard).
ROLES: Final = ("viewer", "agent", "admin")
#: The ops users file's name in a data folder.
OPS_USERS_FILE: Final = "ops-users.json"


def ops_users_file(settings: Settings) -> Path:
    """The ops users file: ``dashboard.users_file`` when set, else the data folder's.

    The same rule as the case store's (``notifier.db_path`` when set, else
    ``cases.sqlite3`` in ``stack.data_dir``), so ``fixloop ops-users --data-dir D`` writes
    the users ``fixloop up --data-dir D`` and ``fixloop dashboard`` read.
    """
    if "users_file" in settings.dashboard.model_fields_set:
        return settings.dashboard.users_file
    return settings.stack.data_dir / OPS_USERS_FILE


def add_parser(commands: Any) -> None:
    """Add the ``ops-users`` command to the CLI's subcommands."""
    users = commands.add_parser(
        "ops-users", help="manage the dashboard's ops users (passwords from a prompt or stdin)"
    )
    actions = users.add_subparsers(dest="ops_users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a user (password asked, or read from stdin)")
    add.add_argument("username", help="login name")
    add.add_argument("--role", choices=ROLES, default="viewer", help="what they may do (viewer)")
    add.add_argument("--name", default="", help="display name")
    passwd = actions.add_parser("passwd", help="set a user's password (their sessions end)")
    passwd.add_argument("username", help="login name")
    remove = actions.add_parser("remove", help="remove a user (their sessions end)")
    remove.add_argument("username", help="login name")
    listing = actions.add_parser("list", help="list the users and their roles")
    for action in (add, passwd, remove, listing):
        action.add_argument(
            "--data-dir",
            type=Path,
            help=f"the data folder whose {OPS_USERS_FILE} to use (stack.data_dir), unless "
            "dashboard.users_file is set",
        )


def read_password(stdin: IO[str], *, prompt: bool) -> str:
    """Read a new password: asked twice on a terminal, else the first line of ``stdin``.

    Raises:
        InvalidRequestError: the two entries differ, nothing was given, or it is too short.
    """
    from dashboard.users import check_password
    from notifier.errors import InvalidRequestError

    if prompt:
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            raise InvalidRequestError("the passwords differ")
        return check_password(first)
    line = stdin.readline()
    if not line:
        raise InvalidRequestError("no password on standard input")
    return check_password(line.removesuffix("\n").removesuffix("\r"))


def run(args: argparse.Namespace, settings: Settings, stdin: IO[str] | None = None) -> int:
    """Carry out one ``ops-users`` action; return the exit status.

    Raises:
        FixloopError: the action failed (an existing or unknown user, a bad password ...).
    """
    from dashboard.auth import hash_password
    from dashboard.users import OpsUsersFile, check_username
    from notifier.errors import ConflictError, NotFoundError

    source = sys.stdin if stdin is None else stdin
    users = OpsUsersFile(ops_users_file(settings))
    action = args.ops_users_command
    if action == "list":
        users.load()
        for user in users.users():
            print(f"{user.username}\t{user.role}\t{user.name}")  # noqa: T201 - the output
        return 0
    username = check_username(args.username)
    if action == "remove":
        users.remove(username)
        print(f"ops user {username} removed")  # noqa: T201
        return 0
    # asked before the password is: no prompt for a change that cannot be made
    users.load()
    known = {user.username for user in users.users()}
    if action == "passwd" and username not in known:
        raise NotFoundError(f"no ops user {username}")
    if action == "add" and username in known:
        raise ConflictError(f"ops user {username} exists (change the password: passwd)")
    password = read_password(source, prompt=source.isatty())
    if action == "add":
        user = users.add(username, args.role, hash_password(password), args.name)
        print(f"ops user {username} added ({user.role})")  # noqa: T201
    else:
        users.set_password(username, hash_password(password))
        print(f"ops user {username}: password changed")  # noqa: T201
    return 0
