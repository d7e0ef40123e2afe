"""Cases for tests/test_mixing.py: the distributed mixer context (halo exchange, entry-state scan).

Each case runs on every rank of a spawned gloo world (or on thread-ranks); the references are computed
in the same process on the whole sequence in fp64 (a shift of the global tensor for halos, a sequential
scan of all runs in global order for entry states) with plain autograd, never with the context's code.
"""

from __future__ import annotations

import torch

from seqpar.layout import global_indices
from seqpar.mixing.context import DistContext, make_context
from seqpar.mixing.runs import all_runs

# (layout, seq_len, cu_seqlens) over 4 ranks: runs shorter than the halo width come from zigzag at S=8
# (chunks of 1) and from packed documents of 1-3 tokens (several empty or one-token chunks per document)
CONFIGS_4 = [
    ("contiguous", 16, None), ("striped", 16, None), ("zigzag", 16, None), ("zigzag", 8, None),
    ("packed", 16, None), ("packed", 16, (0, 1, 3, 6, 7, 16)), ("packed", 24, (0, 2, 3, 13, 14, 17, 24)),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_halos(X: torch.Tensor, runs, width: int) -> list[torch.Tensor]:
    """X (B, S, C) global -> per run of ``runs``: the ``width`` rows before its start (zeros before 0) + its rows."""
    padded = torch.cat([X.new_zeros(X.shape[0], width, X.shape[2]), X], dim=1)
    return [padded.narrow(1, g, width + b - a) for g, (a, b) in zip(runs.starts, runs.bounds)]


def halo_all(rank: int, size: int, group=None, configs=CONFIGS_4, widths=(0, 1, 2, 3, 4)) -> list[tuple]:
    """For every config and width: (config, width, forward error, gradient error) of ``halo`` against the fp64
    shift of the global tensor, the gradient of a random linear functional of every rank's halos."""
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    out = []
    for ci, (layout, S, cu) in enumerate(configs):
        runs_all = all_runs(S, size, layout, cu)
        X = torch.randn(2, S, 3, generator=_gen(ci), dtype=torch.float64)
        idx = global_indices(S, rank, size, layout, cu)
        for width in widths:
            ctx = DistContext(group, runs_all) if ci % 2 else make_context(group, layout, S, cu)
            # the sequence along the last dim for half of the configs (any dim works)
            seq_dim = 1 if ci % 2 == 0 else 2
            x = X.index_select(1, idx).movedim(1, seq_dim).clone().requires_grad_()
            halos = [h.movedim(seq_dim, 1) for h in ctx.halo(x, width, dim=seq_dim)]
            Ws = [torch.randn(2, sum(width + b - a for a, b in r.bounds), 3, generator=_gen(100 * ci + 10 * width + r_),
                              dtype=torch.float64) for r_, r in enumerate(runs_all)]
            (Ws[rank] * torch.cat(halos, dim=1)).sum().backward()
            # the single-process truth
            Xr = X.clone().requires_grad_()
            ref = [torch.cat(_reference_halos(Xr, r, width), dim=1) for r in runs_all]
            sum((W * h).sum() for W, h in zip(Ws, ref)).backward()
            fwd = (torch.cat(halos, dim=1) - ref[rank]).abs().max().item()
            grad = (x.grad.movedim(seq_dim, 1) - Xr.grad.index_select(1, idx)).abs().max().item()
            out.append(((layout, S, cu), width, fwd, grad))
    return out


def random_maps(n: int, kind: str, seed: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n maps of very different magnitudes: b ~ N(0,1) * 10**U(-3, 3); matrix M = s Q (spectral norm s = 10**U(-3, 0)
    times a random orthogonal Q), scale M (2, 2, 1, 1) = 10**U(-3, 0) per head (a Mamba2-like decay)."""
    g = _gen(seed)
    maps = []
    for _ in range(n):
        b = torch.randn(2, 2, 3, 4, generator=g, dtype=dtype) * 10 ** (6 * torch.rand((), generator=g, dtype=dtype) - 3)
        if kind == "matrix":
            q, _ = torch.linalg.qr(torch.randn(2, 2, 3, 3, generator=g, dtype=dtype))
            m = q * 10 ** (-3 * torch.rand((2, 2, 1, 1), generator=g, dtype=dtype))
        else:
            m = 10 ** (-3 * torch.rand((2, 2, 1, 1), generator=g, dtype=dtype))
        maps.append((m, b))
    return maps


def reference_scan(maps, kind: str) -> list[torch.Tensor]:
    """fp64 entry states of runs visited in order: h_0 = 0, h_{i+1} = M_i h_i + b_i."""
    h = torch.zeros_like(maps[0][1])
    states = []
    for m, b in maps:
        states.append(h)
        h = (torch.matmul(m, h) if kind == "matrix" else m * h) + b
    return states


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero; a missing gradient is zero)."""
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
    scale = b.abs().max().item()
    err = (a.double() - b).abs().max().item()
    return err / scale if scale > 0 else err


def scan_errors(ctx, kind: str, seed: int) -> tuple[float, float]:
    """(entry-state error, gradient error) of ``ctx.entry_states`` on this rank against the fp64 single-process scan
    of all runs in global order, relative per run / per map; the gradient of sum_i <V_i, entry_i> over all runs."""
    runs = ctx.runs
    n = runs.n
    maps = random_maps(n, kind, seed)
    V = [torch.randn(2, 2, 3, 4, generator=_gen(seed + 1 + i), dtype=torch.float64) for i in range(n)]
    local = [tuple(t.float().requires_grad_() for t in maps[i]) for i in runs.index]  # fp32 maps: the fp32 scan
    got = ctx.entry_states(local, kind)
    sum((V[i].float() * h).sum() for i, h in zip(runs.index, got)).backward()
    ref_maps = [tuple(t.clone().requires_grad_() for t in mb) for mb in maps]
    ref = reference_scan(ref_maps, kind)
    sum((v * h).sum() for v, h in zip(V, ref)).backward()
    fwd = max(_rel(h, ref[i]) for i, h in zip(runs.index, got))
    grad = max(_rel(t.grad, rt.grad) for i, mb in zip(runs.index, local) for t, rt in zip(mb, ref_maps[i]))
    assert all(h.dtype == torch.float32 and h.shape == maps[0][1].shape for h in got)
    return fwd, grad


def entry_all(rank: int, size: int, group=None) -> list[tuple]:
    """For every config and kind: (config, kind, entry-state error, gradient error) on ``group`` (default: the
    torch.distributed world)."""
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    out = []
    for ci, (layout, S, cu) in enumerate(CONFIGS_4):
        ctx = make_context(group, layout, S, cu)
        for kind in ("matrix", "scale"):
            out.append(((layout, S, cu), kind, *scan_errors(ctx, kind, seed=1000 * ci + len(kind))))
    return out


def bad_input(rank: int, size: int) -> list[str]:
    """Bad arguments raise ValueError/TypeError on every rank before any communication: a valid halo and scan
    after them still pair up across the ranks (they would not if a rank had entered a collective)."""
    import torch.distributed as dist

    ctx = make_context(dist.group.WORLD, "packed", 16, (0, 8, 16))  # 2 to 4 runs on every rank
    x = torch.randn(1, 4, 2)
    maps = [(torch.rand(2, 3, 3), torch.randn(2, 3, 1)) for _ in ctx.runs.bounds]
    calls = [
        lambda: ctx.halo(x, -1),
        lambda: ctx.halo(x, 1.5),
        lambda: ctx.halo(x, 2, dim=2),  # dim 2 is not the sequence
        lambda: ctx.entry_states(maps + maps[:1], "matrix"),
        lambda: ctx.entry_states(maps[:1] + [(torch.rand(2, 4, 4), torch.randn(2, 4, 1))] * (len(maps) - 1), "matrix"),
        lambda: ctx.entry_states([(torch.rand(2, 3, 3), torch.randn(2, 2, 1))] * len(maps), "matrix"),
        lambda: ctx.entry_states(maps, "diagonal"),
    ]
    msgs = []
    for call in calls:
        try:
            call()
        except (ValueError, TypeError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
        else:
            msgs.append("no error")
    # still in step: one halo and one scan pair up across the ranks
    h = ctx.halo(torch.full((1, 4, 2), float(rank)), 1)
    ctx.entry_states(maps, "matrix")
    msgs.append(f"halo of first run: {h[0][0, 0, 0].item()}")
    return msgs


def gather_errors(group, rank: int, size: int, layout: str, S: int, cu, seed: int, shape=(3,)) -> tuple[float, float,
                                                                                                        float, float]:
    """(gather forward error, gather gradient error, keep forward error, keep gradient error) on this rank, fp64.

    gather_sequence: the gathered tensor must be the global X in global order (exactly); with every rank q reading it
    through its own random weight W_q, the gradient at this rank's tokens must be sum_q W_q there (single-process
    autograd of sum_q <W_q, X>). keep_local: X[:, my positions]; its gradient V_r scattered into zeros."""
    from seqpar.mixing.gather import gather_sequence, keep_local

    idx = global_indices(S, rank, size, layout, cu)
    X = torch.randn(2, S, *shape, generator=_gen(seed), dtype=torch.float64)
    Ws = [torch.randn(X.shape, generator=_gen(seed + 1 + q), dtype=torch.float64) for q in range(size)]
    docs = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    x = X.index_select(1, idx).clone().requires_grad_()
    full = gather_sequence(x, group, layout, docs)
    (Ws[rank] * full).sum().backward()
    Xr = X.clone().requires_grad_()
    sum((W * Xr).sum() for W in Ws).backward()
    g_fwd = (full.detach() - X).abs().max().item()
    g_grad = _rel(x.grad, Xr.grad.index_select(1, idx))
    Y = X.clone().requires_grad_()
    V = torch.randn(2, len(idx), *shape, generator=_gen(seed + 99), dtype=torch.float64)
    mine = keep_local(Y, group, layout, docs)
    (V * mine).sum().backward()
    want = torch.zeros_like(X).index_copy(1, idx, V)
    k_fwd = (mine.detach() - X.index_select(1, idx)).abs().max().item()
    return g_fwd, g_grad, k_fwd, (Y.grad - want).abs().max().item()


def gather_all(rank: int, size: int) -> list[tuple]:
    """For every config of CONFIGS_4 (every layout, packed with documents of 1-3 tokens), on the world's group and
    at world 1 (group=None, and a one-rank ProcessGroup of this rank): (config, world, shape, errors of
    :func:`gather_errors`); (B, S, C) and (B, S, H, D) tensors; plus int64 / bool tensors gathered bit-exactly."""
    import torch.distributed as dist

    from seqpar.mixing.gather import gather_sequence

    singles = [dist.new_group([r]) for r in range(size)]  # every rank makes every group, in the same order
    out = []
    for ci, (layout, S, cu) in enumerate(CONFIGS_4):
        for world, group, r, p in (("4", dist.group.WORLD, rank, size), ("1:None", None, 0, 1),
                                   ("1:group", singles[rank], 0, 1)):
            for shape in ((3,), (2, 3)):
                errs = gather_errors(group, r, p, layout, S, cu, seed=100 * ci + len(shape), shape=shape)
                out.append(((layout, S, cu), world, shape, *errs))
        idx = global_indices(S, rank, size, layout, cu)
        docs = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        ids = torch.randint(0, 1 << 40, (2, S), generator=_gen(ci))
        same = torch.equal(gather_sequence(ids.index_select(1, idx), dist.group.WORLD, layout, docs), ids)
        flags = ids % 3 == 0
        same &= torch.equal(gather_sequence(flags.index_select(1, idx), dist.group.WORLD, layout, docs), flags)
        out.append(((layout, S, cu), "4", "int64+bool", 0.0 if same else 1.0, 0.0, 0.0, 0.0))
    return out


def threaded_scan(ring, S_per_rank: int, kind: str, seed: int) -> tuple[float, float]:
    """One thread-rank: entry states and gradients over a ThreadGroup, zigzag, vs the fp64 scan."""
    from seqpar.comm.threads import ThreadGroup

    group = ThreadGroup(ring)
    torch.set_num_threads(1)
    return scan_errors(make_context(group, "zigzag", S_per_rank * group.size), kind, seed)


def threaded_halo(ring, configs, widths) -> list[tuple]:
    """halo_all on thread-ranks (a ThreadGroup: all-gather and reduce-scatter through mailboxes)."""
    from seqpar.comm.threads import ThreadGroup

    group = ThreadGroup(ring)
    return halo_all(group.rank, group.size, group=group, configs=configs, widths=widths)


def mpi_main() -> None:
    """Under mpirun: the halo and entry-state cases over seqpar.MPIGroup (mpi4py Allgather, Reduce_scatter_block);
    prints MIXING-MPI OK on every rank whose errors are within the bounds of tests/test_mixing.py."""
    from seqpar.comm.mpi import MPIGroup

    group = MPIGroup()
    halos = halo_all(group.rank, group.size, group=group, widths=(1, 3))
    entries = entry_all(group.rank, group.size, group=group)
    bad = [h for h in halos if h[2] != 0.0 or h[3] > 1e-14] + [e for e in entries if e[2] > 1e-6 or e[3] > 1e-5]
    print(f"MIXING-MPI {'OK' if not bad else 'FAILED'} rank={group.rank} halos={len(halos)} entries={len(entries)} "
          f"bad={bad}", flush=True)


if __name__ == "__main__":
    mpi_main()



def adapter_mixers() -> dict:
    """name -> (module, adapter): the first Mamba2 mixer of a tiny Mamba2 (chunks of 4, conv kernel 4) and the first
    gated DeltaNet of a tiny Qwen3-Next, parameters moved off their init."""
    import transformers

    from seqpar.mixing.gated_delta import GatedDeltaAdapter
    from seqpar.mixing.ssd import MAMBA2
    from seqpar.testing.zoo import tiny_config

    def first(model_cls, pick, **over):
        cfg = tiny_config(model_cls.config_class.model_type, model_cls)
        for k, v in over.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        m = next(mod for mod in model_cls(cfg).modules() if pick(mod))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=_gen(5), dtype=p.dtype))
        return m

    gd = GatedDeltaAdapter()
    return {"mamba2": (first(transformers.Mamba2ForCausalLM, lambda m: type(m).__name__ == "Mamba2Mixer",
                             n_groups=2, chunk_size=4), MAMBA2),
            "qwen3_next": (first(transformers.Qwen3NextForCausalLM, gd.matches), gd)}


ADAPTER_S, ADAPTER_CU = 24, (0, 2, 3, 13, 14, 24)  # zigzag chunks of 3 and documents of 1-2 tokens: runs < kernel - 1


def threaded_adapter(ring, m, adapter, layout: str, hs: torch.Tensor, w: torch.Tensor) -> tuple:
    """One thread-rank: the adapter on this rank's shard over a ThreadGroup context -> (output shard, input gradient
    shard, parameter gradients of sum(output * w))."""
    from seqpar.comm.threads import ThreadGroup
    from seqpar.layout import shard_tensor

    group = ThreadGroup(ring)
    docs = ADAPTER_CU if layout == "packed" else None
    ctx = make_context(group, layout, ADAPTER_S, docs)
    xl = shard_tensor(hs, 1, group.rank, group.size, layout, docs).clone().requires_grad_()
    y = adapter.forward(m, ctx, (xl,), {})
    y = y[0] if isinstance(y, tuple) else y
    params = list(m.parameters())
    grads = torch.autograd.grad((y * shard_tensor(w, 1, group.rank, group.size, layout, docs)).sum(), [xl, *params],
                                allow_unused=True)
    return y.detach(), grads[0], [torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], params)]
