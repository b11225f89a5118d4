"""fixloop device_sim package."""

__all__: list[str] = []
