"""A ring of P threads in one process: the whole ring algorithm without processes, gloo or NCCL.

:class:`ThreadRing` implements the :class:`seqpar.comm.Ring` protocol for one of P threads that act
as ranks; :func:`run_threads` runs a function on P such threads and collects the results. The ring
layer is called directly with this rank's shards::

    from seqpar.layout import shard_tensor
    from seqpar.masks import MaskSpec
    from seqpar.methods import MethodFunction
    from seqpar.methods.ring import RingMethod

    def rank_main(ring, q, k, v):                    # q (B, Hq, S, D), k/v (B, Hkv, S, D): full tensors
        sh = lambda t: shard_tensor(t, 2, ring.rank, ring.size, "zigzag")
        method = RingMethod(ring, layout="zigzag", mask=MaskSpec(causal=True), scale=D ** -0.5, backend="aten")
        out, lse = MethodFunction.apply(sh(q), sh(k), sh(v), method)
        return out

    outs = run_threads(rank_main, 4, q, k, v)        # 4 local outputs, in rank order

``ThreadGroup(ring)`` makes the same thread-ranks a :class:`seqpar.comm.TransportGroup` (all-gather,
reduce-scatter) for code that needs collectives besides the ring (the sequence mixers' context).

It serves fast process-free tests on CPU and runs the full ring (every layout, the Triton kernels,
the post-then-wait overlap structure) on a machine with one GPU.

Note
----
Messages are snapshots: ``exchange`` clones ``send`` at post time into the next rank's mailbox,
keyed by (tag, sequence number), and returns at once; ``wait`` blocks until the matching message is
there and copies it into ``recv``. Every rank posts its exchanges of one tag in the same order, so
the n-th exchange of a tag on rank r receives the n-th message rank r-1 posted with that tag::

    rank r-1: exchange(kv, tag=KV) #n ──clone──> mailbox[r][(KV, n)] ──wait()──> recv of rank r's #n

A rank that raises sets an abort flag; the others leave their waits with :class:`RingAborted`, and
:func:`run_threads` raises the first real error (with its rank) or a ``TimeoutError`` on a hang.

On CUDA, run the backward by calling ``method.backward`` directly rather than through autograd: the
autograd engine runs every thread's CUDA backward on one shared device thread, where a rank that
blocks in ``wait`` would stall the rank it waits for.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from seqpar.comm import TAG_KV, PeerAborted

__all__ = ["ThreadWorld", "ThreadRing", "ThreadGroup", "RingAborted", "run_threads"]


class RingAborted(PeerAborted):
    """Raised in a rank's ``wait`` when another rank failed or the world timed out."""


class ThreadWorld:
    """The shared state of P thread-ranks: mailboxes, a condition variable, an abort flag."""

    def __init__(self, size: int, *, timeout: float = 120.0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._mail: dict[tuple[int, int, int], torch.Tensor] = {}  # (dst rank, tag, seq) -> message
        self.aborted = threading.Event()

    def rings(self) -> list[ThreadRing]:
        """One :class:`ThreadRing` per rank, in rank order."""
        return [ThreadRing(self, r) for r in range(self.size)]

    def abort(self) -> None:
        self.aborted.set()
        with self._cond:
            self._cond.notify_all()

    def _post(self, key: tuple[int, int, int], msg: torch.Tensor) -> None:
        with self._cond:
            if key in self._mail:
                raise RuntimeError(f"ThreadWorld: duplicate message {key}")
            self._mail[key] = msg
            self._cond.notify_all()

    def _take(self, key: tuple[int, int, int]) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while key not in self._mail:
                if self.aborted.is_set():
                    raise RingAborted(f"rank {key[0]}: another rank failed while waiting for tag {key[1]} #{key[2]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.abort()
                    raise RingAborted(f"rank {key[0]}: no message for tag {key[1]} #{key[2]} after {self.timeout}s")
                self._cond.wait(min(left, 0.5))
            return self._mail.pop(key)


class _ThreadHandle:
    def __init__(self, world: ThreadWorld, key: tuple[int, int, int], recv: torch.Tensor | None):
        self._world = world
        self._key = key
        self._recv = recv
        self._done = False

    def wait(self) -> torch.Tensor:
        if not self._done:
            msg = self._world._take(self._key)
            if self._recv is None:
                self._recv = msg  # a private clone already
            else:
                if self._recv.shape != msg.shape or self._recv.dtype != msg.dtype:
                    raise ValueError(f"ThreadRing: recv buffer {tuple(self._recv.shape)} {self._recv.dtype} does not "
                                     f"match the message {tuple(msg.shape)} {msg.dtype}")
                self._recv.copy_(msg)
            self._done = True
        return self._recv


class ThreadRing:
    """Rank ``rank`` of a :class:`ThreadWorld`: the ``seqpar.comm.Ring`` protocol over mailboxes."""

    def __init__(self, world: ThreadWorld, rank: int):
        if not 0 <= rank < world.size:
            raise ValueError(f"rank must be in [0, {world.size}), got {rank}")
        self.world = world
        self.rank = rank
        self.size = world.size
        self.next_rank = (rank + 1) % world.size
        self.prev_rank = (rank - 1) % world.size
        self._sent: dict[int, int] = {}  # tag -> messages posted so far (= received so far)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor | None = None, *, tag: int = TAG_KV,
                 hops: int = 1) -> _ThreadHandle:
        """Post: ``send`` to rank+hops, receive rank-hops's message of this tag into ``recv``. Returns at once."""
        seq = self._sent.get(tag, 0)
        self._sent[tag] = seq + 1
        nxt = (self.rank + hops) % self.size
        self.world._post((nxt, tag, seq), send.detach().clone())
        return _ThreadHandle(self.world, (self.rank, tag, seq), recv)


class ThreadGroup:
    """A :class:`seqpar.comm.TransportGroup` over the thread-ranks of a :class:`ThreadRing`'s world:
    ``ThreadGroup(ring)`` inside ``run_threads``' function gives the collectives (all-gather, reduce-scatter)
    that :func:`seqpar.comm.all_gather_tensor` and :func:`seqpar.comm.reduce_scatter_tensor` call.

    Every rank makes the same collectives in the same order; the n-th collective of a group posts one
    snapshot per destination rank keyed by (destination, (op, source), n), so calls never pair across."""

    def __init__(self, ring: ThreadRing):
        if not isinstance(ring, ThreadRing):
            raise TypeError(f"ring must be a ThreadRing (the argument run_threads passes), got {type(ring).__name__}")
        self._ring = ring
        self.world = ring.world
        self.rank = ring.rank
        self.size = ring.size
        self._calls = 0

    def __repr__(self) -> str:
        return f"ThreadGroup(rank={self.rank}, size={self.size})"

    def ring(self) -> ThreadRing:
        return self._ring

    def _exchange(self, op: str, sends: list) -> list:
        """Post ``sends[j]`` to rank j (a snapshot), return what every rank posted to this one, in rank order."""
        seq = self._calls
        self._calls += 1
        for dst, msg in enumerate(sends):
            if dst != self.rank:
                self.world._post((dst, (op, self.rank), seq), msg)
        return [sends[self.rank] if src == self.rank else self.world._take((self.rank, (op, src), seq))
                for src in range(self.size)]

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape everywhere), in rank order."""
        x = x.detach()
        return self._exchange("all_gather", [x.clone() for _ in range(self.size)])

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return self._exchange("all_gather_ints", [[int(v) for v in values]] * self.size)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (P, ...) -> the sum over ranks of ``x[rank]``, added in rank order (the same on every run)."""
        if x.shape[0] != self.size:
            raise ValueError(f"reduce_scatter: dim 0 of x must be the group size {self.size}, got shape "
                             f"{tuple(x.shape)}")
        x = x.detach()
        parts = self._exchange("reduce_scatter", [x[j].clone() for j in range(self.size)])
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out


def run_threads(fn: Callable[..., Any], size: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list:
    """Run ``fn(ring, *args, **kwargs)`` on ``size`` threads (one :class:`ThreadRing` each).

    Returns the results in rank order. If a rank raises, the others are aborted and the first error
    is raised again (a ``RuntimeError`` naming the rank, chained to the original); if the ranks do
    not finish within ``timeout`` seconds, ``TimeoutError``.
    """
    world = ThreadWorld(size, timeout=timeout)
    results: list[Any] = [None] * size
    errors: list[tuple[float, int, BaseException]] = []
    lock = threading.Lock()

    def main(ring: ThreadRing) -> None:
        try:
            results[ring.rank] = fn(ring, *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            with lock:
                errors.append((time.monotonic(), ring.rank, e))
            world.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"seqpar-rank{r.rank}", daemon=True)
               for r in world.rings()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 5.0  # a rank stuck in wait() fails itself after `timeout`
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        world.abort()
        for t in threads:
            t.join(2.0)
        alive = [r for r, t in enumerate(threads) if t.is_alive()]
        raise TimeoutError(f"run_threads({getattr(fn, '__name__', fn)}): rank(s) {alive} did not finish within "
                           f"{timeout:.0f}s")
    if errors:
        real = [e for e in errors if not isinstance(e[2], RingAborted)] or errors
        _, rank, err = min(real, key=lambda e: e[0])
        raise RuntimeError(f"run_threads({getattr(fn, '__name__', fn)}): rank {rank} failed: "
                           f"{type(err).__name__}: {err}") from err
    return results
