"""A kernel backend proves itself on a device and dtype before it runs there (``triton``).

Triton compiles its kernels per device and dtype on first use; a miscompile, a GPU generation the
kernels were never run on, or a wrong kernel would otherwise return wrong numbers silently. So on the
first call per ``(backend, device, dtype)`` the dispatcher in :mod:`seqpar.kernels` has
:func:`trusted` run :func:`measure`: one small tile through the backend's own entry points, on that
device and dtype, against an fp64 truth::

    tile: B=1, Hq=4, Hkv=2 (GQA), Sq=Sk=72, D=64 on CUDA (B=1, Hq=2, Hkv=1, S=40, D=32 elsewhere: the
          interpreter), scale D**-0.5, inputs from a fixed seed (a private generator: no global RNG)

    check              mask                                   entry point
    forward/causal     TileMask("causal")                     forward -> out, lse
    backward/causal    TileMask("causal")                     backward -> dq, dk, dv
    accumulate/causal  TileMask("causal") into a full tile    forward_accumulate (when the backend has one)
    forward/band       TileMask("causal", lo=-20)             (a sliding window of 21 keys)
    backward/band      TileMask("causal", lo=-20)
    forward/docs       TileMask("full", docs: rows and keys 0-29 | 30-S)
    backward/docs      TileMask("full", docs: rows and keys 0-29 | 30-S)

Masked checks run only for the features the backend declares natively (``native_features``); the
dispatcher splits the rest into plain tiles, which the causal checks cover. The truth is the
``reference`` backend in fp64 on the very inputs the backend got (rounded to the dtype, then upcast;
the backward gets the rounded ``out`` and the fp32 ``lse``), so only the kernel's own rounding counts.
The error of a tensor is ``max|got - truth| / max|truth|``; a check passes when every tensor's error is
within ``max(SLACK x aten's error, FLOOR[dtype])`` where aten's error is torch's fused kernels' on the
same inputs and device (the project's bound: seqpar's error at most a small multiple of torch's in the
same dtype). Rows the truth leaves unseen (lse ``-inf``) must be exactly ``-inf`` / 0. Any NaN, any
exception (a compile error included) fails the check.

The verdict is cached per ``(backend, device, dtype)`` in a small bounded dict: a measured fact about
this process's device, not configuration (re-measured if evicted). :func:`trusted` returns the
backend when it passed; otherwise the ``fallback`` (``aten``, for ``backend="auto"``) with one
:class:`SelfCheckWarning` per ``(backend, device, dtype)``, or, without a fallback (an explicit
``backend="triton"``), a ``RuntimeError`` naming the device, dtype, check and max error.

A check cannot run while ``torch.compile`` traces (its tensors would be traced) or while a CUDA graph
is captured (it synchronises): then the verdict must already be known. seqpar's own compiled path never
gets here while tracing: its custom ops (``seqpar.methods.ops``) call the kernels at run time, eagerly.
Elsewhere an unknown verdict at that moment means the fallback (not cached) or, without one, a
``RuntimeError`` asking for one eager call first.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass

import torch

from seqpar.kernels.backend import KernelBackend, TileMask

__all__ = ["Verdict", "SelfCheckWarning", "measure", "verdict", "trusted", "FLOOR", "SLACK", "TILE", "SMALL_TILE",
           "CACHE_SIZE"]

TILE = (1, 4, 2, 72, 64)  # (B, Hq, Hkv, S, D) on CUDA: several 32/64-row blocks, a ragged last one, GQA
SMALL_TILE = (1, 2, 1, 40, 32)  # elsewhere (the Triton interpreter: numpy, slow per program): three 16-row blocks
SLACK = 4.0  # x aten's error on the same inputs
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~80x / 2x / 2x eps(dtype)
CACHE_SIZE = 64  # (backend, device, dtype) verdicts kept; the oldest is dropped (and re-measured if needed)

_BAND = TileMask("causal", lo=-20)


def _masks(S: int) -> tuple[tuple[str, TileMask, frozenset[str]], ...]:
    """``(name, mask, the native features it needs)`` of the checked masks of an S x S tile."""
    docs = ((0, 30, 0), (30, S, 1))  # two documents, rows / keys 0-29 and 30-(S-1)
    return (("causal", TileMask("causal"), frozenset()), ("band", _BAND, frozenset({"band"})),
            ("docs", TileMask("full", docs=(docs, docs)), frozenset({"docs"})))


class SelfCheckWarning(RuntimeWarning):
    """A kernel backend failed its self-check on a device and dtype; another backend runs there."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`measure`: ``ok``; ``check`` / ``tensor`` / ``error`` / ``tolerance`` name the
    first failing check (or, when ok, the check closest to its tolerance); ``exception`` is the text of
    an exception a check raised (error ``inf``); ``errors``: ``(check, tensor, error, tolerance)`` of
    every tensor checked."""

    ok: bool
    check: str
    tensor: str
    error: float
    tolerance: float
    exception: str = ""
    errors: tuple[tuple[str, str, float, float], ...] = ()

    def describe(self) -> str:
        if self.exception:
            return f"{self.check} raised {self.exception}"
        return (f"{self.check}: {self.tensor} max error {self.error:.3g} {'<=' if self.ok else '>'} tolerance "
                f"{self.tolerance:.3g}")


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|`` over ``want``'s finite entries; ``inf`` if ``got`` is not finite
    exactly where ``want`` is, or differs where ``want`` is infinite (an unseen row's lse)."""
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if got.shape != want.shape:
        return math.inf
    fin = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), fin) or not torch.equal(got[~fin], want[~fin]):
        return math.inf
    if not fin.any():
        return 0.0
    scale = want[fin].abs().max().clamp_min(1e-30)
    return ((got[fin] - want[fin]).abs().max() / scale).item()


def _inputs(device: torch.device, dtype: torch.dtype):
    B, Hq, Hkv, S, D = TILE if device.type == "cuda" else SMALL_TILE
    g = torch.Generator().manual_seed(20240617)  # a private generator: the global RNG streams stay untouched
    q, k, v, k2, v2, dout = (torch.randn(B, h, S, D, generator=g).to(device=device, dtype=dtype)
                             for h in (Hq, Hkv, Hkv, Hkv, Hkv, Hq))
    return q, k, v, k2, v2, dout, D ** -0.5


def _checks(impl: KernelBackend, device: torch.device, dtype: torch.dtype) -> list:
    """``[(check, run)]``: ``run()`` -> ``{tensor: (got, truth, aten's or None)}``, the candidate called last."""
    from seqpar.kernels import aten, reference

    q, k, v, k2, v2, dout, scale = _inputs(device, dtype)
    q64, k64, v64, k264, v264, dout64 = (t.to(torch.float64) for t in (q, k, v, k2, v2, dout))
    ref, base = reference.BACKEND, aten.BACKEND

    def theirs(fn, *args, **kw):  # aten's result sets the allowance; aten failing is not the candidate's fault
        try:
            return fn(*args, **kw)
        except Exception:  # noqa: BLE001
            return None

    def forward(mask):
        o_t, l_t = ref.forward(q64, k64, v64, mask=mask, scale=scale)
        o_a, l_a = theirs(base.forward, q, k, v, mask=mask, scale=scale) or (None, None)
        o, l = impl.forward(q, k, v, mask=mask, scale=scale)
        return {"out": (o, o_t, o_a), "lse": (l, l_t, l_a)}

    def backward(mask):
        o_t, l_t = ref.forward(q64, k64, v64, mask=mask, scale=scale)
        out, lse = o_t.to(dtype), l_t.to(torch.float32)  # the global out / lse the backward gets
        truth = ref.backward(dout64, q64, k64, v64, out.to(torch.float64), lse.to(torch.float64), mask=mask,
                             scale=scale)
        them = theirs(base.backward, dout, q, k, v, out, lse, mask=mask, scale=scale) or (None,) * 3
        got = impl.backward(dout, q, k, v, out, lse, mask=mask, scale=scale)
        return {n: (g_, t_, a_) for n, g_, t_, a_ in zip(("dq", "dk", "dv"), got, truth, them)}

    def accumulate(mask):
        # a running fp32 state of a full tile over (k2, v2); this tile merged into it in place
        o1, l1 = ref.forward(q64, k264, v264, mask=TileMask("full"), scale=scale)
        o_t, l_t = ref.forward(q64, k64, v64, mask=mask, scale=scale)
        out_acc, lse_acc = o1.to(torch.float32), l1.to(torch.float32)
        a1, b1 = out_acc.to(torch.float64), lse_acc.to(torch.float64)
        new = torch.logaddexp(b1, l_t)
        want = a1 * torch.exp(b1 - new)[..., None] + o_t * torch.exp(l_t - new)[..., None]
        impl.forward_accumulate(q, k, v, out_acc, lse_acc, mask=mask, scale=scale)
        return {"out": (out_acc, want, None), "lse": (lse_acc, new, None)}  # the forward's allowance

    out = []
    for name, mask, needs in _masks(q.shape[2]):
        if not needs <= impl.native_features:
            continue  # the dispatcher splits such masks into plain tiles: the causal checks cover them
        out += [(f"forward/{name}", lambda m=mask: forward(m)), (f"backward/{name}", lambda m=mask: backward(m))]
        if name == "causal" and impl.forward_accumulate is not None:
            out.append(("accumulate/causal", lambda m=mask: accumulate(m)))
    return out


def measure(impl: KernelBackend, device: torch.device | str, dtype: torch.dtype) -> Verdict:
    """Run the self-check of ``impl`` on ``device`` and ``dtype`` now (uncached; see the module docstring)."""
    device = torch.device(device)
    floor = FLOOR.get(dtype, FLOOR[torch.float32])
    rows: list[tuple[str, str, float, float]] = []
    aten_err: dict[tuple[str, str], float] = {}
    check = "setup"
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), on_device:
            checks = _checks(impl, device, dtype)
            for check, run in checks:
                tensors, mask = run(), check.split("/")[1]
                for tensor, (got, want, theirs) in tensors.items():
                    if not check.startswith("accumulate"):  # it borrows the forward's allowance
                        aten_err[mask, tensor] = math.inf if theirs is None else _err(theirs, want)
                    base = aten_err.get((mask, tensor), math.inf)
                    tol = max(SLACK * base, floor) if math.isfinite(base) else floor
                    err = _err(got, want)
                    rows.append((check, tensor, err, tol))
                    if not err <= tol:  # NaN fails too
                        return Verdict(False, check, tensor, err, tol, errors=tuple(rows))
    except Exception as e:  # noqa: BLE001 - a compile error, a launch failure, a shape error: all mean "not trusted"
        return Verdict(False, check, "", math.inf, floor, exception=f"{type(e).__name__}: {e}", errors=tuple(rows))
    worst = max(rows, key=lambda r: r[2] / r[3]) if rows else ("", "", 0.0, floor)
    return Verdict(True, worst[0], worst[1], worst[2], worst[3], errors=tuple(rows))


# ------------------------------------------------------------------------------------------ the cache of verdicts

@dataclass
class _Entry:
    verdict: Verdict
    warned: bool = False


_VERDICTS: dict[tuple[KernelBackend, torch.device, torch.dtype], _Entry] = {}  # measured facts, bounded
_LOCK = threading.Lock()  # thread-ranks of one process measure once, and warn once


def _key(impl: KernelBackend, device: torch.device, dtype: torch.dtype) -> tuple:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return impl, device, dtype


def _can_measure(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def verdict(impl: KernelBackend, device: torch.device | str, dtype: torch.dtype) -> Verdict:
    """The cached :class:`Verdict` of ``impl`` on ``device`` and ``dtype``, measured on first use."""
    return _entry(impl, torch.device(device), dtype).verdict


def _entry(impl: KernelBackend, device: torch.device, dtype: torch.dtype) -> _Entry:
    key = _key(impl, device, dtype)
    entry = _VERDICTS.get(key)
    if entry is not None:
        return entry
    with _LOCK:
        entry = _VERDICTS.get(key)
        if entry is None:
            entry = _Entry(measure(impl, device, dtype))
            while len(_VERDICTS) >= CACHE_SIZE:
                _VERDICTS.pop(next(iter(_VERDICTS)))
            _VERDICTS[key] = entry
    return entry


def trusted(impl: KernelBackend, device: torch.device, dtype: torch.dtype, *,
            fallback: KernelBackend | None) -> KernelBackend:
    """``impl`` if it passed its self-check on ``device`` / ``dtype``; else ``fallback`` (one
    :class:`SelfCheckWarning` per key), or, when ``fallback`` is None, ``RuntimeError``."""
    key = _key(impl, device, dtype)
    entry = _VERDICTS.get(key)
    if entry is None and not _can_measure(device):
        if fallback is not None:
            return fallback  # not cached: the check runs at the next eager call
        raise RuntimeError(
            f"backend={impl.name!r} has not passed its self-check on {device} {dtype} yet, and it cannot run while "
            f"torch.compile traces or a CUDA graph is captured: make one eager call with this device and dtype first "
            f"(or seqpar.kernels.selfcheck.verdict), or use backend='auto'")
    if entry is None:
        entry = _entry(impl, device, dtype)
    v = entry.verdict
    if v.ok:
        return impl
    if fallback is None:
        raise RuntimeError(
            f"backend={impl.name!r} failed its self-check on {device} {dtype}: {v.describe()} (a small tile against "
            f"fp64 math; see docs/kernels.md). Its kernels compute wrong results here: use backend='aten', or "
            f"backend='auto', which falls back to aten")
    if not entry.warned:
        with _LOCK:
            if not entry.warned:
                entry.warned = True
                warnings.warn(
                    f"seqpar: the {impl.name} kernels failed their self-check on {device} {dtype} ({v.describe()}); "
                    f"backend='auto' uses {fallback.name!r} for {device} {dtype} from now on in this process",
                    SelfCheckWarning, stacklevel=2)
    return fallback
