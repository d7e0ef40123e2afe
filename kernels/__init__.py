"""Single-device block attention: ``(q, k, v, mask, scale) -> (out, lse)`` and its backward.

This layer knows nothing of torch.distributed. The ring (``seqpar.attention``) calls it once per
(query block, key/value block) tile and merges the partial results with their log-sum-exp.

Shapes::

    q    (B, Hq,  Sq, D)      any strides
    k, v (B, Hkv, Sk, D)      Hq % Hkv == 0; q head h reads kv head h // (Hq // Hkv) (GQA by index)
    out  (B, Hq,  Sq, D)      input dtype or fp32 (the caller merges in fp32)
    lse  (B, Hq,  Sq)         fp32 (fp64 for fp64 inputs), natural log; -inf for a row with no key

The mask is a :class:`TileMask` description (``backend.py``; a kind name such as ``"causal"`` is
shorthand). A *plain* mask (a kind only) goes by ``native_masks``: ``strict`` (causal minus the
diagonal: the off-diagonal tiles of the striped layout) reaches a backend without it natively as a
causal tile on ``q[1:] x k[:-1]``. A mask with a band, documents or a soft-cap goes by
``native_features``: to the backend when it has them all, else (``band`` / ``docs`` missing) split into
full / causal pieces the backend runs (:func:`seqpar.kernels.aten.forward_pieces`), else (``softcap``
missing) to ``reference``, which has every feature. Nothing is dropped: routing is by data, and a
mask whose documents do not cover the tile raises ``ValueError``.

Backends (each a :class:`KernelBackend`: entry points plus capabilities as data):

- ``reference``: plain torch math in fp32/fp64: the spec every other backend is tested against.
- ``aten``: torch's fused kernels that return the logsumexp (CPU flash kernel; CUDA flash for
  fp16/bf16, memory-efficient for fp32).
- ``triton``: fused Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``). Self-checked: on
  first use per (device, dtype) a small tile runs against fp64 math (:mod:`seqpar.kernels.selfcheck`);
  on failure ``auto`` uses ``aten`` there (one warning) and an explicit ``triton`` raises.

``auto`` is a name the dispatch takes too: the device's preferred backend (triton on CUDA) once it
passed its self-check for the inputs' device and dtype, else ``aten``.

``block_attention_accumulate`` merges a tile into a running fp32 ``(out, lse)`` in place: inside the
kernel where the backend has a ``forward_accumulate`` (triton), else ``block_attention`` +
:func:`merge_partial`. Inputs of a dtype outside a backend's ``dtypes`` (fp64 for triton) run on
``reference``, and so do calls a backend declares it cannot compute (``scale <= 0`` on ``aten``).

The backward takes the *global* ``out`` and ``lse`` (after all tiles were merged) so a tile's
gradient is exact: ``P = exp(S - lse)``, ``delta = rowsum(dO * out)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from seqpar.kernels import selfcheck
from seqpar.kernels.backend import KernelBackend, TileMask, acc_dtype, as_mask, check_tile
from seqpar.vocab import BACKENDS, Backend, MaskKind, check_choice

__all__ = [
    "TileMask",
    "KernelBackend",
    "MaskKind",
    "Backend",
    "acc_dtype",
    "get_backend",
    "resolve_backend",
    "block_attention",
    "block_attention_backward",
    "block_attention_accumulate",
    "merge_partial",
]

_MODULES = {"aten": "seqpar.kernels.aten", "reference": "seqpar.kernels.reference",
            "triton": "seqpar.kernels.triton_attention"}


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (
        f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to "
        f"run the kernels on the CPU (slow); got tensors on {device}. Use backend='auto' or 'aten'"
    )


def _has_triton_kernels() -> bool:
    return importlib.util.find_spec(_MODULES["triton"]) is not None


# Backends that prove themselves on a device and dtype before running there (seqpar.kernels.selfcheck):
# code that has never run on this GPU is not trusted, whoever asked for it.
_SELF_CHECKED = frozenset({"triton"})


def _auto_name(device: torch.device) -> str:
    """The backend ``auto`` prefers on ``device`` before any self-check: triton on CUDA when installed, else aten."""
    if device.type == "cuda" and _triton_usable(device)[0] and _has_triton_kernels():
        return "triton"
    return "aten"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Checks ``backend`` is usable on ``device``; ``auto`` -> ``aten`` where it can be nothing else.

    Where ``auto`` would pick a self-checked backend (triton on CUDA), it stays ``"auto"``: the kernel
    dispatch decides per (device, dtype) on first use (triton once it passed its self-check there, else
    aten with one warning), where the dtype is known and the check runs eagerly, never while
    ``torch.compile`` traces. Raises ``ValueError`` naming the argument when the backend is unknown or
    unusable.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        name = _auto_name(device)
        return "auto" if name in _SELF_CHECKED else name
    if backend == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise ValueError(why)
        if not _has_triton_kernels():
            raise ValueError("backend='triton': seqpar.kernels.triton_attention is not available in this build")
    return backend


def get_backend(name: str) -> KernelBackend:
    """The :class:`KernelBackend` of a concrete backend name (its module is imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be resolved first (one of {tuple(_MODULES)}), got {name!r}")
    return importlib.import_module(_MODULES[name]).BACKEND


def _for(backend: str, q: torch.Tensor, scale: float) -> KernelBackend:
    """The backend that computes these inputs: ``backend`` (``auto``: the device's preferred backend, once
    it passed its self-check for q's device and dtype, else aten), or ``reference`` for what it cannot.
    A self-checked backend named explicitly raises ``RuntimeError`` where it failed its check."""
    if backend == "auto":
        impl, fallback = get_backend(_auto_name(q.device)), get_backend("aten")
    else:
        impl, fallback = get_backend(backend), None
    if impl.name in _SELF_CHECKED and q.dtype in impl.dtypes:
        impl = selfcheck.trusted(impl, q.device, q.dtype, fallback=fallback)
    if q.dtype not in impl.dtypes or (impl.positive_scale_only and scale <= 0):
        return get_backend("reference")
    return impl


def _masked(impl: KernelBackend, mask: TileMask, Sq: int, Sk: int) -> tuple[KernelBackend, bool]:
    """For a non-plain mask: ``(backend, split)``: the backend that computes it and whether the
    dispatcher must split it into plain pieces for that backend (band / documents it lacks)."""
    check_tile(mask, Sq, Sk)
    missing = mask.features - impl.native_features
    if not missing:
        return impl, False
    if "softcap" in missing:
        return get_backend("reference"), False
    return impl, True  # band / docs: pieces of full and causal tiles, which every backend has


def block_attention(
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, D)
    *,
    mask: TileMask | str,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's attention: ``(out (B,Hq,Sq,D), lse (B,Hq,Sq) fp32)``."""
    mask, impl = as_mask(mask), _for(backend, q, scale)
    if not mask.plain:
        impl, split = _masked(impl, mask, q.shape[2], k.shape[2])
        if split:
            from seqpar.kernels.aten import forward_pieces

            return forward_pieces(impl.forward, q, k, v, mask=mask, scale=scale)
        return impl.forward(q, k, v, mask=mask, scale=scale)
    if mask.kind in impl.native_masks:
        return impl.forward(q, k, v, mask=mask, scale=scale)
    assert mask.kind == "strict", mask  # every backend has full and causal
    B, Hq, Sq, D = q.shape
    out = q.new_zeros(B, Hq, Sq, v.shape[-1])
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    if Sq > 1 and k.shape[2] > 0:
        o, l = impl.forward(q[:, :, 1:], k[:, :, : Sq - 1], v[:, :, : Sq - 1], mask=TileMask("causal"), scale=scale)
        out[:, :, 1:] = o
        lse[:, :, 1:] = l
    return out, lse


def block_attention_backward(
    dout: torch.Tensor,  # (B, Hq, Sq, D)
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, D)
    out: torch.Tensor,  # (B, Hq, Sq, D)  the global output of these query rows
    lse: torch.Tensor,  # (B, Hq, Sq)     the global log-sum-exp of these query rows
    *,
    mask: TileMask | str,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one tile given the global ``out``/``lse``: ``(dq, dk, dv)`` shaped like q, k, v."""
    mask, impl = as_mask(mask), _for(backend, q, scale)
    if not mask.plain:
        impl, split = _masked(impl, mask, q.shape[2], k.shape[2])
        if split:
            from seqpar.kernels.aten import backward_pieces

            return backward_pieces(impl.backward, dout, q, k, v, out, lse, mask=mask, scale=scale)
        return impl.backward(dout, q, k, v, out, lse, mask=mask, scale=scale)
    if mask.kind in impl.native_masks:
        return impl.backward(dout, q, k, v, out, lse, mask=mask, scale=scale)
    assert mask.kind == "strict", mask
    Sq = q.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if Sq > 1:
        gq, gk, gv = impl.backward(dout[:, :, 1:], q[:, :, 1:], k[:, :, : Sq - 1], v[:, :, : Sq - 1],
                                   out[:, :, 1:], lse[:, :, 1:], mask=TileMask("causal"), scale=scale)
        dq[:, :, 1:] = gq
        dk[:, :, : Sq - 1] = gk
        dv[:, :, : Sq - 1] = gv
    return dq, dk, dv


def merge_partial(
    out: torch.Tensor,  # (B, Hq, Sq, D) fp32/fp64, any strides: updated in place
    lse: torch.Tensor,  # (B, Hq, Sq)    fp32/fp64, any strides: updated in place
    blk_out: torch.Tensor,  # (B, Hq, Sq, D)
    blk_lse: torch.Tensor,  # (B, Hq, Sq)
) -> None:
    """In place: ``(out, lse) <- softmax-merge of (out, lse) and (blk_out, blk_lse)``, in the stable form::

        out -= sigmoid(blk_lse - lse) * (out - blk_out)
        lse -= logsigmoid(lse - blk_lse)

    Rows the block does not see (``blk_lse = -inf``) stay untouched; rows the running state has not
    seen yet (``lse = -inf``) take the block.
    """
    blk_lse = blk_lse.to(lse.dtype)
    w = torch.sigmoid(blk_lse - lse).masked_fill(torch.isneginf(blk_lse), 0.0)  # (B, Hq, Sq); no host sync
    out.sub_(w.unsqueeze(-1) * (out - blk_out.to(out.dtype)))
    lse.copy_(torch.where(torch.isneginf(lse), blk_lse, lse - torch.nn.functional.logsigmoid(lse - blk_lse)))


def block_attention_accumulate(
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, D)
    out: torch.Tensor,  # (B, Hq, Sq, D) running output, fp32 (fp64 for fp64 inputs), any strides: in place
    lse: torch.Tensor,  # (B, Hq, Sq)    running lse, same dtype as out, any strides: in place
    *,
    mask: TileMask | str,
    scale: float,
    backend: str,
) -> None:
    """Merge one tile's attention into the running ``(out, lse)`` in place (rows with no visible key
    of this tile are left untouched). Equals ``block_attention`` then :func:`merge_partial`."""
    mask, impl = as_mask(mask), _for(backend, q, scale)
    if mask.plain:
        native = mask.kind in impl.native_masks
    else:
        check_tile(mask, q.shape[2], k.shape[2])
        native = mask.features <= impl.native_features
    if impl.forward_accumulate is not None and out.dtype == torch.float32 and native:
        impl.forward_accumulate(q, k, v, out, lse, mask=mask, scale=scale)
        return
    o, l = block_attention(q, k, v, mask=mask, scale=scale, backend=impl.name)
    merge_partial(out, lse, o, l)
