"""Cases run on every rank of a spawned gloo world (``seqpar.testing.worlds``). Each returns plain
numbers; the pytest side asserts on them. References are computed independently on the full sequence."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar
from seqpar.testing import numerics


def make_inputs(seed, B, Hq, Hkv, S, D, dtype, transposed):
    """Full-sequence q, k, v, grad-out (same on every rank). ``transposed``: (B, S, H, D) storage
    viewed as (B, H, S, D), as Hugging Face passes them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(h):
        if transposed:
            return torch.randn(B, S, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, h, S, D, generator=g, dtype=torch.float64)

    return rnd(Hq), rnd(Hkv), rnd(Hkv), rnd(Hq), dtype


def equivalence(rank, size, *, seed, B, Hq, Hkv, S, D, layout, causal, dtype, transposed=False,
                backend="aten", method="ring"):
    """Max-abs errors vs an fp64 SDPA reference of: seqpar in ``dtype``, and SDPA in ``dtype``
    on the whole sequence, for out, dq, dk, dv on this rank's shard."""
    q, k, v, do, dtype = make_inputs(seed, B, Hq, Hkv, S, D, dtype, transposed)
    gqa = Hq != Hkv
    ref = numerics.sdpa_grads(q, k, v, do, causal=causal)  # fp64, full sequence
    low = numerics.sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=causal)  # same dtype, one device
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, is_causal=causal, enable_gqa=gqa, layout=layout, backend=backend,
                           method=method)
    out.backward(sh(do.to(dtype)))
    mine = [out.detach(), ql.grad, kl.grad, vl.grad]
    assert all(m.dtype == dtype for m in mine), [m.dtype for m in mine]
    return numerics.errors(mine, [sh(r) for r in ref], [sh(lo) for lo in low])


@contextmanager
def counted_exchanges():
    """While open, every batch_isend_irecv call (one ring exchange) appends its op count to the yielded list."""
    calls: list[int] = []
    real = dist.batch_isend_irecv

    def counting(ops):
        calls.append(len(ops))
        return real(ops)

    dist.batch_isend_irecv = counting
    try:
        yield calls
    finally:
        dist.batch_isend_irecv = real


def sent_elements(rank, size, *, layout, causal, S_local=8):
    """Elements this rank sends per ring exchange in one forward and one backward, and one block's K/V."""
    sent: list[int] = []
    real = dist.batch_isend_irecv

    def counting(ops):
        sent.append(sum(op.tensor.numel() for op in ops if op.op is dist.isend))
        return real(ops)

    dist.batch_isend_irecv = counting
    try:
        q, k, v = (torch.randn(1, 2, S_local, 8, requires_grad=True) for _ in range(3))
        out = seqpar.attention(q, k, v, is_causal=causal, layout=layout)
        fwd = list(sent)
        sent.clear()
        out.sum().backward()
        bwd = list(sent)
    finally:
        dist.batch_isend_irecv = real
    return dict(fwd=fwd, bwd=bwd, block=k.numel() + v.numel())


def count_exchanges(rank, size, *, layout, causal):
    """Number of batch_isend_irecv calls (ring exchanges) in one forward and one backward."""
    with counted_exchanges() as calls:
        S = 8 * size
        q = torch.randn(1, 2, S // size, 8, requires_grad=True)
        k = torch.randn(1, 2, S // size, 8, requires_grad=True)
        v = torch.randn(1, 2, S // size, 8, requires_grad=True)
        out = seqpar.attention(q, k, v, is_causal=causal, layout=layout)
        fwd = list(calls)
        calls.clear()
        out.sum().backward()
        bwd = list(calls)
    return dict(fwd=fwd, bwd=bwd)


def bad_input(rank, size, *, case):
    """Call seqpar.attention with bad input (on one or all ranks); return (exception type, message)."""
    S_local, D = 8, 16
    q = torch.randn(1, 4, S_local, D)
    k = torch.randn(1, 4, S_local, D)
    v = torch.randn(1, 4, S_local, D)
    kwargs = dict(is_causal=True, layout="zigzag")
    if case == "dtype_mismatch":
        k = k.double()
    elif case == "gqa_without_flag":
        k, v = k[:, :2], v[:, :2]
    elif case == "heads_not_multiple":
        k, v = k[:, :3], v[:, :3]
    elif case == "two_dims":
        q, k, v = q[0, 0], k[0, 0], v[0, 0]
    elif case == "odd_zigzag":
        q, k, v = q[:, :, :7], k[:, :, :7], v[:, :, :7]
    elif case == "unknown_layout":
        kwargs["layout"] = "spiral"
    elif case == "unknown_method":
        kwargs["method"] = "tree"
    elif case == "unknown_backend":
        kwargs["backend"] = "cudnn"
    elif case == "int_dtype":
        q, k, v = q.long(), k.long(), v.long()
    elif case == "not_tensor":
        q = q.tolist()
    elif case == "kv_shape_mismatch":  # v may have its own head dim (MLA), not its own heads / length
        v = v[:, :2]
    elif case == "local_len_disagrees":  # only rank 1 holds a different length: every rank must fail
        if rank == 1:
            q, k, v = (torch.randn(1, 4, S_local + 2, D) for _ in range(3))
    elif case == "one_rank_bad_dtype":  # only the last rank's input is bad
        if rank == size - 1:
            q = q.half()
    # the masks (global S = S_local * size): bad on every rank, or on the last rank only
    elif case == "cu_not_increasing":
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 5, S_local * size])
    elif case == "cu_decreasing":
        kwargs["cu_seqlens"] = torch.tensor([0, 9, 5, S_local * size])
    elif case == "cu_not_from_zero":
        kwargs["cu_seqlens"] = torch.tensor([1, 5, S_local * size])
    elif case == "cu_not_to_S":
        kwargs["cu_seqlens"] = torch.tensor([0, 5, S_local * size - 1])  # e.g. the local length's offsets
    elif case == "cu_float":
        kwargs["cu_seqlens"] = torch.tensor([0.0, 5.0, S_local * size])
    elif case == "cu_2d":
        kwargs["cu_seqlens"] = torch.tensor([[0, 5, S_local * size]])
    elif case == "cu_differs":  # valid offsets on each rank, but not the same ones: the agreement names them
        kwargs["cu_seqlens"] = torch.tensor([0, 5 + rank, S_local * size])
    elif case == "window_differs":
        kwargs["window_size"] = (4 + rank, -1)
    elif case == "window_below_minus_one":
        kwargs["window_size"] = (-2, 0)
    elif case == "window_not_int":
        kwargs["window_size"] = (2.5, -1)
    elif case == "softcap_negative":
        kwargs["softcap"] = -1.0
    elif case == "softcap_nan":
        kwargs["softcap"] = float("nan")
    elif case == "one_rank_bad_cu":
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 5 if rank == size - 1 else 6, S_local * size])
    elif case == "one_rank_bad_window":
        kwargs["window_size"] = (-3, -1) if rank == size - 1 else (3, -1)
    elif case == "one_rank_bad_softcap":
        kwargs["softcap"] = -0.5 if rank == size - 1 else 0.5
    else:
        raise AssertionError(case)
    try:
        seqpar.attention(q, k, v, **kwargs)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None, None


def healthy(rank, size):
    """A small correct call: the world still works after failures."""
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = seqpar.attention(seqpar.shard(x), seqpar.shard(x), seqpar.shard(x), is_causal=True)
    ref = F.scaled_dot_product_attention(x, x, x, is_causal=True)
    return (seqpar.unshard(out) - ref).abs().max().item()


def shard_roundtrip(rank, size, *, layout):
    """unshard(shard(x)) == x along several dims; unshard's gradient is this rank's slice;
    positions() names the tokens shard() gives this rank."""
    S = 4 * size
    x = torch.arange(3 * S * 5, dtype=torch.float64).reshape(3, S, 5)
    errs = []
    for dim in (1, -2):
        local = seqpar.shard(x, dim=dim, layout=layout).detach().requires_grad_()
        full = seqpar.unshard(local, dim=dim, layout=layout)
        errs.append((full - x).abs().max().item())
        w = torch.arange(full.numel(), dtype=full.dtype).reshape(full.shape)
        (full * w).sum().backward()
        errs.append((local.grad - seqpar.shard(w, dim=dim, layout=layout)).abs().max().item())
    pos = seqpar.positions(S, layout=layout)
    errs.append((seqpar.shard(torch.arange(S), dim=0, layout=layout) - pos).abs().max().item())
    return max(errs)


def finite_check(rank, size, *, case):
    """SEQPAR_CHECK_FINITE=1 on this rank's process for one call: (exception type, message) or
    (None, whether the output has a NaN)."""
    import os

    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(rank))
    q, k, v = x.clone(), x.clone(), x.clone()
    if case in ("nan_k_rank1", "off") and rank == 1:
        k[0, 0, 3, 1] = float("nan")
    if case == "overflow":  # finite inputs whose scores overflow fp32: the output is NaN
        q, k = q * 1e30, k * 1e30
    os.environ["SEQPAR_CHECK_FINITE"] = "0" if case == "off" else "1"
    try:
        out = seqpar.attention(q, k, v, is_causal=False, layout="contiguous")
    except (ValueError, FloatingPointError) as e:
        return type(e).__name__, str(e)
    finally:
        os.environ.pop("SEQPAR_CHECK_FINITE")
    return None, bool(out.isnan().any())
