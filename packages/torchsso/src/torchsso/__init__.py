"""torchsso. (Engineers: read /tmp/common.md first: team rules, deadline, optcore API.)"""

__all__: list[str] = []
