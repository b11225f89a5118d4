"""The owner's messages in French (notifier; one language of :mod:`notifier.messages`).

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


def _fr_product(noun: str) -> Product:
    your = f"votre {noun}"
    return Product(noun, (your, your, your), ("votre {label}",) * 3)


CATALOGUE: Final = Catalogue(
    code="fr",
    templates={
        "fixed_remotely": Template(
            "{Device} fonctionne à nouveau",
            (
                "{hi} nous avons remarqué que {fault}.",
                "Nous avons {action_done}, puis vérifié : tout fonctionne de nouveau normalement.",
                "Vous n'avez rien à faire.",
            ),
        ),
        "consent_request": Template(
            "Une petite question sur {device}",
            (
                "{hi} nous avons remarqué que {fault}.",
                "Nous aimerions {action_do}. Cela prend {duration}, et l'appareil ne sera pas"
                " utilisable pendant ce temps. Êtes-vous d'accord ?",
                "Sinon, nous vous proposerons la visite d'un technicien.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": Template(
            "Nous réessaierons un peu plus tard",
            (
                "{hi} nous voulions {action_do}, mais ce n'était pas possible à ce moment-là.",
                "L'appareil nous a indiqué que {reason}.",
                "{advice}",
                "Nous réessaierons automatiquement d'ici peu.",
            ),
            optional=(3,),
        ),
        "appointment_offer": Template(
            "Visite d'un technicien pour {device}",
            (
                "{hi} nous avons remarqué que {fault} ; un technicien doit venir voir.",
                "Sinon, une panne est possible {when}.",
                "{urgent}",
                "Choisissez un créneau : {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": Template(
            "Votre rendez-vous avec le technicien est fixé",
            (
                "{hi} {who} passera {appointment} pour examiner {device}.",
                "Merci de vous assurer que quelqu'un sera présent.",
                "Si l'horaire ne vous convient plus, vous pouvez le modifier.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": Template(
            "Rappel : visite du technicien",
            (
                "{hi} petit rappel : {who} passera {appointment} pour examiner {device}.",
                "Merci de vous assurer que quelqu'un sera présent.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": Template(
            "De nouveaux créneaux pour la visite du technicien",
            (
                "{hi} pas de souci : nous avons annulé la visite prévue {appointment} pour"
                " {device}.",
                "Choisissez un nouveau créneau qui vous convient : {slots}.",
                "{no_slots}",
            ),
            (SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": Template(
            "Votre rendez-vous avec le technicien est annulé",
            (
                "{hi} comme vous l'avez demandé, nous avons annulé la visite du technicien"
                " prévue {appointment} pour {device}.",
                "Si nous remarquons autre chose, nous vous le dirons.",
                "Vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": Template(
            "Nous vous recontactons au sujet de {device}",
            (
                "{hi} comme vous l'avez demandé, nous avons annulé la visite du technicien"
                " prévue {appointment}.",
                "Comme il faut réparer {device} bientôt, une personne de notre service client"
                " vous contactera pour trouver une autre solution.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": Template(
            "Nous vous appelons pour trouver un créneau",
            (
                "{hi} nous sommes désolés : trouver un bon moment pour la visite concernant"
                " {device} n'a pas été simple.",
                "Nous avons libéré la visite prévue {appointment} ; une personne de notre"
                " service client vous appellera bientôt pour convenir d'un horaire.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": Template(
            "La visite du technicien est terminée",
            (
                "{hi} {who} a terminé son intervention sur {device}.",
                "Nous vérifions maintenant que tout fonctionne bien, et nous vous tiendrons"
                " au courant.",
                "Vous n'avez rien à faire.",
            ),
        ),
        "resolved": Template(
            "{Device} fonctionne de nouveau",
            (
                "{hi} bonne nouvelle : depuis la visite du technicien, {device} fonctionne"
                " comme il faut.",
                "Merci de votre patience.",
            ),
        ),
        "not_fixed_escalated": Template(
            "Désolés, ce n'est pas encore réparé",
            (
                "{hi} nous sommes désolés : {device} ne fonctionne pas encore correctement,"
                " et nous n'avons pas encore pu régler le problème.",
                "Une personne de notre service client vous contactera bientôt.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "rating_request": Template(
            "Comment cela s'est-il passé ?",
            (
                "{hi} {device} fonctionne à nouveau. Comment cela s'est-il passé pour vous ?",
                "Répondez ci-dessous ; vous pouvez aussi laisser un commentaire dans l'appli.",
                "S'il n'y avait rien de cassé, dites-le-nous aussi.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": Template(
            "Important : un souci avec {device}",
            (
                "{hi} nous avons remarqué que {fault}.",
                "{safety}",
                "Nous organisons vite la visite d'un technicien et vous enverrons des créneaux.",
            ),
        ),
        "digest": Template(
            "{updates} depuis notre dernier message",
            ("{hi} voici ce qui s'est passé :", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _fr_product("lave-linge"),
        "fridge": _fr_product("réfrigérateur"),
        "heat_pump": _fr_product("pompe à chaleur"),
        "": _fr_product("appareil"),
    },
    faults={
        "bearing_wear": ("Roulement du tambour usé", "le roulement du tambour s'use"),
        "drain_clog": ("Vidange bouchée", "la pompe de vidange a du mal à évacuer l'eau"),
        "refrigerant_leak": (
            "Fuite de fluide frigorigène",
            "le circuit de refroidissement semble perdre du fluide frigorigène",
        ),
        "coil_fouling": ("Échangeur encrassé", "l'échangeur de l'unité extérieure s'encrasse"),
        "sensor_drift": (
            "Sonde de température imprécise",
            "une sonde de température donne des valeurs légèrement fausses",
        ),
        "sensor_stuck": (
            "Sonde de température figée",
            "une sonde de température ne met plus ses valeurs à jour",
        ),
        "firmware_bug": ("Erreur du logiciel", "le logiciel de commande a rencontré une erreur"),
        "crash_loop": ("Redémarrages à répétition", "la commande redémarre sans cesse d'elle-même"),
        "controller_hang": ("La commande ne répond plus", "la commande ne répond plus"),
        "unknown": (
            "Quelque chose ne va pas tout à fait",
            "quelque chose ne va pas tout à fait",
        ),
    },
    fault_models={
        "sensor_drift/washer": (
            "Sonde de température de l'eau imprécise",
            "la sonde de température de l'eau donne des valeurs légèrement fausses",
        ),
    },
    actions={
        "restart": (
            "Redémarrage à distance",
            "redémarrer {device} à distance",
            "redémarré {device} à distance",
        ),
        "firmware_update": (
            "Mise à jour du logiciel",
            "installer une mise à jour du logiciel sur {device}",
            "installé une mise à jour du logiciel sur {device}",
        ),
        "cleaning_cycle": (
            "Programme de nettoyage",
            "lancer un programme de nettoyage sur {device}",
            "lancé un programme de nettoyage sur {device}",
        ),
        "selftest": (
            "Autocontrôle",
            "lancer un court autocontrôle sur {device}",
            "lancé un court autocontrôle sur {device}",
        ),
        "config_set": (
            "Réglage ajusté",
            "ajuster un réglage sur {device}",
            "ajusté un réglage sur {device}",
        ),
        "technician_visit": (
            "Visite d'un technicien",
            "envoyer un technicien",
            "envoyé un technicien",
        ),
        "": ("Réparation à distance", "réparer {device} à distance", "réparé {device} à distance"),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Nettoyage de la pompe de vidange",
            "lancer un nettoyage de la pompe de vidange sur {device}",
            "lancé un nettoyage de la pompe de vidange sur {device}",
        ),
    },
    reasons={
        "door_open": ("la porte est ouverte", "Si possible, merci de fermer la porte."),
        "mid_cycle": (
            "un programme est en cours",
            "Inutile de l'arrêter : nous attendrons qu'il soit terminé.",
        ),
        "low_battery": (
            "la batterie est faible",
            "Merci de vérifier que l'appareil est bien branché.",
        ),
        "defrosting": ("un dégivrage est en cours", ""),
        "updating": ("une mise à jour est en cours", ""),
    },
    states={
        "opened": "Nous avons remarqué un souci avec {device} et nous nous en occupons.",
        "awaiting_consent": "Nous vous avons demandé votre accord avant une réparation à distance.",
        "remote_fix": "Nous avons commencé à réparer {device} à distance.",
        "remote_fix_again": "Nous avons essayé une autre solution à distance.",
        "verifying": "Nous avons commencé à vérifier que tout fonctionne bien.",
        "appointment_proposed": "Nous vous avons proposé des créneaux pour la visite d'un"
        " technicien.",
        "appointment_proposed_again": "Nous vous avons proposé d'autres créneaux.",
        "booked": "Le rendez-vous avec le technicien a été fixé.",
        "visited": "Le technicien est passé.",
        "resolved": "Tout va bien : {device} fonctionne de nouveau correctement.",
        "dismissed": "Nous avons clos ce dossier : il n'y a plus rien à faire.",
        "escalated": "Une personne de notre service client a pris le relais.",
        "expired": "Nous avons clos ce dossier, faute de réponse de votre part.",
    },
    steps={
        "command": "Nous avons envoyé une réparation à {device}.",
        "command_refused": "{Device} n'a pas pu le faire à ce moment-là, nous avons donc attendu.",
        "consent": "Vous avez répondu à notre question.",
        "verification_failed": "Notre vérification a montré que tout n'était pas encore réglé.",
        "slot_taken": "Le créneau choisi venait d'être pris.",
        "visit_moved": "Vous avez demandé à déplacer la visite ; nous avons libéré le créneau.",
        "visit_cancelled": "La visite prévue du technicien a été annulée.",
        "rating": "Vous nous avez dit comment cela s'est passé. Merci !",
    },
    labels={
        "accept_fix": "Oui, allez-y",
        "decline_fix": "Non, merci",
        SLOT_ACTION: "{slot}",
        "other_times": "Autres horaires",
        "decline_visit": "Annuler la visite",
        "rate_good": "Très bien",
        "rate_bad": "Pas terrible",
        "nothing_wrong": "Rien n'était en panne",
    },
    words={
        "hi": "Bonjour {name},",
        "hi_anonymous": "Bonjour,",
        "who": "notre technicien",
        "at": "le {when}",
        "agreed_time": "à l'horaire convenu",
        "duration_one": "environ une minute",
        "duration": "environ {n} minutes",
        "slots_join": " ou ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "C'est urgent : voici nos premiers créneaux.",
        "no_slots": "Nous vous enverrons très bientôt des créneaux pour la visite.",
        "when_days_2": "très bientôt",
        "when_days_7": "dans les prochains jours",
        "when_days_21": "d'ici deux ou trois semaines",
        "when_days_60": "dans les semaines à venir",
        "when_later": "dans les mois à venir",
        "update_one": "1 nouvelle",
        "updates": "{n} nouvelles",
        "more": "\nEt {n} autres dans l'appli.",
        "safety_washer": "Pour éviter d'autres dégâts, merci de ne pas l'utiliser avant la visite"
        " du technicien.",
        "safety_fridge": "Vos aliments risquent de se réchauffer : gardez la porte fermée et"
        " mettez les produits fragiles au frais ailleurs.",
        "safety_heat_pump": "Le chauffage et l'eau chaude peuvent faiblir ; gardez si possible un"
        " autre chauffage à portée de main.",
        "safety_": "Par précaution, merci de ne pas utiliser l'appareil avant la visite du"
        " technicien.",
        "history": "{date} {time} — {text}",
        "history_done": "Nous avons {done}.",
    },
    calendar=Calendar(
        weekdays=("lun.", "mar.", "mer.", "jeu.", "ven.", "sam.", "dim."),
        months=(
            "janv.",
            "févr.",
            "mars",
            "avr.",
            "mai",
            "juin",
            "juil.",
            "août",
            "sept.",
            "oct.",
            "nov.",
            "déc.",
        ),
        day="{wd} {d} {mon}",
        date="{d} {mon}",
        clock="{h} h {m:02d}",
        whole_hour="{h} h",
        first_day="1er",
    ),
    elisions=((r"\b([Qq]u|[Dd]|[Ll]|[Nn]|[Jj])e ([aeiouyéèêàâîôûAEIOUYÉ])", r"\1'\2"),),
)
