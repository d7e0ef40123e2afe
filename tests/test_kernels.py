"""Kernel layer on one device: aten vs reference vs autograd of plain math, every mask kind."""

import pytest
import torch

from seqpar.kernels import block_attention, block_attention_backward, resolve_backend
from seqpar.vocab import MASK_KINDS


def _math(q, k, v, mask, scale):
    """Independent fp64 spec via torch autograd: scores -> masked softmax -> weighted sum."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    Sq, Sk = s.shape[-2:]
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    if mask != "full":
        s = s.masked_fill(j > i if mask == "causal" else j >= i, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


SQUARE = [(2, 4, 4, 17, 17, 32), (1, 6, 2, 9, 9, 40), (1, 4, 1, 12, 12, 80)]
CASES = [(m, s) for m in MASK_KINDS for s in SQUARE] + [("full", (2, 2, 2, 5, 11, 16))]


@pytest.mark.parametrize("backend", ["aten", "reference"])
@pytest.mark.parametrize("mask,shape", CASES)  # causal tiles are square in every layout; full ones may not be
def test_forward_backward_fp64(backend, mask, shape):
    B, Hq, Hkv, Sq, Sk, D = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(B, Sq, Hq, D, dtype=torch.float64, generator=gen).transpose(1, 2)  # non-contiguous
    k = torch.randn(B, Hkv, Sk, D, dtype=torch.float64, generator=gen)
    v = torch.randn(B, Hkv, Sk, D, dtype=torch.float64, generator=gen)
    scale = D ** -0.5
    out, lse = block_attention(q, k, v, mask=mask, scale=scale, backend=backend)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _math(qq, kk, vv, mask, scale)
    assert torch.allclose(out.double(), ref_out, atol=1e-12)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-12)
    do = torch.randn(ref_out.shape, dtype=torch.float64, generator=gen)
    ref_out.backward(do)
    dq, dk, dv = block_attention_backward(do, q, k, v, out, lse, mask=mask, scale=scale, backend=backend)
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aten_low_precision_close_to_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 64, generator=gen).to(dtype) for _ in range(3))
    o1, l1 = block_attention(q, k, v, mask="causal", scale=0.125, backend="aten")
    o2, l2 = block_attention(q, k, v, mask="causal", scale=0.125, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert l1.dtype == torch.float32
    assert torch.allclose(o1.float(), o2.float(), atol=tol) and torch.allclose(l1, l2, atol=tol)


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "aten"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("flash", torch.device("cpu"))
