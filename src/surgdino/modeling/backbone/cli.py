"""Command-line entry (to be implemented)."""


def register(sub) -> None:
    pass
