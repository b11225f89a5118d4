"""The owner's messages in German (notifier; one language of :mod:`notifier.messages`).

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


def _de_product(noun: str, gender: str) -> Product:
    # the formal possessive "Ihr" in nominative, accusative, dative, by grammatical gender
    nom, acc, dat = {
        "f": ("Ihre", "Ihre", "Ihrer"),
        "m": ("Ihr", "Ihren", "Ihrem"),
        "n": ("Ihr", "Ihr", "Ihrem"),
    }[gender]
    forms = (f"{nom} {noun}", f"{acc} {noun}", f"{dat} {noun}")
    labelled = (
        f"{nom} {noun} „{{label}}“",
        f"{acc} {noun} „{{label}}“",
        f"{dat} {noun} „{{label}}“",
    )
    return Product(noun, forms, labelled)


CATALOGUE: Final = Catalogue(
    code="de",
    templates={
        "fixed_remotely": Template(
            "{Device} läuft wieder",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "Wir haben {action_done} und geprüft: Jetzt läuft alles wieder normal.",
                "Sie müssen nichts weiter tun.",
            ),
        ),
        "consent_request": Template(
            "Eine kurze Frage zu {device_dat}",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "Wir würden gern {action_do}. Das dauert {duration}; so lange ist das Gerät"
                " nicht nutzbar. Ist das in Ordnung?",
                "Falls nicht, schlagen wir einen Technikerbesuch vor.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": Template(
            "Wir versuchen es etwas später noch einmal",
            (
                "{hi} wir wollten {action_do}, aber das ging gerade nicht.",
                "Das Gerät meldete, dass {reason}.",
                "{advice}",
                "Wir versuchen es in Kürze von selbst noch einmal.",
            ),
            optional=(3,),
        ),
        "appointment_offer": Template(
            "Technikerbesuch für {device_acc}",
            (
                "{hi} wir haben bemerkt, dass {fault}; das sollte sich ein Techniker ansehen.",
                "Sonst könnte das Gerät {when} ausfallen.",
                "{urgent}",
                "Wählen Sie einen Termin: {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": Template(
            "Ihr Technikerbesuch ist gebucht",
            (
                "{hi} {who} kommt {appointment} und sieht sich {device_acc} an.",
                "Bitte sorgen Sie dafür, dass jemand zu Hause ist.",
                "Passt der Termin nicht mehr, können Sie ihn ändern.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": Template(
            "Erinnerung: Ihr Technikerbesuch",
            (
                "{hi} eine kurze Erinnerung: {who} kommt {appointment} und sieht sich"
                " {device_acc} an.",
                "Bitte sorgen Sie dafür, dass jemand zu Hause ist.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": Template(
            "Neue Termine für Ihren Technikerbesuch",
            (
                "{hi} kein Problem: Wir haben den Besuch {appointment} für {device_acc} abgesagt.",
                "Wählen Sie einen neuen Termin, der Ihnen passt: {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": Template(
            "Ihr Technikerbesuch ist abgesagt",
            (
                "{hi} wie gewünscht haben wir den Technikerbesuch {appointment} für"
                " {device_acc} abgesagt.",
                "Sollte uns noch etwas auffallen, melden wir uns bei Ihnen.",
                "Sie müssen nichts weiter tun.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": Template(
            "Wir melden uns wegen {device_dat}",
            (
                "{hi} wie gewünscht haben wir den Technikerbesuch {appointment} abgesagt.",
                "Da {device} bald repariert werden sollte, meldet sich jemand aus unserem"
                " Service-Team bei Ihnen, um eine andere Lösung zu finden.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": Template(
            "Wir rufen Sie an, um einen Termin zu finden",
            (
                "{hi} es tut uns leid, dass es so schwierig ist, einen passenden Termin für"
                " {device_acc} zu finden.",
                "Wir haben den Besuch {appointment} freigegeben; jemand aus unserem"
                " Service-Team ruft Sie bald an, um einen Termin zu vereinbaren.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": Template(
            "Der Technikerbesuch ist abgeschlossen",
            (
                "{hi} {who} ist mit der Arbeit an {device_dat} fertig.",
                "Wir prüfen jetzt, ob alles wieder richtig läuft, und melden uns bei Ihnen.",
                "Sie müssen nichts tun.",
            ),
        ),
        "resolved": Template(
            "{Device} ist repariert",
            (
                "{hi} gute Nachricht: Seit dem Technikerbesuch läuft {device} wieder einwandfrei.",
                "Danke für Ihre Geduld.",
            ),
        ),
        "not_fixed_escalated": Template(
            "Leider noch nicht behoben",
            (
                "{hi} es tut uns leid: {device} funktioniert noch nicht richtig, und wir"
                " konnten das Problem bisher nicht beheben.",
                "Jemand aus unserem Service-Team meldet sich bald bei Ihnen und kümmert sich"
                " darum.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "rating_request": Template(
            "Wie ist es gelaufen?",
            (
                "{hi} {device} läuft wieder. Wie war es für Sie?",
                "Tippen Sie unten; in der App können Sie auch einen Kommentar schreiben.",
                "War gar nichts kaputt, sagen Sie es uns bitte auch.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": Template(
            "Wichtig: Problem mit {device_dat}",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "{safety}",
                "Wir planen schnellstmöglich einen Technikerbesuch und schicken Ihnen Termine.",
            ),
        ),
        "digest": Template(
            "{updates} seit unserer letzten Nachricht",
            ("{hi} das ist inzwischen passiert:", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _de_product("Waschmaschine", "f"),
        "fridge": _de_product("Kühlschrank", "m"),
        "heat_pump": _de_product("Wärmepumpe", "f"),
        "": _de_product("Gerät", "n"),
    },
    faults={
        "bearing_wear": ("Verschlissenes Trommellager", "sich das Trommellager abnutzt"),
        "drain_clog": (
            "Verstopfter Abfluss",
            "die Laugenpumpe das Wasser nur noch mühsam abpumpt",
        ),
        "refrigerant_leak": (
            "Kältemittelverlust",
            "der Kühlkreislauf Kältemittel zu verlieren scheint",
        ),
        "coil_fouling": (
            "Verschmutzter Wärmetauscher",
            "der Wärmetauscher im Außengerät zunehmend verschmutzt",
        ),
        "sensor_drift": (
            "Temperaturfühler ungenau",
            "ein Temperaturfühler leicht falsche Werte liefert",
        ),
        "sensor_stuck": (
            "Temperaturfühler liefert keine Werte",
            "ein Temperaturfühler keine neuen Werte mehr liefert",
        ),
        "firmware_bug": ("Softwarefehler", "in der Steuerungssoftware ein Fehler aufgetreten ist"),
        "crash_loop": ("Startet ständig neu", "die Steuerung immer wieder von selbst neu startet"),
        "controller_hang": ("Steuerung reagiert nicht", "die Steuerung nicht mehr reagiert"),
        "unknown": ("Etwas stimmt nicht ganz", "etwas nicht ganz stimmt"),
    },
    fault_models={
        "sensor_drift/washer": (
            "Wassertemperaturfühler ungenau",
            "der Fühler für die Wassertemperatur leicht falsche Werte liefert",
        ),
    },
    actions={
        "restart": (
            "Neustart aus der Ferne",
            "{device_acc} aus der Ferne neu starten",
            "{device_acc} aus der Ferne neu gestartet",
        ),
        "firmware_update": (
            "Software-Update",
            "ein Software-Update auf {device_dat} installieren",
            "ein Software-Update auf {device_dat} installiert",
        ),
        "cleaning_cycle": (
            "Reinigungsprogramm",
            "bei {device_dat} ein Reinigungsprogramm laufen lassen",
            "bei {device_dat} ein Reinigungsprogramm laufen lassen",
        ),
        "selftest": (
            "Selbstprüfung",
            "bei {device_dat} eine kurze Selbstprüfung starten",
            "bei {device_dat} eine kurze Selbstprüfung gemacht",
        ),
        "config_set": (
            "Einstellung angepasst",
            "bei {device_dat} eine Einstellung anpassen",
            "bei {device_dat} eine Einstellung angepasst",
        ),
        "technician_visit": (
            "Technikerbesuch",
            "einen Techniker schicken",
            "einen Techniker geschickt",
        ),
        "": (
            "Reparatur aus der Ferne",
            "{device_acc} aus der Ferne reparieren",
            "{device_acc} aus der Ferne repariert",
        ),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Reinigungsprogramm für die Laugenpumpe",
            "bei {device_dat} ein Reinigungsprogramm für die Laugenpumpe laufen lassen",
            "bei {device_dat} ein Reinigungsprogramm für die Laugenpumpe laufen lassen",
        ),
    },
    reasons={
        "door_open": ("die Tür offen ist", "Bitte schließen Sie die Tür, wenn Sie können."),
        "mid_cycle": (
            "gerade ein Programm läuft",
            "Sie müssen es nicht abbrechen: Wir warten, bis es fertig ist.",
        ),
        "low_battery": (
            "der Akku schwach ist",
            "Bitte prüfen Sie, ob das Gerät am Strom angeschlossen ist.",
        ),
        "defrosting": ("es gerade abtaut", ""),
        "updating": ("es gerade ein Update installiert", ""),
    },
    states={
        "opened": "Wir haben ein Problem mit {device_dat} bemerkt und uns darum gekümmert.",
        "awaiting_consent": "Wir haben Sie gefragt, bevor wir etwas aus der Ferne reparieren.",
        "remote_fix": "Wir haben begonnen, {device_acc} aus der Ferne zu reparieren.",
        "remote_fix_again": "Wir haben eine weitere Lösung aus der Ferne versucht.",
        "verifying": "Wir haben begonnen zu prüfen, ob alles wieder richtig läuft.",
        "appointment_proposed": "Wir haben Ihnen Termine für einen Technikerbesuch angeboten.",
        "appointment_proposed_again": "Wir haben Ihnen andere Termine angeboten.",
        "booked": "Der Technikerbesuch wurde gebucht.",
        "visited": "Der Techniker war da.",
        "resolved": "Alles gut: {device} läuft wieder einwandfrei.",
        "dismissed": "Wir haben das abgeschlossen: Es ist nichts mehr zu tun.",
        "escalated": "Jemand aus unserem Service-Team hat übernommen.",
        "expired": "Wir haben das abgeschlossen, weil wir nichts von Ihnen gehört haben.",
    },
    steps={
        "command": "Wir haben eine Reparatur an {device_acc} geschickt.",
        "command_refused": "{Device} konnte das gerade nicht, also haben wir gewartet.",
        "consent": "Sie haben unsere Frage beantwortet.",
        "verification_failed": "Unsere Prüfung hat gezeigt, dass noch nicht alles stimmt.",
        "slot_taken": "Der gewählte Termin war gerade vergeben.",
        "visit_moved": "Sie wollten den Besuch verschieben; wir haben den Termin freigegeben.",
        "visit_cancelled": "Der gebuchte Technikerbesuch wurde abgesagt.",
        "rating": "Sie haben uns gesagt, wie es lief. Danke!",
    },
    labels={
        "accept_fix": "Ja, gern",
        "decline_fix": "Nein, danke",
        SLOT_ACTION: "{slot}",
        "other_times": "Andere Zeiten",
        "decline_visit": "Besuch absagen",
        "rate_good": "Gut gelaufen",
        "rate_bad": "Nicht so gut",
        "nothing_wrong": "Es war nichts kaputt",
    },
    words={
        "hi": "Hallo {name},",
        "hi_anonymous": "Hallo,",
        "who": "unser Service-Team",
        "at": "am {when}",
        "agreed_time": "zum vereinbarten Termin",
        "duration_one": "etwa eine Minute",
        "duration": "etwa {n} Minuten",
        "slots_join": " oder ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "Da es eilt: unsere frühesten Termine.",
        "no_slots": "Wir schicken Ihnen sehr bald Termine für den Besuch.",
        "when_days_2": "sehr bald",
        "when_days_7": "in den nächsten Tagen",
        "when_days_21": "in den nächsten zwei, drei Wochen",
        "when_days_60": "in den kommenden Wochen",
        "when_later": "in den kommenden Monaten",
        "update_one": "1 Neuigkeit",
        "updates": "{n} Neuigkeiten",
        "more": "\nUnd {n} weitere in der App.",
        "safety_washer": "Bitte benutzen Sie das Gerät bis zum Technikerbesuch nicht, damit"
        " nichts weiter kaputtgeht.",
        "safety_fridge": "Lebensmittel bleiben eventuell nicht kühl: Halten Sie die Tür zu und"
        " lagern Sie Empfindliches woanders kühl.",
        "safety_heat_pump": "Es kann weniger warm werden und weniger Warmwasser geben; halten"
        " Sie, wenn möglich, eine andere Heizung bereit.",
        "safety_": "Bitte benutzen Sie das Gerät sicherheitshalber bis zum Technikerbesuch nicht.",
        "history": "{date} {time} — {text}",
        "history_done": "Wir haben {done}.",
    },
    calendar=Calendar(
        weekdays=("Mo.", "Di.", "Mi.", "Do.", "Fr.", "Sa.", "So."),
        months=(
            "Jan.",
            "Feb.",
            "März",
            "Apr.",
            "Mai",
            "Juni",
            "Juli",
            "Aug.",
            "Sept.",
            "Okt.",
            "Nov.",
            "Dez.",
        ),
        day="{wd}, {d}. {mon}",
        date="{d}. {mon}",
        clock="{h:02d}:{m:02d}",
    ),
)
