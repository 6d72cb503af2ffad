"""optcore."""

__all__: list[str] = []
