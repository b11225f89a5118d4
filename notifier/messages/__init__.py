"""What the owner reads: the message catalogue of the owner loop (notifier).

The case machine says *what* happened (a kind of message and its facts); the outbox asks
this package to put it into short, warm, plain words in the owner's language, then keeps
and pushes the result. The API uses the same words for a case's title and its history.

Every message says what we noticed, what we did or propose, and what the owner needs to
do, if anything, with at most three one-tap actions. Owners never see our internal
names: no fault ids, command names, scores or error codes, only plain phrases ("the drum
bearing is wearing out", "a software update"). Times are shown in the owner's own time
zone, written the way their language writes them.

Each language is one :class:`~notifier.messages.catalogue.Catalogue`, in a module of its
own (:mod:`notifier.messages.en`, :mod:`~notifier.messages.de`,
:mod:`~notifier.messages.fr`): the same templates with the same placeholders and
actions, and the same product, fault, action, reason and state phrases.
:mod:`notifier.messages.catalogue` says what every language must have and
:func:`catalogue_problems` (:mod:`notifier.messages.languages`) lists any difference (the
tests require none). :mod:`notifier.messages.rendering` writes a message or a case's
history from a language's words.

Dates are written from each language's own :class:`~notifier.messages.catalogue.Calendar`
(ten lines of abbreviations and patterns), not with Babel: CLDR's forms are not the ones
our owners read (French ``mar. 1er déc.`` and ``14 h`` against CLDR's ``mar. 1 déc.`` and
``14:00``; English ``Tue 1 Dec`` against ``Tue, Dec 1``), so every language would need
overrides on top of a 9 MB dependency. Plurals likewise: the two counted phrases
(minutes, updates) have a form for one and one for more (``duration_one``,
``duration``), all English, German and French need for counts of one or more; a
language with more plural forms would be the time to adopt CLDR's rules.
"""

from notifier.messages.catalogue import (
    DEFAULT_LANGUAGE,
    FAULTS,
    KINDS,
    MAX_ACTIONS,
    MAX_BODY,
    MAX_TITLE,
    MODELS,
    REFUSALS,
    REMOTE_ACTIONS,
    STATES,
    MessageContext,
    OwnerMessage,
)
from notifier.messages.languages import LANGUAGES, catalogue_problems, resolve_language
from notifier.messages.rendering import (
    action_title,
    device_phrase,
    fault_title,
    plain_history,
    product_name,
    refusal_code,
    render,
    state_title,
)

__all__ = [
    "DEFAULT_LANGUAGE",
    "FAULTS",
    "KINDS",
    "LANGUAGES",
    "MAX_ACTIONS",
    "MAX_BODY",
    "MAX_TITLE",
    "MODELS",
    "REFUSALS",
    "REMOTE_ACTIONS",
    "STATES",
    "MessageContext",
    "OwnerMessage",
    "action_title",
    "catalogue_problems",
    "device_phrase",
    "fault_title",
    "plain_history",
    "product_name",
    "refusal_code",
    "render",
    "resolve_language",
    "state_title",
]
