"""fixloop dashboard package."""

__all__: list[str] = []
