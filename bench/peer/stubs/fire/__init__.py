"""Stand-in for fire (see ../README.md): importable, unusable."""


def Fire(*args, **kwargs):  # noqa: N802 - fire's name
    raise RuntimeError("fire stand-in: not installed on this machine")
