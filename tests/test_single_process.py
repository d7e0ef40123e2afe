"""World size 1 without torch.distributed: the same code path, no communication, equals SDPA."""

import pytest
import torch
import torch.nn.functional as F

import seqpar
from seqpar.vocab import LAYOUTS


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_world_size_one_matches_sdpa(layout, causal):
    assert not torch.distributed.is_initialized()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 16, 6, 40, dtype=torch.float64, generator=gen).transpose(2, 3)  # extra batch dim
    k = torch.randn(2, 3, 2, 16, 40, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 3, 2, 16, 40, dtype=torch.float64, generator=gen)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(qs, ks, vs, is_causal=causal, enable_gqa=True, layout=layout, scale=0.3)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, enable_gqa=True, scale=0.3)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12)
    do = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    out.backward(do)
    ref.backward(do)
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)
    assert torch.equal(seqpar.positions(16, layout=layout), torch.arange(16))
    assert torch.equal(seqpar.unshard(seqpar.shard(q, layout=layout), layout=layout), q)


def test_local_errors_raise_immediately():
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        seqpar.attention(x, x[:, :1], x[:, :1])
    with pytest.raises(TypeError, match="group must be"):
        seqpar.attention(x, x, x, group="world")
