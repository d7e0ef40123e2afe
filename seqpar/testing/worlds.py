"""A pool of spawned gloo ranks for tests: start P processes once, run many cases on them.

``World(P).run(fn, *args)`` sends ``fn`` (a module-level function, picklable) to every rank, runs
``fn(rank, world_size, *args)`` there and returns the P results in rank order. A case that raises on
any rank fails the call with that rank's traceback; a case that does not finish within ``timeout``
(a hang) or a rank that dies tears the world down and raises, so the next case starts a fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

__all__ = ["World", "WorldError"]


class WorldError(RuntimeError):
    pass


def _worker(rank: int, size: int, store_path: str, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(rank, size, *args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class World:
    def __init__(self, size: int):
        self.size = size
        ctx = mp.get_context("spawn")
        fd, self._store = tempfile.mkstemp(prefix="seqpar-store-")
        os.close(fd)
        os.unlink(self._store)
        self._tasks = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, size, self._store, self._tasks[r], self._results), daemon=True)
            for r in range(size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn, *args, timeout: float = 120.0, **kwargs) -> list:
        """Results of ``fn(rank, size, *args, **kwargs)`` on every rank, in rank order."""
        if self.broken:
            raise WorldError("world is broken")
        for t in self._tasks:
            t.put((fn, args, kwargs))
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.size:
            failed = [v for v in got.values() if not v[0]]
            # once a rank failed, the others get a short grace period (they may be stuck waiting on it)
            limit = min(deadline, time.monotonic() + 10) if failed else deadline
            try:
                rank, ok, value = self._results.get(timeout=max(0.05, min(1.0, limit - time.monotonic())))
                got[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
            if dead or time.monotonic() >= limit:
                self.close()
                why = f"rank(s) {dead} died" if dead else f"timed out after {timeout:.0f}s"
                errors = {r: v[1] for r, v in got.items() if not v[0]}
                raise WorldError(f"{fn.__name__}: {why}; finished ranks: {sorted(got)}; errors: {errors}")
        errors = {r: v[1] for r, v in got.items() if not v[0]}
        if errors:
            r, (name, msg, tb) = next(iter(sorted(errors.items())))
            raise WorldError(f"{fn.__name__} failed on rank(s) {sorted(errors)}; rank {r}: {name}: {msg}\n{tb}")
        return [got[r][1] for r in range(self.size)]

    def close(self) -> None:
        self.broken = True
        for t in self._tasks:
            try:
                t.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        try:
            os.unlink(self._store)
        except FileNotFoundError:
            pass
