"""grabsampler."""

__all__: list[str] = []
