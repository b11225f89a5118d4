"""fixloop diagnostics package."""

__all__: list[str] = []
