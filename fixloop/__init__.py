"""Composition root of fixloop: the ``fixloop`` command, settings, the local stack.

The package root exports nothing, on purpose: ``fixloop.broker`` and ``fixloop.stack``
(broker config renderer, local server runners, with ``fixloop.server`` and
``fixloop.pgserver``) are imported by the test fixtures, the benchmark and
``python -m fixloop.broker`` and load in milliseconds; re-exporting the settings here
would load pydantic, aiohttp and the simulated fleet into each of them.
Import from the modules: ``fixloop.cli.main``, ``fixloop.config.load_settings``,
``fixloop.settings.Settings``, ``fixloop.local.run_local_stack``.
"""

__all__: list[str] = []
