"""fixloop fixloop package."""

__all__: list[str] = []
