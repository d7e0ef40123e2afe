"""Cases for tests/test_state.py, run on every rank of a spawned gloo world: long runs of packed batches
(state stays bounded, one agreement and one host read per batch, not per layer), a destroyed group's
state freed, and the documents' agreement after the cache (in-place changes, disagreement)."""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch
import torch.distributed as dist

import seqpar
import seqpar.state as state_mod
from mask_cases import masked_grads, truth_mask
from seqpar.layout import packed_chunks
from seqpar.masks import last_step, plan_tile
from seqpar.state import group_state
from seqpar.testing import numerics


@contextlib.contextmanager
def counting():
    """Counts, while inside: all-gathers (the agreement's collective; method="ring" gathers nothing else)
    and host reads of tensors (tolist / item: each a host sync on a GPU)."""
    n = {"gathers": 0, "reads": 0}
    gather, tolist, item = dist.all_gather, torch.Tensor.tolist, torch.Tensor.item

    def counted_gather(*a, **kw):
        n["gathers"] += 1
        return gather(*a, **kw)

    def counted_tolist(self, *a):
        n["reads"] += 1
        return tolist(self, *a)

    def counted_item(self, *a):
        n["reads"] += 1
        return item(self, *a)

    dist.all_gather, torch.Tensor.tolist, torch.Tensor.item = counted_gather, counted_tolist, counted_item
    try:
        yield n
    finally:
        dist.all_gather, torch.Tensor.tolist, torch.Tensor.item = gather, tolist, item


def _documents(S: int, g: torch.Generator) -> list[int]:
    cuts = sorted(set(torch.randint(1, S, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()))
    return [0, *cuts, S]


def _checked(rank, size, cu: list[int], *, layout: str, S: int, H: int, D: int, seed: int, group=None) -> dict:
    """One packed batch forward + backward against the fp64 dense truth: errors (numerics.errors)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, H, S, D, generator=g, dtype=torch.float64) for _ in range(4))
    vis = truth_mask(S, True, (-1, -1), cu)
    truth = masked_grads(q, k, v, do, vis, 0.0)
    low = masked_grads(*(t.float() for t in (q, k, v, do)), vis, 0.0)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout, group=group, cu_seqlens=cu)  # noqa: E731
    ql, kl, vl = (sh(t.float()).requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, group=group, is_causal=True, layout=layout, cu_seqlens=torch.tensor(cu))
    out.backward(sh(do.float()))
    mine = [seqpar.unshard(t.detach(), dim=2, layout=layout, group=group, cu_seqlens=cu)
            for t in (out, ql.grad, kl.grad, vl.grad)]
    return numerics.errors(mine, truth, low)


def long_run(rank, size, *, batches: int = 1000, layers: int = 3, S: int = 32, H: int = 2, D: int = 8,
             check_every: int = 250) -> dict:
    """``batches`` packed batches with new document boundaries, each through ``layers`` attention calls that
    share one cu_seqlens tensor (as a model's layers do): per batch the gathers and host reads, the group
    state's sizes at the end, and every ``check_every``-th batch (every layout in turn) against the truth."""
    grp = dist.group.WORLD
    st = group_state(grp)
    calls0 = st.calls
    g = torch.Generator().manual_seed(1234)  # the same documents on every rank
    x = torch.randn(1, H, S // size, D, generator=torch.Generator().manual_seed(rank))
    per_batch, errors = [], []
    layouts = ("zigzag", "packed", "striped", "contiguous")
    for b in range(batches):
        cu_list = _documents(S, g)
        if b % check_every == check_every - 1:
            layout = layouts[(b // check_every) % len(layouts)]
            errors.append((layout, _checked(rank, size, cu_list, layout=layout, S=S, H=H, D=D, seed=b)))
            continue
        cu = torch.tensor(cu_list, dtype=torch.int32)
        with counting() as n, torch.no_grad():
            h = x
            for _ in range(layers):  # the layers of one forward: the same cu_seqlens tensor
                h = seqpar.attention(h, x, x, is_causal=True, layout="zigzag", cu_seqlens=cu)
        per_batch.append(dict(n))
    return dict(per_batch=per_batch, errors=errors, calls=st.calls - calls0, agreed=len(st.agreed),
                documents=len(st.documents), auto=len(st.auto), states=len(state_mod._STATES),
                lru=[f.cache_info().currsize <= f.cache_info().maxsize for f in (plan_tile, last_step, packed_chunks)])


def group_state_freed(rank, size, *, groups: int = 5) -> dict:
    """New groups, used (numbered calls, agreed documents), then destroyed: their state is freed with them."""
    before = len(state_mod._STATES)
    refs, calls = [], []
    x = torch.randn(1, 2, 8, 8)
    for i in range(groups):
        grp = dist.new_group(list(range(size)))
        for _ in range(2):
            seqpar.attention(x, x, x, group=grp, is_causal=True, cu_seqlens=torch.tensor([0, 3 + i, 8 * size]))
        st = group_state(grp)
        calls.append(st.calls)
        refs.append(weakref.ref(st))
        dist.destroy_process_group(grp)
        del grp, st
    gc.collect()
    return dict(calls=calls, alive=sum(r() is not None for r in refs), grew=len(state_mod._STATES) - before)


def documents_after_cache(rank, size, *, case: str) -> tuple:
    """The documents' agreement after the cache. ``inplace``: the agreed tensor changed in place on every
    rank -> agreed again and used (errors vs the truth of the new documents); ``differs``: rank 1 passes
    other offsets in a later batch -> every rank raises; ``invalid``: rank 1's later offsets are invalid."""
    S, H, D = 16 * size, 2, 8
    grp = dist.group.WORLD
    st = group_state(grp)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    sh = lambda t, cu: seqpar.shard(t, dim=2, layout="zigzag")  # noqa: E731
    first = [0, 5, 11, S]
    cu = torch.tensor(first)
    out = seqpar.attention(sh(q, first), sh(k, first), sh(v, first), is_causal=True, cu_seqlens=cu)
    if case == "inplace":
        new = [0, 2, 20, S - 1, S]
        cu.resize_(len(new)).copy_(torch.tensor(new))  # same object, new version
        before = st.agreements
        with counting() as n:
            out = seqpar.attention(sh(q, new), sh(k, new), sh(v, new), is_causal=True, cu_seqlens=cu)
            out2 = seqpar.attention(sh(q, new), sh(k, new), sh(v, new), is_causal=True, cu_seqlens=cu)
        vis = truth_mask(S, True, (-1, -1), new)
        mask = torch.where(vis, 0.0, float("-inf"))
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
        err = (seqpar.unshard(out, dim=2) - ref).abs().max().item()
        return err, (out2 - out).abs().max().item(), st.agreements - before, n["gathers"]
    later = [0, 5, 11, S] if rank == 0 else ([0, 6, 11, S] if case == "differs" else [0, 11, 5, S])
    try:
        seqpar.attention(sh(q, later), sh(k, later), sh(v, later), is_causal=True, cu_seqlens=torch.tensor(later))
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None, None
