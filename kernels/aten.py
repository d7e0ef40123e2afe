"""Block attention on torch's fused kernels that return the logsumexp.

CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (fp32/fp64/bf16/fp16; GQA natively) and its
backward. CUDA: the flash kernel for fp16/bf16 and the memory-efficient kernel for fp32; these take
equal head counts, so K/V are repeated *after* communication (on the local tile only) and the
repeated gradients are summed back in fp32.

Masks. The fused kernels know only ``full`` and top-left ``causal``. A tile with a band and/or
documents (``native_features = {"band", "docs"}``) is split into pieces they run
(:func:`seqpar.kernels.backend.split_mask`): full rectangles, causal triangles, and lower-edge
triangles (``j >= i + lo``) run as causal triangles on the piece's q rows and kv columns reversed;
documents first cut the tile into same-document sub-rectangles. Pieces with nothing visible are never
run, so the work is proportional to the visible area. The pieces' ``(out, lse)`` are merged in fp32
(fp64 for fp64 inputs) with :func:`seqpar.kernels.merge_partial`; the backward sums the pieces'
dq/dk/dv, each piece's backward run against the global out/lse of its rows. Masked tiles return
``out`` and the gradients in the accumulation dtype. Soft-capped tiles (``softcap > 0``) have no
aten piece: the dispatcher sends them to the ``reference`` backend, which computes them exactly in
chunks of query rows (at most 64 MiB of scores per chunk).

MLA (v with its own head dim Dv != D: DeepSeek-V2/V3, MiniCPM3). The fused kernels take one head dim, so
q, k and v are zero-padded to max(D, Dv) once per tile and the output (gradients) cut back
(:func:`seqpar.kernels.backend.forward_padded`): exact, since zero columns of q / k add nothing to a score
and zero columns of v only give zero output columns; the cost is the padded columns' flops and one copy.
"""

from __future__ import annotations

import torch

from seqpar.kernels.backend import KernelBackend, TileMask, acc_dtype, backward_padded, forward_padded, split_mask

__all__ = ["forward", "backward", "forward_pieces", "backward_pieces", "split_params", "BACKEND", "CPU_LEAF",
           "CPU_CHUNK_FRACTION", "CPU_MIN_CHUNK"]

_aten = torch.ops.aten


def _check_mask(mask: TileMask) -> bool:
    if mask.kind not in ("full", "causal"):
        raise ValueError(f"aten backend: mask must be 'full' or 'causal' here, got {mask.kind!r}")
    return mask.kind == "causal"


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sum_groups(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    B, Hq, S, D = dx.shape
    if Hq == hkv:
        return dx
    return dx.float().reshape(B, hkv, Hq // hkv, S, D).sum(2).to(dx.dtype)


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    """The fused kernels read the head dim as contiguous whatever its stride (torch's CPU flash kernel
    returns wrong numbers for stride(-1) != 1): copy such inputs."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _plain_forward(q, k, v, *, mask: TileMask, scale: float):
    causal = _check_mask(mask)
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    group = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, group), _repeat_kv(v, group)
    if q.dtype in (torch.float16, torch.bfloat16):
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    out, lse, _, _ = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]


def _plain_backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    causal = _check_mask(mask)
    dout, q, k, v, out = (_dense_last(x) for x in (dout, q, k, v, out))
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.float() if q.dtype != torch.float64 else lse, 0.0, causal, scale=scale
        )
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    kr, vr = _repeat_kv(k, group), _repeat_kv(v, group)
    Sq, Sk = q.shape[2], k.shape[2]
    lse = lse.float().contiguous()
    if q.dtype in (torch.float16, torch.bfloat16):
        zero = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, kr, vr, out, lse, zero, zero, Sq, Sk, 0.0, causal, zero, zero, scale=scale
        )
    else:
        pad = (-Sq) % 32  # the efficient kernel keeps lse in rows padded to a multiple of 32
        lse_p = torch.nn.functional.pad(lse, (0, pad))
        zero = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, kr, vr, None, out, lse_p, zero, zero, 0.0, [True, True, True, False], causal, scale=scale
        )
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


# ---------------------------------------------------------------------------------------------- masked tiles

_PIECE_MASK = {"full": TileMask("full"), "causal": TileMask("causal"), "flip": TileMask("causal")}

# How finely the split cuts on CPU. torch's CPU flash kernel skips keys only in blocks of 512, so a triangle
# narrower than that costs its whole square, while small full pieces run at full speed (they stay in cache):
# band chunks of ~1/8 of the band width (at least CPU_MIN_CHUNK rows: a wide full middle, small triangles),
# and triangles wider than CPU_LEAF halved recursively. CUDA's kernels skip in blocks of 64-128: few, big
# pieces there. (Measured on 1 thread, benchmarks/kernels.py --masked.)
CPU_CHUNK_FRACTION = 8
CPU_MIN_CHUNK = 64
CPU_LEAF = 256


def split_params(mask: TileMask, device: torch.device) -> tuple[int | None, int | None]:
    """``(chunk, leaf)`` of :func:`split_mask` for this device (see ``CPU_CHUNK_FRACTION``)."""
    if device.type != "cpu":
        return None, None
    lo, hi = mask.band()
    chunk = None
    if lo is not None and hi is not None and hi - lo > 2 * CPU_MIN_CHUNK:
        chunk = max(CPU_MIN_CHUNK, (hi - lo + 1) // CPU_CHUNK_FRACTION)
    return chunk, CPU_LEAF


def _rows(x: torch.Tensor, a: int, b: int, flip: bool) -> torch.Tensor:
    """x[:, :, a:b] (dim 2: the sequence), reversed along it for a flipped piece (a copy then)."""
    x = x[:, :, a:b]
    return x.flip(2) if flip else x


def forward_pieces(plain_forward, q, k, v, *, mask: TileMask, scale: float, split=None):
    """A band / documents tile as :func:`split_mask`'s pieces on ``plain_forward`` (full / causal only),
    merged in the accumulation dtype -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq); unseen rows: 0, -inf."""
    from seqpar.kernels import merge_partial

    B, Hq, Sq, _ = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=acc, device=q.device)
    touched = bytearray(Sq)  # rows some piece has written: the first result for fresh rows is copied, not merged

    def put(q0: int, q1: int, group: list) -> None:
        """Fold the (o, l) of pieces with the same rows [q0, q1) (every row of a piece sees a key, so each l
        is finite) into one, then into the state."""
        if len(group) == 1:
            o, l = group[0]
        else:
            ls = torch.stack([l.to(acc) for _, l in group])  # (n, B, Hq, rows)
            l = torch.logsumexp(ls, 0)
            w = torch.exp(ls - l).unsqueeze(-1)  # (n, B, Hq, rows, 1)
            o = group[0][0] * w[0]
            for i in range(1, len(group)):
                o.addcmul_(group[i][0], w[i])
        if 1 in touched[q0:q1]:
            merge_partial(out[:, :, q0:q1], lse[:, :, q0:q1], o, l)
        else:
            out[:, :, q0:q1] = o
            lse[:, :, q0:q1] = l
            touched[q0:q1] = b"\x01" * (q1 - q0)

    group: list = []
    rows = None
    for p in split_mask(mask, Sq, k.shape[2], *(split or split_params(mask, q.device))):
        flip = p.shape == "flip"
        o, l = plain_forward(_rows(q, p.q0, p.q1, flip), _rows(k, p.k0, p.k1, flip), _rows(v, p.k0, p.k1, flip),
                             mask=_PIECE_MASK[p.shape], scale=scale)
        if flip:
            o, l = o.flip(2), l.flip(2)
        if rows != (p.q0, p.q1) and group:
            put(*rows, group)
            group = []
        rows = (p.q0, p.q1)
        group.append((o, l))
    if group:
        put(*rows, group)
    return out, lse


def backward_pieces(plain_backward, dout, q, k, v, out, lse, *, mask: TileMask, scale: float, split=None):
    """The gradients of a band / documents tile: the sum of its pieces' (each against the global out/lse
    of its rows), in the accumulation dtype."""
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    out = out.to(q.dtype)
    lse = lse.to(acc)
    for p in split_mask(mask, q.shape[2], k.shape[2], *(split or split_params(mask, q.device))):
        flip = p.shape == "flip"
        rows = [_rows(x, p.q0, p.q1, flip) for x in (dout, q)]
        cols = [_rows(x, p.k0, p.k1, flip) for x in (k, v)]
        gq, gk, gv = plain_backward(rows[0], rows[1], *cols, _rows(out, p.q0, p.q1, flip),
                                    _rows(lse, p.q0, p.q1, flip).contiguous(), mask=_PIECE_MASK[p.shape],
                                    scale=scale)
        if flip:
            gq, gk, gv = gq.flip(2), gk.flip(2), gv.flip(2)
        dq[:, :, p.q0:p.q1] += gq
        dk[:, :, p.k0:p.k1] += gk
        dv[:, :, p.k0:p.k1] += gv
    return dq, dk, dv


def forward(q, k, v, *, mask: TileMask, scale: float):
    """-> out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32 (fp64 for fp64); band / documents by pieces. torch's fused
    kernels take one head dim: a v with its own (Dv != D, MLA) runs zero-padded (:func:`forward_padded`)."""
    return forward_padded(_forward, q, k, v, mask=mask, scale=scale)


def _forward(q, k, v, *, mask: TileMask, scale: float):
    if mask.plain:
        return _plain_forward(q, k, v, mask=mask, scale=scale)
    if mask.softcap:
        raise ValueError("aten backend: no fused kernel soft-caps; seqpar.kernels sends such tiles to 'reference'")
    return forward_pieces(_plain_forward, q, k, v, mask=mask, scale=scale)


def backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    """-> dq, dk, dv shaped like q, k, v; band / documents by pieces; Dv != D zero-padded as in :func:`forward`."""
    return backward_padded(_backward, dout, q, k, v, out, lse, mask=mask, scale=scale)


def _backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    if mask.plain:
        return _plain_backward(dout, q, k, v, out, lse, mask=mask, scale=scale)
    if mask.softcap:
        raise ValueError("aten backend: no fused kernel soft-caps; seqpar.kernels sends such tiles to 'reference'")
    return backward_pieces(_plain_backward, dout, q, k, v, out, lse, mask=mask, scale=scale)


BACKEND = KernelBackend(
    name="aten", forward=forward, backward=backward, native_masks=frozenset({"full", "causal"}),
    native_features=frozenset({"band", "docs"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    positive_scale_only=True,  # torch's CPU flash kernel returns NaN for causal rows with scale <= 0
)
