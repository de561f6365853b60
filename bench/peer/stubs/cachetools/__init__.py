"""Stand-in for cachetools (see ../README.md): kvpress builds an LRUCache and decorates with
`cached` at import; calling a decorated function raises."""


class LRUCache(dict):
    def __init__(self, maxsize=None, *args, **kwargs):
        super().__init__()
        self.maxsize = maxsize


def cached(*args, **kwargs):
    def decorate(fn):
        def fail(*a, **k):
            raise RuntimeError(f"cachetools stand-in: {fn.__qualname__} needs cachetools, not installed here")

        return fail

    return decorate
