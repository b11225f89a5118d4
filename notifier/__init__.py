"""fixloop notifier package."""

__all__: list[str] = []
