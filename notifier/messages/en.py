"""The owner's messages in English (notifier; one language of :mod:`notifier.messages`).

Every template, product, fault, remedy, reason, state and history phrase, button label
and small word, with the same placeholders and actions as every other language
(:func:`notifier.messages.catalogue_problems` finds any difference).
"""

from __future__ import annotations

from typing import Final

from notifier.messages.catalogue import SLOT_ACTION, Calendar, Catalogue, Product, Template

# The catalogue is prose: en dashes, quotation marks and typographic apostrophes are
# meant, not look-alikes of ASCII characters.
# ruff: noqa: RUF001

__all__ = ["CATALOGUE"]


def _en_product(noun: str) -> Product:
    your = f"your {noun}"
    return Product(noun, (your, your, your), ("your {label}",) * 3)


CATALOGUE: Final = Catalogue(
    code="en",
    templates={
        "fixed_remotely": Template(
            "{Device} is working again",
            (
                "{hi} we noticed that {fault}.",
                "We {action_done} and checked afterwards: it's working normally again.",
                "There's nothing you need to do.",
            ),
        ),
        "consent_request": Template(
            "A quick question about {device}",
            (
                "{hi} we noticed that {fault}.",
                "We'd like to {action_do}. It takes {duration}, and it can't be used in the"
                " meantime. Is that all right?",
                "If not, we'll suggest a technician visit instead.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": Template(
            "We'll try again a little later",
            (
                "{hi} we wanted to {action_do}, but it couldn't be done just then.",
                "It told us that {reason}.",
                "{advice}",
                "We'll try again by ourselves in a little while.",
            ),
            optional=(3,),
        ),
        "appointment_offer": Template(
            "A technician visit for {device}",
            (
                "{hi} we noticed that {fault}; a technician should take a look.",
                "Left as it is, it could stop working {when}.",
                "{urgent}",
                "Pick a time that suits you: {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": Template(
            "Your technician visit is booked",
            (
                "{hi} {who} will come {appointment} to look at {device}.",
                "Please make sure someone is at home.",
                "If the time no longer suits you, you can change it.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": Template(
            "Reminder: your technician visit",
            (
                "{hi} just a reminder that {who} will come {appointment} to look at {device}.",
                "Please make sure someone is at home.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": Template(
            "New times for your technician visit",
            (
                "{hi} no problem: we've cancelled the visit {appointment} for {device}.",
                "Pick a new time that suits you: {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": Template(
            "Your technician visit is cancelled",
            (
                "{hi} as you asked, we've cancelled the technician visit {appointment}"
                " for {device}.",
                "If we notice anything else, we'll let you know.",
                "There's nothing you need to do.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": Template(
            "We'll be in touch about {device}",
            (
                "{hi} as you asked, we've cancelled the technician visit {appointment}.",
                "As {device} needs fixing soon, a person from our service team will contact"
                " you to find another way.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": Template(
            "We'll call you to find a visit time",
            (
                "{hi} we're sorry that finding a good time for the visit for {device} hasn't"
                " been easy.",
                "We've freed up the visit {appointment}, and a person from our service team"
                " will call you soon to agree on a time that suits you.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": Template(
            "The technician visit is done",
            (
                "{hi} {who} has finished working on {device}.",
                "We're now checking that everything runs as it should, and we'll let you know.",
                "There's nothing you need to do.",
            ),
        ),
        "resolved": Template(
            "{Device} is working properly again",
            (
                "{hi} good news: since the technician's visit, {device} has been working"
                " as it should.",
                "Thank you for your patience.",
            ),
        ),
        "not_fixed_escalated": Template(
            "Sorry, it's not fixed yet",
            (
                "{hi} we're sorry: {device} still isn't working as it should, and we haven't"
                " been able to fix it yet.",
                "A person from our service team will contact you soon to sort it out.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "rating_request": Template(
            "How did we do?",
            (
                "{hi} now that {device} is working again, we'd love to hear how it went.",
                "Tap below, and add a comment in the app if you like.",
                "If nothing was wrong in the first place, please tell us that too.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": Template(
            "Important: {device} needs attention",
            (
                "{hi} we noticed that {fault}.",
                "{safety}",
                "We're arranging a technician visit as soon as we can and will send you times.",
            ),
        ),
        "digest": Template(
            "{updates} since our last message",
            ("{hi} here's what happened:", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _en_product("washing machine"),
        "fridge": _en_product("fridge"),
        "heat_pump": _en_product("heat pump"),
        "": _en_product("device"),
    },
    faults={
        "bearing_wear": ("Worn drum bearing", "the drum bearing is wearing out"),
        "drain_clog": ("Blocked drain", "the drain pump is struggling to pump the water away"),
        "refrigerant_leak": (
            "Refrigerant leak",
            "the cooling circuit seems to be losing refrigerant",
        ),
        "coil_fouling": ("Dirty outdoor coil", "the coil in the outdoor unit is getting dirty"),
        "sensor_drift": (
            "Temperature sensor not quite accurate",
            "a temperature sensor is giving slightly wrong readings",
        ),
        "sensor_stuck": (
            "Temperature sensor not updating",
            "a temperature sensor has stopped updating its readings",
        ),
        "firmware_bug": ("Software error", "the control software ran into an error"),
        "crash_loop": ("Keeps restarting", "the controls keep restarting by themselves"),
        "controller_hang": ("Controls not responding", "the controls stopped responding"),
        "unknown": ("Something not quite right", "something isn't quite right"),
    },
    fault_models={
        "sensor_drift/washer": (
            "Water temperature sensor not quite accurate",
            "the water temperature sensor is giving slightly wrong readings",
        ),
    },
    actions={
        "restart": ("Remote restart", "restart {device} remotely", "restarted {device} remotely"),
        "firmware_update": (
            "Software update",
            "install a software update on {device}",
            "installed a software update on {device}",
        ),
        "cleaning_cycle": (
            "Cleaning cycle",
            "run a cleaning cycle on {device}",
            "ran a cleaning cycle on {device}",
        ),
        "selftest": (
            "Self-check",
            "run a short self-check on {device}",
            "ran a short self-check on {device}",
        ),
        "config_set": (
            "Setting adjusted",
            "adjust a setting on {device}",
            "adjusted a setting on {device}",
        ),
        "technician_visit": ("Technician visit", "send a technician", "sent a technician"),
        "": ("Remote fix", "fix {device} remotely", "fixed {device} remotely"),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Cleaning cycle for the drain pump",
            "run a cleaning cycle for the drain pump of {device}",
            "ran a cleaning cycle for the drain pump of {device}",
        ),
    },
    reasons={
        "door_open": ("the door is open", "If you can, please close the door."),
        "mid_cycle": (
            "a programme is running",
            "No need to stop it: we'll wait until it has finished.",
        ),
        "low_battery": ("its battery is low", "Please make sure it is plugged in."),
        "defrosting": ("it is defrosting", ""),
        "updating": ("it is installing an update", ""),
    },
    states={
        "opened": "We noticed a problem with {device} and started looking into it.",
        "awaiting_consent": "We asked you before fixing it remotely.",
        "remote_fix": "We started fixing {device} remotely.",
        "remote_fix_again": "We tried another remote fix.",
        "verifying": "We started checking that everything works properly again.",
        "appointment_proposed": "We offered you times for a technician visit.",
        "appointment_proposed_again": "We offered you other times for the visit.",
        "booked": "The technician visit was booked.",
        "visited": "The technician has been.",
        "resolved": "All good: {device} is working properly again.",
        "dismissed": "We closed this: nothing more needs doing.",
        "escalated": "A person from our service team took over.",
        "expired": "We closed this because we didn't hear back.",
    },
    steps={
        "command": "We sent a fix to {device}.",
        "command_refused": "{Device} couldn't do it just then, so we waited.",
        "consent": "You answered our question.",
        "verification_failed": "Our check showed it wasn't quite right yet.",
        "slot_taken": "The time you picked had just been taken.",
        "visit_moved": "You asked to move the visit, so we freed up the booked time.",
        "visit_cancelled": "The booked technician visit was cancelled.",
        "rating": "You told us how it went. Thank you!",
    },
    labels={
        "accept_fix": "Yes, go ahead",
        "decline_fix": "No, thanks",
        SLOT_ACTION: "{slot}",
        "other_times": "Other times",
        "decline_visit": "Cancel the visit",
        "rate_good": "It went well",
        "rate_bad": "Not so well",
        "nothing_wrong": "Nothing was wrong",
    },
    words={
        "hi": "Hi {name},",
        "hi_anonymous": "Hi,",
        "who": "our technician",
        "at": "on {when}",
        "agreed_time": "at the agreed time",
        "duration_one": "about a minute",
        "duration": "about {n} minutes",
        "slots_join": " or ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "As it's urgent, these are our earliest times.",
        "no_slots": "We'll send you times for the visit very soon.",
        "when_days_2": "very soon",
        "when_days_7": "within the next few days",
        "when_days_21": "in the next couple of weeks",
        "when_days_60": "in the coming weeks",
        "when_later": "in the coming months",
        "update_one": "1 update",
        "updates": "{n} updates",
        "more": "\nAnd {n} more in the app.",
        "safety_washer": "To avoid further damage, please don't use it until a technician has"
        " looked at it.",
        "safety_fridge": "Your food may not stay cold: keep the door shut and move anything that"
        " spoils easily somewhere cool.",
        "safety_heat_pump": "Your home may get less heat or hot water, so keep another heater"
        " ready if you have one.",
        "safety_": "To be safe, please don't use it until a technician has looked at it.",
        "history": "{date} {time} — {text}",
        "history_done": "We {done}.",
    },
    calendar=Calendar(
        weekdays=("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
        months=("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        day="{wd} {d} {mon}",
        date="{d} {mon}",
        clock="{h:02d}:{m:02d}",
    ),
)
