"""Block attention on torch's fused kernels that return the logsumexp.

CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (fp32/fp64/bf16/fp16; GQA natively) and its
backward. CUDA: the flash kernel for fp16/bf16 and the memory-efficient kernel for fp32; these take
equal head counts, so K/V are repeated *after* communication (on the local tile only) and the
repeated gradients are summed back in fp32.
"""

from __future__ import annotations

import torch

from seqpar.kernels.backend import KernelBackend, TileMask

__all__ = ["forward", "backward", "BACKEND"]

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


def forward(q, k, v, *, mask: TileMask, scale: float):
    causal = _check_mask(mask)
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


def backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    causal = _check_mask(mask)
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


BACKEND = KernelBackend(
    name="aten", forward=forward, backward=backward, native_masks=frozenset({"full", "causal"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    positive_scale_only=True,  # torch's CPU flash kernel returns NaN for causal rows with scale <= 0
)
