"""The ops dashboard's JSON routes, by what they show (dashboard).

:mod:`dashboard.routes.session` (the page, login, logout, the session),
:mod:`dashboard.routes.fleet` (fleet, devices, products, charts) and
:mod:`dashboard.routes.cases` (cases, queue, tasks, visits, outcomes, insight,
campaigns). Each module's ``ROUTES`` is its part of :data:`dashboard.app.ROUTES`.
"""

__all__: list[str] = []
