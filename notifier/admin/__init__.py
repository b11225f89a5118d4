"""Onboarding over the owner REST API: the ops role's registry, owners' claims (notifier).

Routes added to :func:`notifier.api.create_api` when it is given an :class:`Onboarding`
(they share its edge: auth, body checks, JSON errors, request ids, security headers, and
its OpenAPI document):

* ``/api/v1/admin/…`` for a bearer token of the ``ops`` role (``fixloop tokens issue
  --role ops``): product lines (a product model with a product file), devices (add, list,
  get, retire, bulk import from a JSON list or a CSV body with a report per row)
  (:mod:`notifier.admin.devices`); owner invites, technicians, API tokens (issue,
  revoke) and identity-provider sign-ins (:mod:`notifier.admin.people`).
* ``POST /api/v1/me/devices/claim`` (slowed by a :class:`ClaimLimiter`,
  :mod:`notifier.admin.limiter`), ``POST /api/v1/me/devices/{id}/release`` and
  ``POST /api/v1/invites/accept`` for owners (:mod:`notifier.admin.claims`).

What they take in and answer is in :mod:`notifier.admin.bodies` and
:mod:`notifier.admin.views`; what they work with in :mod:`notifier.admin.onboarding`;
the route table and :func:`install_onboarding` in :mod:`notifier.admin.routes`. Device
broker logins are issued and revoked through a :class:`~notifier.registry.BrokerAccounts`,
when one is given.
"""

from notifier.admin.bodies import (
    ClaimRequest,
    DeviceRequest,
    ImportRequest,
    InviteAcceptRequest,
    OwnerInviteRequest,
    ProductLineRequest,
    ReleaseRequest,
    SubjectRequest,
    TechnicianRequest,
    TokenRequest,
)
from notifier.admin.limiter import ClaimLimiter
from notifier.admin.onboarding import Onboarding
from notifier.admin.routes import install_onboarding
from notifier.admin.views import (
    ImportReport,
    InviteView,
    ProductLineList,
    ProductLineView,
    RegistryDeviceList,
    RegistryDeviceView,
    ReleasedView,
    SubjectList,
    SubjectView,
    TechnicianView,
    TokenView,
)

__all__ = [
    "ClaimLimiter",
    "ClaimRequest",
    "DeviceRequest",
    "ImportReport",
    "ImportRequest",
    "InviteAcceptRequest",
    "InviteView",
    "Onboarding",
    "OwnerInviteRequest",
    "ProductLineList",
    "ProductLineRequest",
    "ProductLineView",
    "RegistryDeviceList",
    "RegistryDeviceView",
    "ReleaseRequest",
    "ReleasedView",
    "SubjectList",
    "SubjectRequest",
    "SubjectView",
    "TechnicianRequest",
    "TechnicianView",
    "TokenRequest",
    "TokenView",
    "install_onboarding",
]
