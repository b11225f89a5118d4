"""The owner's messages: plain, warm, short, honest, in every language the same."""

# ruff: noqa: RUF001 (the expected texts hold en dashes and typographic quotes on purpose)

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

import pytest

from notifier import messages
from notifier.errors import InvalidRequestError
from notifier.messages import (
    KINDS,
    LANGUAGES,
    MAX_ACTIONS,
    MAX_BODY,
    MAX_TITLE,
    MessageContext,
    action_title,
    catalogue_problems,
    device_phrase,
    fault_title,
    plain_history,
    product_name,
    refusal_code,
    render,
    resolve_language,
    state_title,
)
from notifier.messages.languages import CATALOGUES, _placeholders
from notifier.messages.rendering import _ELLIPSIS
from notifier.model import TRANSITIONS

MODELS = ("washer", "fridge", "heat_pump")
FAULTS = messages.FAULTS
ACTIONS = (*messages.REMOTE_ACTIONS, None)

#: Words and names an owner must never read.
JARGON = (
    *(f for f in FAULTS if f != "unknown"),
    "cleaning_cycle",
    "firmware_update",
    "config_set",
    "selftest",
    "technician_visit",
    "heat_pump",
    "door_open",
    "mid_cycle",
    "low_battery",
    "score",
    "anomal",
    "diagnos",
    "telemetr",
    "confidence",
    "firmware",
    "model",
    "none",
)
_SNAKE = re.compile(r"[a-z]+_[a-z]+")
_ERROR_CODE = re.compile(r"\b[EF]\d{2}\b")
_DECIMAL = re.compile(r"\d+[.,]\d+")


def at(day: int, hour: int, minute: int = 0, month: int = 12, year: int = 2024) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


SLOTS = (
    (at(3, 9), at(3, 11)),
    (at(5, 13), at(5, 15)),
    (at(6, 7), at(6, 9)),
)


def context(**changes: object) -> MessageContext:
    base = MessageContext(
        owner_name="Anna",
        device_label=None,
        model="washer",
        fault="bearing_wear",
        action="restart",
        slots=SLOTS,
        appointment=(at(3, 9), at(3, 11), "Jonas"),
        timezone="Europe/Berlin",
        reason="door_open",
        urgent=False,
        days_to_failure=12.0,
        count=2,
        items=("Your fridge is working again", "How did we do?"),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def text_of(message: messages.OwnerMessage) -> str:
    labels = " ".join(label for _, label in message.actions)
    return f"{message.title}\n{message.body}\n{labels}"


def assert_plain(text: str) -> None:
    lowered = text.lower()
    for word in JARGON:
        assert word not in lowered, f"{word!r} in {text!r}"
    assert not _SNAKE.search(lowered), text
    assert not _ERROR_CODE.search(text), text
    assert "{" not in text
    assert "}" not in text


# -- the catalogue ----------------------------------------------------------------------


def test_every_language_can_say_the_same_things() -> None:
    assert set(LANGUAGES) >= {"en", "de", "fr"}
    assert catalogue_problems() == []
    for code in LANGUAGES:
        assert set(CATALOGUES[code].templates) == set(KINDS)


def test_the_catalogue_check_notices_differences() -> None:
    german = CATALOGUES["de"]
    offer = german.templates["appointment_offer"]
    no_fault = dataclasses.replace(offer, body=tuple(s.replace("{fault}", "") for s in offer.body))
    no_action = dataclasses.replace(offer, actions=(offer.actions[0],))
    faults = {k: v for k, v in german.faults.items() if k != "drain_clog"}
    broken = dataclasses.replace(
        german,
        templates={**german.templates, "appointment_offer": no_fault, "resolved": no_action},
        faults=faults,
    )
    problems = catalogue_problems({"en": CATALOGUES["en"], "de": broken})
    assert any("appointment_offer has other placeholders" in p for p in problems)
    assert any("resolved has other actions" in p for p in problems)
    assert any("faults differ" in p and "drain_clog" in p for p in problems)


def test_the_catalogue_check_notices_missing_phrases_in_english_too() -> None:
    assert set(TRANSITIONS) <= set(messages.STATES)
    english = CATALOGUES["en"]
    states = {k: v for k, v in english.states.items() if k != "visited"}
    products = {k: v for k, v in english.products.items() if k != "fridge"}
    broken = dataclasses.replace(english, states=states, products=products)
    problems = catalogue_problems({"en": broken})
    assert "en: no states entry for 'visited'" in problems
    assert "en: no products entry for 'fridge'" in problems


def test_case_forms_count_as_one_placeholder() -> None:
    assert _placeholders("{Device} für {device_acc} mit {device_dat}") == {"device"}
    assert _placeholders("{hi} {slots}") == {"hi", "slots"}


# -- every message ----------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_message_renders_plainly_within_limits(kind: str, language: str) -> None:
    for model in MODELS:
        for fault in FAULTS:
            for label in (None, "cellar"):
                for action in ACTIONS:
                    ctx = context(model=model, fault=fault, device_label=label, action=action)
                    message = render(kind, language, ctx)
                    assert message.kind == kind
                    assert message.language == language
                    assert 0 < len(message.title) <= MAX_TITLE
                    assert 0 < len(message.body) <= MAX_BODY
                    assert len(message.actions) <= MAX_ACTIONS
                    # nothing was cut short: the templates fit on their own
                    assert _ELLIPSIS not in message.title + message.body
                    assert_plain(text_of(message))
                    if kind != "digest":  # a digest is about all of the owner's devices
                        device = label if label is not None else product_name(model, language)
                        assert device in message.title + message.body
                    assert message.body.startswith(("Hi Anna,", "Hallo Anna,", "Bonjour Anna,"))


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_long_names_and_labels_still_fit(kind: str, language: str) -> None:
    ctx = context(
        owner_name="Maximiliane-Theodora von Hohenberg-Schwarzenfels",
        device_label="the big washing machine in the cellar next to the stairs",
        fault="crash_loop",
        urgent=True,
        days_to_failure=3.0,
        count=12,
        items=tuple(
            f"A very long line about something that happened, number {i}" * 2 for i in range(12)
        ),
    )
    message = render(kind, language, ctx)
    assert len(message.title) <= MAX_TITLE
    assert len(message.body) <= MAX_BODY
    assert_plain(text_of(message))


@pytest.mark.parametrize("kind", KINDS)
def test_every_language_offers_the_same_actions(kind: str) -> None:
    for slots in (SLOTS, SLOTS[:1], ()):
        ids = {
            language: tuple(a for a, _ in render(kind, language, context(slots=slots)).actions)
            for language in LANGUAGES
        }
        assert len(set(ids.values())) == 1, ids


@pytest.mark.parametrize("kind", KINDS)
def test_german_and_french_are_really_translated(kind: str) -> None:
    english = render(kind, "en", context())
    for language in ("de", "fr"):
        other = render(kind, language, context())
        assert other.title != english.title
        assert other.body != english.body
        for (english_id, english_label), (other_id, other_label) in zip(
            english.actions, other.actions, strict=True
        ):
            assert english_id == other_id
            if not english_id.startswith("choose_slot:"):
                assert english_label != other_label


def test_no_sentence_is_left_in_english() -> None:
    english = CATALOGUES["en"]
    english_sentences = {
        text
        for template in english.templates.values()
        for text in (template.title, *template.body)
        if re.search(r"[a-z]{3}", re.sub(r"\{[^}]*\}", "", text))
    }
    for language in LANGUAGES:
        if language == "en":
            continue
        for kind, template in CATALOGUES[language].templates.items():
            for text in (template.title, *template.body):
                assert text not in english_sentences, (language, kind, text)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        render("fix_done_maybe", "en", context())


def test_unknown_language_falls_back_to_english_and_a_region_to_its_language() -> None:
    assert resolve_language("de-AT") == "de"
    assert resolve_language("DE_ch") == "de"
    assert resolve_language("fr-CA") == "fr"
    assert resolve_language("pt-BR") == "en"
    assert resolve_language("") == "en"
    austrian = render("resolved", "de-AT", context())
    assert austrian == render("resolved", "de", context())
    assert austrian.language == "de"
    assert render("resolved", "pt-BR", context()) == render("resolved", "en", context())


def test_naive_times_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        context(slots=((datetime(2024, 12, 3, 9), datetime(2024, 12, 3, 11)),))
    with pytest.raises(InvalidRequestError):
        context(appointment=(datetime(2024, 12, 3, 9), at(3, 11), None))


# -- the voice, pinned ------------------------------------------------------------------


def test_consent_request_in_english_reads_exactly_so() -> None:
    message = render(
        "consent_request",
        "en",
        MessageContext(
            owner_name="Anna",
            device_label=None,
            model="washer",
            fault="controller_hang",
            action="restart",
            timezone="Europe/Berlin",
        ),
    )
    assert message.title == "A quick question about your washing machine"
    assert message.body == (
        "Hi Anna, we noticed that the controls stopped responding. We'd like to restart your"
        " washing machine remotely. It takes about 2 minutes, and it can't be used in the"
        " meantime. Is that all right? If not, we'll suggest a technician visit instead."
    )
    assert message.actions == (("accept_fix", "Yes, go ahead"), ("decline_fix", "No, thanks"))


def test_appointment_offer_in_german_reads_exactly_so() -> None:
    message = render(
        "appointment_offer",
        "de",
        MessageContext(
            owner_name="Jonas",
            device_label="Keller",
            model="heat_pump",
            fault="coil_fouling",
            slots=((at(3, 9), at(3, 11)), (at(5, 13), at(5, 15))),
            timezone="Europe/Berlin",
            days_to_failure=30.0,
        ),
    )
    assert message.title == "Technikerbesuch für Ihre Wärmepumpe „Keller“"
    assert message.body == (
        "Hallo Jonas, wir haben bemerkt, dass der Wärmetauscher im Außengerät zunehmend"
        " verschmutzt; das sollte sich ein Techniker ansehen. Sonst könnte das Gerät in den"
        " kommenden Wochen ausfallen. Wählen Sie einen Termin: Di., 3. Dez., 10:00–12:00"
        " oder Do., 5. Dez., 14:00–16:00."
    )
    assert message.actions == (
        ("choose_slot:0", "Di., 3. Dez., 10:00"),
        ("choose_slot:1", "Do., 5. Dez., 14:00"),
        ("other_times", "Andere Zeiten"),
    )


# -- times ------------------------------------------------------------------------------


def test_times_are_shown_in_the_owners_time_zone() -> None:
    slot = ((at(3, 9), at(3, 11)),)
    berlin = render("appointment_offer", "en", context(slots=slot, timezone="Europe/Berlin"))
    utc = render("appointment_offer", "en", context(slots=slot, timezone="UTC"))
    new_york = render("appointment_offer", "en", context(slots=slot, timezone="America/New_York"))
    assert "Tue 3 Dec, 10:00–12:00" in berlin.body
    assert "Tue 3 Dec, 09:00–11:00" in utc.body
    assert "Tue 3 Dec, 04:00–06:00" in new_york.body
    assert berlin.actions[0] == ("choose_slot:0", "Tue 3 Dec, 10:00")
    assert utc.actions[0] == ("choose_slot:0", "Tue 3 Dec, 09:00")


def test_summer_time_moves_the_hour() -> None:
    winter = ((at(3, 9), at(3, 11)),)
    summer = ((at(2, 9, month=7), at(2, 11, month=7)),)
    assert (
        "Di., 3. Dez., 10:00–12:00" in render("appointment_offer", "de", context(slots=winter)).body
    )
    assert (
        "Di., 2. Juli, 11:00–13:00" in render("appointment_offer", "de", context(slots=summer)).body
    )
    # the night the clocks go forward in Berlin: 01:30 CET is followed by 03:30 CEST
    change = ((at(31, 0, 30, month=3), at(31, 1, 30, month=3)),)
    assert (
        "Sun 31 Mar, 01:30–03:30" in render("appointment_offer", "en", context(slots=change)).body
    )


def test_times_in_each_language_are_written_its_own_way() -> None:
    ctx = context(appointment=(at(1, 9), at(1, 11), "Jonas"), timezone="Europe/Paris")
    assert "on Sun 1 Dec, 10:00–12:00" in render("appointment_booked", "en", ctx).body
    assert "am So., 1. Dez., 10:00–12:00" in render("appointment_booked", "de", ctx).body
    assert "le dim. 1er déc., 10 h–12 h" in render("appointment_booked", "fr", ctx).body


def test_a_visit_across_midnight_names_both_days() -> None:
    ctx = context(slots=((at(3, 22), at(4, 1)),), timezone="UTC")
    assert "Tue 3 Dec, 22:00 – Wed 4 Dec, 01:00" in render("appointment_offer", "en", ctx).body


def test_an_unknown_time_zone_shows_utc() -> None:
    message = render("appointment_booked", "en", context(timezone="Mars/Olympus_Mons"))
    assert "Tue 3 Dec, 09:00–11:00" in message.body


# -- what each message says -------------------------------------------------------------


def test_the_owners_name_for_the_device_is_used() -> None:
    ctx = context(model="fridge", device_label="kitchen fridge")
    assert "your kitchen fridge" in render("resolved", "en", ctx).body
    assert "Ihr Kühlschrank „kitchen fridge“" in render("resolved", "de", ctx).body
    assert device_phrase("fridge", None, "de") == "Ihr Kühlschrank"
    assert device_phrase("heat_pump", None, "en") == "your heat pump"
    assert device_phrase("", None, "fr") == "votre appareil"


def test_german_uses_the_right_grammatical_case() -> None:
    fridge = render("consent_request", "de", context(model="fridge"))
    assert fridge.title == "Eine kurze Frage zu Ihrem Kühlschrank"
    assert "Ihren Kühlschrank aus der Ferne neu starten" in fridge.body
    washer = render("visit_done_checking", "de", context(model="washer"))
    assert "an Ihrer Waschmaschine fertig" in washer.body


def test_remedies_are_told_in_plain_words() -> None:
    ctx = context(fault="drain_clog", action="cleaning_cycle")
    english = render("fixed_remotely", "en", ctx)
    assert "ran a cleaning cycle for the drain pump" in english.body
    assert "nothing you need to do" in english.body
    update = render("consent_request", "en", context(action="firmware_update"))
    assert "install a software update" in update.body
    assert "about 15 minutes" in update.body
    assert "about a minute" in render("consent_request", "en", context(action="config_set")).body
    assert "etwa eine Minute" in render("consent_request", "de", context(action="config_set")).body


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("door_open", "door_open"),
        ("refused: the door is open; will be possible once it is closed", "door_open"),
        ("refused: a wash is running; will be possible after the cycle", "mid_cycle"),
        ("mid_cycle", "mid_cycle"),
        ("Battery low", "low_battery"),
        ("defrosting", "defrosting"),
        ("no answer", None),
        ("refused: 1.2.0 is older than the installed 1.3.0", None),
        (None, None),
        ("", None),
    ],
)
def test_refusal_reasons_are_recognised(reason: str | None, code: str | None) -> None:
    assert refusal_code(reason) == code


def test_a_refusal_is_explained_with_what_the_owner_can_do() -> None:
    raw = "refused: the door is open; will be possible once it is closed"
    english = render("fix_waiting", "en", context(reason=raw))
    assert "It told us that the door is open. If you can, please close the door." in english.body
    german = render("fix_waiting", "de", context(reason=raw))
    assert "dass die Tür offen ist" in german.body
    assert "door" not in german.body
    busy = render("fix_waiting", "en", context(reason="refused: a wash is running"))
    assert "a programme is running" in busy.body
    assert "No need to stop it" in busy.body
    french = render("fix_waiting", "fr", context(reason="mid_cycle"))
    assert "indiqué qu'un programme est en cours" in french.body


def test_an_unknown_refusal_is_told_generically() -> None:
    message = render("fix_waiting", "en", context(reason="E_INTERNAL 0x3f"))
    assert "couldn't be done just then" in message.body
    assert "It told us" not in message.body
    assert "0x3f" not in message.body
    assert "try again" in message.body


@pytest.mark.parametrize(
    ("days", "phrase"),
    [
        (0.4, "very soon"),
        (3.7, "within the next few days"),
        (12.5, "in the next couple of weeks"),
        (40.0, "in the coming weeks"),
        (200.0, "in the coming months"),
    ],
)
def test_time_to_failure_is_a_phrase_never_a_number(days: float, phrase: str) -> None:
    message = render("appointment_offer", "en", context(days_to_failure=days))
    assert f"it could stop working {phrase}." in message.body
    assert not _DECIMAL.search(message.body)
    assert str(days) not in message.body


def test_without_a_predicted_failure_nothing_is_said_about_it() -> None:
    for value in (None, float("nan")):
        message = render("appointment_offer", "en", context(days_to_failure=value))
        assert "stop working" not in message.body
        assert "Pick a time" in message.body


def test_urgency_is_said_only_when_urgent() -> None:
    calm = render("appointment_offer", "en", context(urgent=False))
    urgent = render("appointment_offer", "en", context(urgent=True))
    assert "urgent" not in calm.body
    assert "As it's urgent" in urgent.body


def test_slots_beyond_the_buttons_are_not_offered() -> None:
    message = render("appointment_offer", "en", context(slots=SLOTS))
    assert [a for a, _ in message.actions] == ["choose_slot:0", "choose_slot:1", "other_times"]
    assert "Thu 5 Dec, 14:00–16:00" in message.body
    assert "Fri 6 Dec" not in message.body  # the third slot has no button, so it is not named
    one = render("appointment_offer", "en", context(slots=SLOTS[:1]))
    assert [a for a, _ in one.actions] == ["choose_slot:0", "other_times"]
    none = render("appointment_offer", "en", context(slots=()))
    assert [a for a, _ in none.actions] == ["other_times"]
    assert "We'll send you times" in none.body
    assert "Pick a time" not in none.body


def test_an_appointment_without_a_time_or_name_still_reads_well() -> None:
    message = render("appointment_booked", "en", context(appointment=None))
    assert message.body.startswith("Hi Anna, our technician will come at the agreed time")
    named = render("appointment_reminder", "de", context())
    assert "Jonas kommt am Di., 3. Dez., 10:00–12:00" in named.body


def test_urgent_safety_gives_advice_for_the_product() -> None:
    fridge = render("urgent_safety", "en", context(model="fridge", fault="refrigerant_leak"))
    assert "refrigerant" in fridge.body
    assert "food" in fridge.body
    assert "Lebensmittel" in render("urgent_safety", "de", context(model="fridge")).body
    washer = render("urgent_safety", "en", context(model="washer"))
    assert "please don't use it" in washer.body


def test_rating_request_offers_three_answers_and_a_comment() -> None:
    message = render("rating_request", "en", context())
    assert [a for a, _ in message.actions] == ["rate_good", "rate_bad", "nothing_wrong"]
    assert "comment in the app" in message.body


def test_not_fixed_is_honest_and_names_a_person() -> None:
    message = render("not_fixed_escalated", "en", context())
    assert "haven't been able to fix it yet" in message.body
    assert "person from our service team" in message.body


def test_digest_counts_and_lists() -> None:
    one = render("digest", "en", context(count=1, items=("Your fridge is working again",)))
    assert one.title == "1 update since our last message"
    assert one.body == "Hi Anna, here's what happened:\n• Your fridge is working again"
    many = render("digest", "de", context(count=5, items=("Eins", "Zwei", "Drei", "Vier", "Fünf")))
    assert many.title == "5 Neuigkeiten seit unserer letzten Nachricht"
    assert many.body == (
        "Hallo Anna, das ist inzwischen passiert:\n• Eins\n• Zwei\n• Drei\n"
        "Und 2 weitere in der App."
    )


def test_an_owner_without_a_name_is_still_greeted() -> None:
    assert render("resolved", "en", context(owner_name="")).body.startswith("Hi, good news")
    assert render("resolved", "fr", context(owner_name="")).body.startswith("Bonjour, bonne")


# -- titles and history -----------------------------------------------------------------


def test_fault_and_action_titles_exist_in_plain_words_everywhere() -> None:
    for language in LANGUAGES:
        for model in (*MODELS, ""):
            for fault in FAULTS:
                title = fault_title(fault, model, language)
                assert title
                assert len(title) <= MAX_TITLE
                assert_plain(title)
                if language != "en":
                    assert title != fault_title(fault, model, "en")
        for action in messages.REMOTE_ACTIONS:
            assert_plain(action_title(action, language))
    assert fault_title("bearing_wear", "washer", "en") == "Worn drum bearing"
    assert fault_title("bearing_wear", "washer", "de") == "Verschlissenes Trommellager"
    assert fault_title("no_such_fault", "washer", "en") == "Something not quite right"
    assert action_title("firmware_update", "en") == "Software update"
    assert action_title("technician_visit:bearing", "de") == "Technikerbesuch"
    assert action_title("something_else", "en") == "Remote fix"


def test_every_case_state_has_plain_words_in_every_language() -> None:
    for language in LANGUAGES:
        seen = set()
        for state in TRANSITIONS:
            words = state_title(state, language, "washer")
            assert words.endswith((".", "!"))
            assert_plain(words)
            seen.add(words)
        assert len(seen) == len(TRANSITIONS)
    assert state_title("resolved", "en", "washer") == (
        "All good: your washing machine is working properly again."
    )
    with pytest.raises(InvalidRequestError):
        state_title("limbo", "en")


def test_plain_history_tells_the_owner_what_happened_in_local_time() -> None:
    trail = [
        (at(3, 9, 2), "transition", None, "opened"),
        (at(3, 9, 2), "notify", None, None),
        (at(3, 9, 3), "transition", "opened", "remote_fix"),
        (at(3, 9, 4), "restart", None, None),
        (at(3, 9, 30), "command_refused", None, None),
        (at(3, 10, 0), "transition", "remote_fix", "remote_fix"),
        (at(3, 10, 5), "transition", "remote_fix", "verifying"),
        (at(3, 11, 0), "urgency", None, None),
        (at(4, 8, 0), "transition", "verifying", "resolved"),
        (at(4, 9, 0), "rating", None, None),
    ]
    lines = plain_history(trail, "en", "Europe/Berlin", model="washer")
    assert lines == [
        "3 Dec 10:02 — We noticed a problem with your washing machine and started looking into it.",
        "3 Dec 10:03 — We started fixing your washing machine remotely.",
        "3 Dec 10:04 — We restarted your washing machine remotely.",
        "3 Dec 10:30 — Your washing machine couldn't do it just then, so we waited.",
        "3 Dec 11:00 — We tried another remote fix.",
        "3 Dec 11:05 — We started checking that everything works properly again.",
        "4 Dec 09:00 — All good: your washing machine is working properly again.",
        "4 Dec 10:00 — You told us how it went. Thank you!",
    ]
    german = plain_history(trail[:4], "de-DE", "Europe/Berlin")
    assert german == [
        "3. Dez. 10:02 — Wir haben ein Problem mit Ihrem Gerät bemerkt und uns darum gekümmert.",
        "3. Dez. 10:03 — Wir haben begonnen, Ihr Gerät aus der Ferne zu reparieren.",
        "3. Dez. 10:04 — Wir haben Ihr Gerät aus der Ferne neu gestartet.",
    ]
    assert plain_history(trail[:1], "en", "UTC")[0].startswith("3 Dec 09:02 — ")
    for line in plain_history(trail, "fr", "Europe/Paris", model="fridge"):
        assert_plain(line)


def test_plain_history_refuses_naive_times() -> None:
    with pytest.raises(InvalidRequestError):
        plain_history([(datetime(2024, 12, 3, 9), "transition", None, "opened")], "en", "UTC")


# -- a booked visit moved or cancelled ----------------------------------------------------

#: The visit booked for Tue 3 Dec, 09:00-11:00 UTC, as each language writes it in Berlin.
_BOOKED_AT = {"en": "Tue 3 Dec, 10:00–12:00", "de": "Di., 3. Dez., 10:00–12:00", "fr": "10 h–12 h"}


@pytest.mark.parametrize("language", ["en", "de", "fr"])
def test_a_moved_visit_names_the_old_time_and_offers_new_ones(language: str) -> None:
    message = render("visit_moving", language, context())
    assert _BOOKED_AT[language] in message.body
    assert [a for a, _ in message.actions] == ["choose_slot:0", "choose_slot:1", "other_times"]
    # the new times are in the body too, in the owner's time zone
    second = {"en": "Thu 5 Dec, 14:00", "de": "Do., 5. Dez., 14:00", "fr": "jeu. 5 déc., 14 h"}
    assert second[language] in message.body
    assert_plain(text_of(message))
    without = render("visit_moving", language, context(slots=()))
    assert [a for a, _ in without.actions] == ["other_times"]
    assert CATALOGUES[language].words["no_slots"] in without.body


@pytest.mark.parametrize("language", ["en", "de", "fr"])
@pytest.mark.parametrize("kind", ["visit_cancelled", "visit_cancelled_call", "visit_move_limit"])
def test_a_cancelled_visit_is_told_warmly_with_its_time(language: str, kind: str) -> None:
    message = render(kind, language, context())
    assert _BOOKED_AT[language] in message.body
    assert message.actions == ()  # nothing to tap: it is done, or a person will call
    assert_plain(text_of(message))
    person = {"en": "person", "de": "jemand", "fr": "personne"}[language]
    assert (person in message.body) == (kind != "visit_cancelled")


def test_the_history_tells_a_moved_and_a_cancelled_visit() -> None:
    trail = [
        (at(2, 9), "visit_moved", None, None),
        (at(2, 9), "transition", "booked", "appointment_proposed"),
        (at(2, 10), "visit_cancelled", None, None),
    ]
    for language, words in (
        ("en", ("move the visit", "cancelled")),
        ("de", ("verschieben", "abgesagt")),
        ("fr", ("déplacer", "annulée")),
    ):
        lines = plain_history(trail, language, "Europe/Berlin")
        assert len(lines) == 3
        assert words[0] in lines[0]
        assert words[1] in lines[2]
