import os

import pytest

from seqpar.testing.worlds import World

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def worlds():
    """``worlds(P)`` -> a running World of P gloo ranks (restarted if a case broke it)."""
    live: dict[int, World] = {}

    def get(size: int) -> World:
        w = live.get(size)
        if w is None or w.broken:
            w = live[size] = World(size)
        return w

    yield get
    for w in live.values():
        w.close()
