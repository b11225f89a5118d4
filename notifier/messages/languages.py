"""The languages the owner's messages are written in, and their agreement (notifier).

Part of :mod:`notifier.messages`. :data:`CATALOGUES` holds one :class:`Catalogue` per
language; :func:`resolve_language` picks one for a language tag; and
:func:`catalogue_problems` lists where a language differs from English in what it can
say (the tests require no difference). German needs its nouns in more than one
grammatical case: ``{device_acc}`` and ``{device_dat}`` are forms of ``{device}`` and
count as the same placeholder.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Final

from notifier.messages import de, en, fr
from notifier.messages.catalogue import (
    DEFAULT_LANGUAGE,
    FAULTS,
    HISTORY_STEPS,
    KINDS,
    MODELS,
    REFUSALS,
    REMOTE_ACTIONS,
    STATES,
    Catalogue,
    Template,
)

__all__ = ["CATALOGUES", "LANGUAGES", "catalogue_problems", "resolve_language"]

_CASE_SUFFIXES: Final = ("_acc", "_dat")

#: Language code -> everything that language says.
CATALOGUES: Final[Mapping[str, Catalogue]] = {
    c.code: c for c in (en.CATALOGUE, de.CATALOGUE, fr.CATALOGUE)
}
#: Languages messages are written in.
LANGUAGES: Final = tuple(CATALOGUES)


# -- checking the catalogue -------------------------------------------------------------


def _placeholders(text: str) -> set[str]:
    """The placeholders of ``text``, case forms counted as one (``device_acc`` -> ``device``)."""
    names: set[str] = set()
    for _, name, _, _ in string.Formatter().parse(text):
        if name is None:
            continue
        base = name.lower()
        for suffix in _CASE_SUFFIXES:
            base = base.removesuffix(suffix)
        names.add(base)
    return names


def _template_placeholders(template: Template) -> set[str]:
    found = _placeholders(template.title)
    for sentence in template.body:
        found |= _placeholders(sentence)
    return found


def catalogue_problems(
    catalogues: Mapping[str, Catalogue] | None = None,
) -> list[str]:
    """List how the languages differ from English in what they can say.

    Every language must have every kind with the same placeholders and actions, and the
    same products, faults, actions, refusal reasons, states, history steps, button labels
    and small words.

    Args:
        catalogues: the catalogues to check (default: the installed ones).

    Returns:
        One line per difference; empty when all languages agree.
    """
    catalogues = CATALOGUES if catalogues is None else catalogues
    reference = catalogues[DEFAULT_LANGUAGE]
    problems: list[str] = []
    required = {
        "templates": KINDS,
        "products": MODELS,
        "faults": FAULTS,
        "actions": (*REMOTE_ACTIONS, "technician_visit", ""),
        "reasons": REFUSALS,
        "states": STATES,
        "steps": HISTORY_STEPS,
    }
    for table, names in required.items():
        missing = set(names) - set(getattr(reference, table))
        problems += [f"en: no {table} entry for {name!r}" for name in sorted(missing)]
    for code, catalogue in catalogues.items():
        for table in (
            "templates",
            "products",
            "faults",
            "fault_models",
            "actions",
            "action_models",
            "reasons",
            "states",
            "steps",
            "labels",
            "words",
        ):
            mine, theirs = set(getattr(catalogue, table)), set(getattr(reference, table))
            if mine != theirs:
                problems.append(f"{code}: {table} differ: {sorted(mine ^ theirs)}")
        for kind, template in reference.templates.items():
            other = catalogue.templates.get(kind)
            if other is None:
                continue
            if _template_placeholders(other) != _template_placeholders(template):
                problems.append(f"{code}: {kind} has other placeholders")
            if other.actions != template.actions:
                problems.append(f"{code}: {kind} has other actions")
        for key, word in reference.words.items():
            other_word = catalogue.words.get(key)
            if other_word is not None and _placeholders(other_word) != _placeholders(word):
                problems.append(f"{code}: word {key} has other placeholders")
    return problems


def resolve_language(language: str | None) -> str:
    """Return the catalogue language for a language tag (``de-AT`` -> ``de``; else English)."""
    if not language:
        return DEFAULT_LANGUAGE
    tag = language.strip().lower().replace("_", "-")
    if tag in CATALOGUES:
        return tag
    base = tag.split("-", 1)[0]
    return base if base in CATALOGUES else DEFAULT_LANGUAGE
