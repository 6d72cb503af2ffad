"""torchsso."""

__all__: list[str] = []
