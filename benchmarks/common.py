"""What the benchmark scripts share: the results folder, timers, inputs, a world of gloo ranks, output files.

The scripts run as ``python benchmarks/<name>.py`` (or under torchrun / mpirun), so this folder is on
``sys.path`` and they ``from common import ...``. Nothing here holds options: every function takes
what it needs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["RESULTS", "time_reps", "time_median", "inputs", "on_ranks", "write_json", "load_json", "pyplot",
           "save_figure"]

RESULTS = Path(__file__).resolve().parent / "results"


def time_reps(fn: Callable[[], Any], reps: int, *, before: Callable[[], Any] | None = None,
              warmup: bool = True) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` (after one untimed warm-up call unless ``warmup=False``);
    ``before`` (e.g. a barrier) runs untimed ahead of each timed call."""
    if warmup:
        fn()
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def time_median(fn: Callable[[], Any], reps: int, *, before: Callable[[], Any] | None = None,
                warmup: bool = True) -> float:
    """Median of :func:`time_reps`."""
    return statistics.median(time_reps(fn, reps, before=before, warmup=warmup))


def inputs(B: int, Hq: int, Hkv: int, S: int, D: int, *, dtype=None, device="cpu", seed: int = 0):
    """Random q (B, Hq, S, D), k, v (B, Hkv, S, D), grad-out (B, Hq, S, D), drawn in that order from
    one generator seeded with ``seed``; fp32 unless ``dtype``."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(B, h, S, D, generator=g, device=device, dtype=dtype) for h in (Hq, Hkv, Hkv, Hq))


def on_ranks(size: int, fn: Callable, *args, timeout: float, **kwargs) -> list:
    """``fn(rank, size, *args, **kwargs)`` on ``size`` spawned gloo ranks (1 thread each; a
    :class:`seqpar.testing.worlds.World` for this one call) -> the results in rank order; a rank's
    error or a hang past ``timeout`` seconds raises here. ``fn`` must be a module-level function."""
    from seqpar.testing.worlds import World

    world = World(size)
    try:
        return world.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        world.close()


def write_json(path: Path, data: Any, *, indent: int | None = 1) -> Path:
    """``data`` as JSON at ``path`` (parent folders made) -> ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return path


def load_json(path: Path, default: Any = None) -> Any:
    """The JSON at ``path``, or ``default`` (an empty dict unless given) when there is no such file."""
    path = Path(path)
    if not path.exists():
        return {} if default is None else default
    return json.loads(path.read_text())


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (said on stdout) when matplotlib
    is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (parent folders made), close it -> ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
