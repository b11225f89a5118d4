"""The owner REST API (notifier; owners' and technicians' apps -> here -> the case machine).

Owners see their profile, push channels, devices (health in plain words) and cases (with
their history in plain words) and answer what the loop asks them: agree to a remote fix,
choose a visit time, move or cancel a booked visit, rate the outcome. Technicians see
their visits (a moved or cancelled one is gone from the list) and mark them done.
Owners can export and erase their data. ``GET /openapi.json`` describes every route.

Where things are: :mod:`notifier.api.app` (:func:`create_api`, the route table),
:mod:`notifier.api.middleware` (the edge middleware, request ids, security headers),
:mod:`notifier.api.bodies` and :mod:`notifier.api.views` (what comes in and what goes
out), :mod:`notifier.api.words` (records in plain words), and the routes by resource:
:mod:`notifier.api.account` (profile, push channels, export, erasure),
:mod:`notifier.api.cases` (devices, cases, the owner's answers),
:mod:`notifier.api.taps` (one-tap action links), :mod:`notifier.api.technician` (visits).

How it works:

* **Auth.** ``Authorization: Bearer <token>``; the store says whom a token stands for
  (:meth:`~notifier.store.CaseStore.resolve_token`), or, where an identity provider is
  set up, a JWT is the provider's access token of an owner (:mod:`notifier.oidc`; its
  keys unavailable: 503; a subject linked to no owner: 403). No or an unknown token: 401
  with ``WWW-Authenticate: Bearer``; a token of the wrong kind for the route: 403. Another
  owner's device or case, or another technician's visit, answers 404, exactly like one
  that does not exist, so ids do not leak.
* **Edge.** Bodies are at most :data:`MAX_BODY_BYTES` (else 413) of JSON checked by strict
  pydantic models that refuse unknown fields; a violation is a 400 naming the field.
* **Errors.** Every error is ``{"error": {"code": ..., "message": ..., "field": ...}}``:
  :class:`~notifier.errors.NotFoundError` 404, :class:`~notifier.errors.ForbiddenError`
  403, :class:`~notifier.errors.ConflictError` and
  :class:`~notifier.errors.IllegalTransitionError` 409,
  :class:`~notifier.errors.InvalidRequestError` 422, a :class:`~wire.errors.TransientError`
  503; anything unexpected is a 500 with a generic message, logged with the request id
  (the ``X-Request-Id`` header of every response). The app keeps serving.
* **Privacy.** Owners never see scores or diagnostic evidence; push targets are masked and
  channel secrets never leave; nothing here logs contacts, tokens or targets. Responses
  with personal data are ``Cache-Control: no-store``.
"""

from notifier.api.app import create_api
from notifier.api.bodies import (
    AppointmentChoice,
    ChannelRequest,
    CompleteVisitRequest,
    EraseRequest,
    FixChoice,
    ProfilePatch,
    RatingRequest,
)
from notifier.api.cases import device_views
from notifier.api.middleware import API_PREFIX, REQUEST_ID_HEADER
from notifier.api.taps import TAP_ACTIONS
from notifier.api.views import (
    ActionLinkView,
    AppointmentView,
    CaseDetailView,
    CaseList,
    CaseView,
    ChannelList,
    ChannelView,
    DeviceList,
    DeviceView,
    ErasedView,
    HealthWord,
    OfferView,
    ProfileView,
    RatingView,
    VisitList,
    VisitView,
)
from notifier.edge import MAX_BODY_BYTES, ErrorView

__all__ = [
    "API_PREFIX",
    "MAX_BODY_BYTES",
    "REQUEST_ID_HEADER",
    "TAP_ACTIONS",
    "ActionLinkView",
    "AppointmentChoice",
    "AppointmentView",
    "CaseDetailView",
    "CaseList",
    "CaseView",
    "ChannelList",
    "ChannelRequest",
    "ChannelView",
    "CompleteVisitRequest",
    "DeviceList",
    "DeviceView",
    "EraseRequest",
    "ErasedView",
    "ErrorView",
    "FixChoice",
    "HealthWord",
    "OfferView",
    "ProfilePatch",
    "ProfileView",
    "RatingRequest",
    "RatingView",
    "VisitList",
    "VisitView",
    "create_api",
    "device_views",
]
