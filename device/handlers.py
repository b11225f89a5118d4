"""What a device's command handlers and self-tests give back, and the hooks it registers.

Place in the pipeline: the device maker's code registers a :data:`CommandHandler` per
action and :data:`Interlock` checks on :class:`~device.core.DeviceCore`; each command's
:class:`CommandResult` becomes its one ``command_result`` event, a
:class:`SelfTestResult` a ``selftest`` event. :func:`event_word` says whether a version
can be an event's ``code``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from device.contract import WORD_PATTERN, Command, DataValue, Refusal

__all__ = ["CommandHandler", "CommandResult", "Interlock", "SelfTestResult", "event_word"]

_WORD_RE: Final = re.compile(WORD_PATTERN)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command handler did; becomes the ``command_result`` event.

    Attributes:
        ok: whether the device did it.
        detail: plain words for people (why not, or what happens now).
        code: a short word (an error code, the new firmware version).
        data: named values to report with it.
        then: run after the result is stored and the command acknowledged (and, when
            connected, published): the restart itself, so the answer is not lost with
            the process. After a ``restart`` or ``firmware_update`` with ``then``, the
            next boot reports reset reason ``restart_command`` or ``firmware_update``.
    """

    ok: bool
    detail: str | None = None
    code: str | None = None
    data: Mapping[str, DataValue] = field(default_factory=dict)
    then: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """A self-test's verdict; becomes a ``selftest`` event.

    Attributes:
        passed: whether everything passed.
        code: verdict or first fault code (``PASS``, ``E21``).
        detail: what was found, in plain words.
        data: the measurements.
    """

    passed: bool
    code: str | None = None
    detail: str | None = None
    data: Mapping[str, DataValue] = field(default_factory=dict)


#: A command handler: gets the command, returns what it did.
CommandHandler = Callable[[Command], CommandResult]
#: An interlock: ``None`` when the action is safe now, else why not.
Interlock = Callable[[], Refusal | None]


def event_word(value: str | None) -> str | None:
    """``value`` when it can be an event ``code``, else ``None`` (a free-form version)."""
    if value is None or _WORD_RE.fullmatch(value) is None:
        return None
    return value
