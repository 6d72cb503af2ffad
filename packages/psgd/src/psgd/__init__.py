"""psgd."""

__all__: list[str] = []
