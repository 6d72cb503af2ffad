"""eigenpro3."""

__all__: list[str] = []
