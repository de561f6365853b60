"""Stand-in for datasets (see ../README.md): importable, unusable."""


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets stand-in: not installed on this machine")
